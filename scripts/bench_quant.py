"""int4 vs fp32 decoder at TinyLLaVA-1B dimensions: file size and decode tokens/s on onnxruntime CPU.

Builds the text model of attanchor_export.load.tiny_random.tinyllava_1b_config() (LlamaForCausalLM, hidden 2048,
22 layers, 32 heads / 4 KV heads, intermediate 5632, vocab 32064: ~1.1 B parameters) with random weights,
exports decoder.onnx fp32 with the artifact exporter (export_decoder), quantizes it int4 weight-only
with precision.weights' MatMulNBits path (the form the onnxruntime backend opens) and measures, in one run:

- file size: int4 decoder.onnx + .data vs fp32 (target <= 0.3x);
- decode tokens/s, batch 1, after a `--prompt-len` prefill, `--threads` intra-op threads (target >= 3x),
  fp32 and int4 sessions loaded together and timed in interleaved rounds (medians), so other load on a
  shared machine hits both alike. The int4 graph carries MatMulNBits accuracy_level 4 (int8 compute on
  CPU), as quantize_artifact writes it, and is also timed at level 0 (fp32 compute; same weights, a
  second small graph file sharing the .data) unless `--compare-accuracy-levels` says otherwise.

Random weights say nothing about accuracy (the gate does that on real graphs); they do give real
sizes and kernel speeds. Heavy: ~5 GB RAM and ~70 s to export, several GB of disk; run it alone.

    python scripts/bench_quant.py [--out DIR [--reuse]] [--threads 2] [--rounds 5] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def build_and_export(folder: Path, layers: int | None, opset: int) -> tuple[Path, object]:
    import torch
    from attanchor_runtime.manifest import Dims
    from transformers import LlamaForCausalLM

    from attanchor_export.families.base import decoder_spec
    from attanchor_export.load.tiny_random import tinyllava_1b_config
    from attanchor_export.trace.decoder import export_decoder

    text = tinyllava_1b_config().text_config
    if layers:
        text.num_hidden_layers = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(text).eval()
    params = sum(p.numel() for p in model.parameters())
    head_dim = text.hidden_size // text.num_attention_heads
    dims = Dims(
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=head_dim, vocab_size=text.vocab_size,
        image_tokens=576, image_size=336, patch_size=14, vision_hidden_size=1024,
        max_position_embeddings=text.max_position_embeddings, tie_word_embeddings=False,
    )
    path = folder / "fp32" / "decoder.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export_decoder(model.model, model.lm_head, dims, decoder_spec(dims), path, opset)
    print(f"exported fp32 decoder ({params / 1e9:.2f} B parameters) in {time.perf_counter() - t0:.0f} s", flush=True)
    del model
    return path, dims


def quantize_int4(src: Path, dst: Path, block_size: int, quantize_lm_head: bool, accuracy_level: int | None) -> dict:
    import onnx_ir as ir

    from attanchor_export.options import ARTIFACT_IR_VERSION
    from attanchor_export.precision.streamed_weights import linear_nodes, quantize_graph, save_beside

    t0 = time.perf_counter()
    model = ir.load(str(src))
    nodes, _ = linear_nodes(model.graph, quantize_lm_head)
    quantized = quantize_graph(model, nodes, 4, block_size, symmetric=False, qdq=False,
                               accuracy_level=accuracy_level or None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_beside(model, dst, ARTIFACT_IR_VERSION)
    del model
    seconds = time.perf_counter() - t0
    print(f"int4 quantized {quantized}/{len(nodes)} linears (accuracy_level={accuracy_level}) in {seconds:.0f} s",
          flush=True)
    return {"quantized_nodes": quantized, "linear_layers": len(nodes), "seconds": round(seconds, 1)}


class DecodeBench:
    """One session, prefilled once; `round()` times `steps` cached decode steps from that prefill, each
    through the runtime's decode loop (decode.decoder_calls on an ort_backend.OrtDecoder)."""

    def __init__(self, path: Path, dims, threads: int, prompt_len: int):
        from attanchor_runtime.decode import SequentialStep, decoder_calls
        from attanchor_runtime.ort_backend import OrtDecoder
        from attanchor_runtime.sessions import ort_session

        self.decoder_calls = decoder_calls
        t0 = time.perf_counter()
        self.decoder = OrtDecoder.of_session(ort_session(path, threads=threads), dims.max_position_embeddings)
        self.load_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        mask, positions = np.ones((1, prompt_len), np.int64), np.arange(prompt_len, dtype=np.int64)[None]
        embeds = rng.standard_normal((1, prompt_len, dims.hidden_size)).astype(np.float32)
        first = SequentialStep.after_prefill(mask, positions)
        next(decoder_calls(self.decoder, first, embeds, lambda call: None))  # warm-up (allocations, prepacking)
        self.prefill = next(decoder_calls(self.decoder, first, embeds, lambda call: None))
        self.prefill_s = self.prefill.seconds
        self.step_embeds = rng.standard_normal((64, 1, 1, dims.hidden_size)).astype(np.float32)
        self.round(2)  # warm the decode path

    def round(self, steps: int) -> list[float]:
        """Seconds inside each of `steps` decoder calls after the (kept) prefill; its cache list is not
        changed by the calls, so every round starts from the same prefill."""
        def next_embeds(call):
            return self.step_embeds[call.index % len(self.step_embeds)] if call.index < steps else None

        calls = self.decoder_calls(self.decoder, self.prefill.step, None, next_embeds, start=self.prefill)
        return [call.seconds for call in calls if call.index]


def with_accuracy_level(src: Path, level: int) -> Path:
    """A copy of an int4 MatMulNBits graph with accuracy_level set, sharing src's external data file."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
    dst = src.with_name(f"{src.stem}.al{level}.onnx")
    dst.write_bytes(model.SerializeToString())
    return dst


def _dims_of(path: Path):
    """The few dims DecodeBench needs, read back from an exported decoder's inputs."""
    import types

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    kv = inputs["past_key_values.0.key"]
    return types.SimpleNamespace(
        hidden_size=inputs["inputs_embeds"][2], num_kv_heads=kv[1], head_dim=kv[3],
        num_layers=sum(1 for n in inputs if n.endswith(".key")), vocab_size=32064, max_position_embeddings=2048,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant (median)")
    parser.add_argument("--compare-accuracy-levels", type=int, nargs="*", default=[0],
                        help="also time the int4 graph with these MatMulNBits accuracy_levels (same weights)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--layers", type=int, help="fewer decoder layers for a quick run (default: all 22)")
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--accuracy-level", type=int, default=4,
                        help="MatMulNBits accuracy_level of the int4 graph (4 = int8 compute on CPU, what "
                             "quantize_artifact writes for int4; 0 = unset, fp32 compute)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse --out's fp32/decoder.onnx from an earlier run instead of exporting again")
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.reuse and (work / "fp32" / "decoder.onnx").is_file():
            fp32, dims = work / "fp32" / "decoder.onnx", _dims_of(work / "fp32" / "decoder.onnx")
        else:
            fp32, dims = build_and_export(work, args.layers, args.opset)
        int4 = work / "int4" / "decoder.onnx"
        quant = quantize_int4(fp32, int4, args.block_size, args.quantize_lm_head, args.accuracy_level)
        from attanchor_export.export_cost import graph_bytes

        sizes = {"fp32_bytes": graph_bytes(fp32), "int4_bytes": graph_bytes(int4)}
        sizes["ratio"] = round(sizes["int4_bytes"] / sizes["fp32_bytes"], 3)
        print(f"size: fp32 {sizes['fp32_bytes'] / 2**20:.0f} MiB, int4 {sizes['int4_bytes'] / 2**20:.0f} MiB, "
              f"ratio {sizes['ratio']} (target <= 0.3)", flush=True)
        variants = {"fp32": fp32, "int4": int4}
        for level in args.compare_accuracy_levels:
            if level != args.accuracy_level:
                variants[f"int4-al{level}"] = with_accuracy_level(int4, level)
        # All sessions live at once and rounds interleave, so load from other processes on a shared
        # machine hits every variant alike; the figures are medians over rounds.
        benches = {name: DecodeBench(path, dims, args.threads, args.prompt_len) for name, path in variants.items()}
        per_round: dict[str, list[float]] = {name: [] for name in benches}
        for _ in range(args.rounds):
            for name, bench in benches.items():
                times = bench.round(args.decode_steps)
                per_round[name].append(len(times) / sum(times))
        speed = {
            name: {"decode_tok_s": round(float(np.median(per_round[name])), 2),
                   "decode_tok_s_rounds": [round(x, 2) for x in per_round[name]],
                   "prefill_s": round(bench.prefill_s, 2), "prefill_tokens": args.prompt_len,
                   "load_s": round(bench.load_s, 1)}
            for name, bench in benches.items()
        }
        speedups = {
            name: round(float(np.median(np.array(per_round[name]) / np.array(per_round["fp32"]))), 2)
            for name in benches if name != "fp32"
        }
        for name in benches:
            print(f"{name}: {speed[name]}", flush=True)
        for name, x in speedups.items():
            print(f"decode speed-up {name}/fp32 at {args.threads} threads: {x}x (target >= 3x)")
        print(f"load average: {os.getloadavg()}")
        figures = {
            "dims": {"layers": dims.num_layers, "hidden": dims.hidden_size, "vocab": dims.vocab_size},
            "threads": args.threads, "cpu_count": os.cpu_count(), "block_size": args.block_size,
            "lm_head_quantized": args.quantize_lm_head, "accuracy_level": args.accuracy_level,
            "quantize": quant, "size": sizes, "speed": speed, "speedup": speedups, "rounds": args.rounds,
            "decode_steps": args.decode_steps, "loadavg": os.getloadavg(),
        }
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
