"""Which decoder linears a model cannot take in int4: task accuracy with int4 on one kind at a time.

Starts from an fp32 artifact exported with a task set (tiny-vqa, tiny-vqa-qwen: easy-vqa), quantizes a
copy of its decoder with int4 on some linears (by weight-name part: q_proj, k_proj, ...) and the rest
fp32 or 8-bit, and answers the export gate's questions (the task's validation split, 200) through the
runtime. What it prints is what `--int4-8bit` is chosen from (docs/QUANTIZATION.md, "Mixed int4").

    attanchor-export tiny-vqa-qwen -o art-fp32
    python scripts/measure_int4_sensitivity.py art-fp32 [--form both|ort|trt] [--variant LABEL ...] [--json-out F]

Forms as the exporter writes them: "ort" = MatMulNBits, asymmetric, accuracy level 4; "trt" = symmetric
INT4 QDQ with the block TensorRT takes for the graph's K dims (precision.weights.trt_int4_block).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import onnx_ir as ir
from attanchor_runtime.manifest import Manifest

from attanchor_export.precision.gate import fp32_task_answers, task_metrics
from attanchor_export.precision.streamed_weights import linear_nodes, quantize_graph, save_beside
from attanchor_export.precision.weights import DEFAULT_ACCURACY_LEVEL, trt_int4_block

ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
# (label, kinds in int4, kinds at 8 bits (ort) / unquantized (trt); the rest stays fp32)
ALL = ATTENTION + MLP + ("lm_head",)
VARIANTS = [
    ("all int4", ALL, ()),
    *[(f"only {'+'.join(k)} int4", k, ()) for k in (("q_proj", "k_proj"), ("v_proj",), ("o_proj",),
                                                    ("gate_proj", "up_proj"), ("down_proj",), ("lm_head",))],
    ("v+down 8-bit, rest int4", tuple(k for k in ALL if k not in ("v_proj", "down_proj")), ("v_proj", "down_proj")),
    ("q+k+v 8-bit, rest int4", tuple(k for k in ALL if k not in ("q_proj", "k_proj", "v_proj")),
     ("q_proj", "k_proj", "v_proj")),
    *[(f"{'+'.join(k)} 8-bit, rest int4", tuple(x for x in ALL if x not in k), k)
      for k in (("q_proj", "k_proj", "v_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
                ("q_proj", "k_proj", "v_proj", "down_proj", "lm_head"))],
]


def kind(node, head) -> str:
    if node is head:
        return "lm_head"
    match = re.search(r"\.(\w+?)\.weight", node.inputs[1].name or "")
    return match.group(1) if match else node.inputs[1].name


def write_variant(folder: Path, source: str, out: str, int4: tuple, eight: tuple, form: str, logits: str) -> None:
    model = ir.load(str(folder / source))
    nodes, head = linear_nodes(model.graph, True, logits)
    kinds = [kind(n, head) for n in nodes]  # before quantize_graph replaces the nodes
    four = [n for n, k in zip(nodes, kinds) if k in int4]
    eights = [n for n, k in zip(nodes, kinds) if k in eight]
    if form == "trt":
        block = trt_int4_block(128, [int(n.inputs[1].shape[0]) for n in four]) or 128
        quantize_graph(model, four, bits=4, block_size=block, symmetric=True, qdq=True)
    else:
        level = DEFAULT_ACCURACY_LEVEL["int4"]
        quantize_graph(model, four, bits=4, block_size=128, symmetric=False, qdq=False, accuracy_level=level)
        if eights:
            quantize_graph(model, eights, bits=8, block_size=128, symmetric=False, qdq=False, accuracy_level=level)
    save_beside(model, folder / out, model.ir_version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an fp32 artifact exported with a task set")
    parser.add_argument("--task", default="easy-vqa")
    parser.add_argument("--form", choices=("both", "ort", "trt"), default="both")
    parser.add_argument("--variant", action="append", choices=[label for label, _, _ in VARIANTS],
                        help="only this row (repeatable; default: every row)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    manifest = Manifest.load(args.folder)
    if manifest.precision.quantized:
        sys.exit(f"error: {args.folder} is {manifest.precision.label}: give an fp32 artifact")
    files = {g: manifest.graphs[g].file for g in ("vision", "embedding", "decoder")}
    fp32 = fp32_task_answers(manifest, files, args.task)
    print(f"fp32: {fp32['accuracy']:.3f} on {len(fp32['items'])} {args.task} validation questions", flush=True)
    rows = []
    forms = ("ort", "trt") if args.form == "both" else (args.form,)
    for label, int4, eight in VARIANTS:
        if args.variant and label not in args.variant:
            continue
        for form in forms:
            out = f".sensitivity-{form}.onnx"
            start = time.time()
            try:
                write_variant(args.folder, files["decoder"], out, int4, eight, form, manifest.graphs.decoder.output_names[0])
                result = task_metrics(manifest, {**files, "decoder": out}, fp32, "int4")
            finally:
                for p in args.folder.glob(f"{out}*"):
                    p.unlink()
            row = {"variant": label, "form": form, "accuracy": result.accuracy, "same_answers": result.same_answers,
                   "by_kind": {k: v["accuracy"] for k, v in result.by_kind.items()}}
            rows.append(row)
            print(f"{label:56s} {form}: {result.accuracy:.3f} (same answers {result.same_answers:.3f}, "
                  f"{', '.join(f'{k} {v:.3f}' for k, v in row['by_kind'].items())}) {time.time() - start:.0f} s", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"fp32": fp32["accuracy"], "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
