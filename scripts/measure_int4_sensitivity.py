"""Which decoder linears a model cannot take in int4: task accuracy with int4 on one kind at a time.

Starts from an fp32 artifact exported with a task set (tiny-vqa, tiny-vqa-qwen: easy-vqa), quantizes a
copy of its decoder with int4 on some linears (by weight-name part: q_proj, k_proj, ...) and the rest
fp32 or 8-bit, and answers the export gate's questions (the task's validation split, 200) through the
runtime. What it prints is what `--int4-8bit` is chosen from (docs/QUANTIZATION.md, "Mixed int4").

    attanchor-export tiny-vqa-qwen -o art-fp32
    python scripts/measure_int4_sensitivity.py art-fp32 [--form both|ort|trt] [--variant LABEL ...] [--json-out F]
        [--block-size 128|256] [--rounding nearest|clip-search|weighted-clip-search] [--weight-by mean-square|max]

Forms as the exporter writes them: "ort" = MatMulNBits, asymmetric, accuracy level 4; "trt" = symmetric
INT4 QDQ with the block TensorRT takes for the graph's K dims (precision.weights.trt_int4_block).
`--block-size` is the MatMulNBits form's block (the exporter's --block-size). `--rounding clip-search`
gives the MatMulNBits form's int4 weights a per-block range search instead of onnxruntime's min/max
rounding (`clip_search_blocks`); `weighted-clip-search` weighs each input channel's error by its
activations on the calibration set (`--weight-by`: the mean of x^2, or max |x|^2). These are the
roundings tried to keep block 256's accuracy (docs/QUANTIZATION.md, "Block 256").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
from attanchor_runtime.manifest import Manifest

from attanchor_export.load.datasets import load_calibration_set
from attanchor_export.precision import streamed_weights
from attanchor_export.precision.calibration import DecoderCalibrationReader, channel_values
from attanchor_export.precision.gate import fp32_task_answers, gate_pipeline, task_metrics
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


CLIP_FACTORS = np.linspace(1.0, 0.6, 17)  # the block's [min, max] range scaled by each; the least error wins


def clip_search_blocks(weight: np.ndarray, block_size: int, factors=CLIP_FACTORS, channel_weight=None):
    """Asymmetric int4 of `weight` [K, N] in MatMulNBits' layout (packed [N, blocks, block/2] uint8, scales
    [N, blocks], zero points [N, ceil(blocks/2)] uint8), each block's range chosen among `factors` x
    onnxruntime's [min(w, 0), max(w, 0)] by its squared rounding error, each input channel's error times
    `channel_weight` [K] where given (how large that channel's activations run). factors=(1.0,) is
    onnxruntime's rounding (the same codes, scales and zero points: tests/test_int4_rounding.py)."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = weight.T
    w = padded.reshape(n, blocks, block_size)
    importance = np.zeros(blocks * block_size, np.float32)  # 0 on the padding: it is not part of the weight
    importance[:k] = 1.0 if channel_weight is None else channel_weight / np.mean(channel_weight)
    importance = importance.reshape(1, blocks, block_size)
    real = (np.arange(blocks * block_size) < k).reshape(importance.shape)
    low = np.minimum(np.where(real, w, np.inf).min(-1), 0)
    high = np.maximum(np.where(real, w, -np.inf).max(-1), 0)
    best = np.full(low.shape, np.inf, np.float32)
    scale, zero = np.ones_like(low), np.zeros_like(low)
    for f in factors:
        s = ((high - low) * f / 15).astype(np.float32)
        s = np.where(s == 0, 1.0, s)  # an all-zero block: codes of 0 (its stored scale is 0, as onnxruntime's)
        z = np.clip(np.round(-low * f / s), 0, 15)
        q = np.clip(np.round(w / s[..., None]) + z[..., None], 0, 15)
        err = (((q - z[..., None]) * s[..., None] - w) ** 2 * importance).sum(-1)
        better = err < best
        best, scale, zero = np.where(better, err, best), np.where(better, s, scale), np.where(better, z, zero)
    q = np.where(real, np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, 15), 0).astype(np.uint8)
    zeros = np.full((n, blocks + blocks % 2), 8, np.uint8)  # an odd count's unused last nibble: 8, as onnxruntime's
    zeros[:, :blocks] = zero
    scale = np.where(high == low, 0.0, scale)
    return ((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale.astype(weight.dtype),
            (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8))


@contextmanager
def clip_searched(channel_weight=None):
    """quantize_graph's asymmetric int4 weights through clip_search_blocks while inside."""
    original = streamed_weights._quantizer

    def quantizer(bits, block_size, symmetric, qdq, accuracy_level):
        if bits == 4 and not symmetric and not qdq:
            return SimpleNamespace(qbits_block_quant=lambda w: clip_search_blocks(np.asarray(w), block_size,
                                                                               channel_weight=channel_weight))
        return original(bits, block_size, symmetric, qdq, accuracy_level)

    streamed_weights._quantizer = quantizer
    try:
        yield
    finally:
        streamed_weights._quantizer = original


def channel_weights(folder: Path, manifest: Manifest, source: str, logits: str, weight_by: str) -> dict[str, np.ndarray]:
    """Per input channel of every linear, over the export's calibration set (the int8 forms' 8 samples):
    max |x|^2 (weight_by "max") or the mean of x^2 ("mean-square")."""
    model = ir.load(str(folder / source))
    inputs = sorted({n.inputs[0].name for n in linear_nodes(model.graph, True, logits)[0]})
    del model
    reader = DecoderCalibrationReader.from_samples(gate_pipeline(manifest), load_calibration_set(None))
    stats: dict[str, tuple] = {}  # name -> (max x^2, sum of x^2, rows)
    for values in channel_values(folder / source, reader, inputs):
        for name, rows in values.items():
            square = np.square(rows, dtype=np.float64)
            peak, total, count = stats.get(name, (0.0, 0.0, 0))
            stats[name] = (np.maximum(peak, square.max(axis=0)), total + square.sum(axis=0), count + len(rows))
    return {name: (peak if weight_by == "max" else total / count) for name, (peak, total, count) in stats.items()}


def write_variant(folder: Path, source: str, out: str, int4: tuple, eight: tuple, form: str, logits: str,
                  block_size: int = 128, rounding: str = "nearest", weights: dict | None = None) -> None:
    """`weights` (channel_weights, by the linear's input): for rounding "weighted-clip-search"."""
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
        ort = {"block_size": block_size, "symmetric": False, "qdq": False, "accuracy_level": level}
        if rounding == "nearest":
            quantize_graph(model, four, bits=4, **ort)
        else:
            for node in four:  # one at a time: each with its own input's channel weights
                weight = weights[node.inputs[0].name] if rounding == "weighted-clip-search" else None
                with clip_searched(weight):  # bound now; the weights are quantized when the file is written
                    quantize_graph(model, [node], bits=4, **ort)
        if eights:
            quantize_graph(model, eights, bits=8, **ort)
    save_beside(model, folder / out, model.ir_version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an fp32 artifact exported with a task set")
    parser.add_argument("--task", default="easy-vqa")
    parser.add_argument("--form", choices=("both", "ort", "trt"), default="both")
    parser.add_argument("--variant", action="append", choices=[label for label, _, _ in VARIANTS],
                        help="only this row (repeatable; default: every row)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--block-size", type=int, choices=(128, 256), default=128, help="the MatMulNBits form's block")
    parser.add_argument("--rounding", choices=("nearest", "clip-search", "weighted-clip-search"), default="nearest",
                        help="the MatMulNBits form's int4 rounding: onnxruntime's, a per-block range search, or "
                             "that search with each input channel's error weighted by its activations (--weight-by)")
    parser.add_argument("--weight-by", choices=("mean-square", "max"), default="mean-square",
                        help="weighted-clip-search's channel weight: the mean of x^2, or max |x|^2, on the calibration set")
    args = parser.parse_args()
    manifest = Manifest.load(args.folder)
    if manifest.precision.quantized:
        sys.exit(f"error: {args.folder} is {manifest.precision.label}: give an fp32 artifact")
    files = {g: manifest.graphs[g].file for g in ("vision", "embedding", "decoder")}
    fp32 = fp32_task_answers(manifest, files, args.task)
    logits = manifest.graphs.decoder.output_names[0]
    weights = (channel_weights(args.folder, manifest, files["decoder"], logits, args.weight_by)
               if args.rounding == "weighted-clip-search" else None)
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
                write_variant(args.folder, files["decoder"], out, int4, eight, form, logits, args.block_size,
                              args.rounding, weights)
                result = task_metrics(manifest, {**files, "decoder": out}, fp32, "int4")
            finally:
                for p in args.folder.glob(f"{out}*"):
                    p.unlink()
            row = {"variant": label, "form": form, "block_size": args.block_size if form == "ort" else None,
                   "rounding": args.rounding if form == "ort" else "nearest",
                   "weight_by": args.weight_by if form == "ort" and args.rounding == "weighted-clip-search" else None,
                   "accuracy": result.accuracy, "same_answers": result.same_answers,
                   "by_kind": {k: v["accuracy"] for k, v in result.by_kind.items()}}
            rows.append(row)
            print(f"{label:56s} {form}: {result.accuracy:.3f} (same answers {result.same_answers:.3f}, "
                  f"{', '.join(f'{k} {v:.3f}' for k, v in row['by_kind'].items())}) {time.time() - start:.0f} s", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"fp32": fp32["accuracy"], "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
