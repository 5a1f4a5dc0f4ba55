"""How fast onnxruntime's MatMulNBits reads its weights in a decode step, per bits / block / accuracy level.

    python scripts/bench_matmul_nbits.py [--layers 8] [--rounds 5] [--threads 2] [--variants NAME,...]

A graph of `--layers` TinyLlama-1.1B-shaped layers of linears only (q, k, v, o, gate, up, down; hidden
2048, 4 KV heads of 64, intermediate 5632; random fp32 weights, ~1.4 GB at 8 layers, far more than the
caches), fed one token (M=1), as a decode step feeds them. Each variant is that graph with its linears
rewritten by the export's own writer (precision.streamed_weights.quantize_graph) and opened with the
runtime's session options (sessions.ort_session). Rounds are interleaved; printed per variant: median ms
per run, weight bytes, bytes read per second, and speed relative to the fp32 graph in the same rounds.
This is what picked the defaults: block 128, accuracy_level 4 for int4 and int8 (weights.py).
Random weights: speed only. Not in CI. Files go to --work (default /tmp/bench-matmul-nbits, ~2.5 GB).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from attanchor_runtime.sessions import ort_session
from onnx import TensorProto, helper, numpy_helper

from attanchor_export.precision.streamed_weights import linear_nodes, quantize_graph, save_beside

HIDDEN, KV, INTERMEDIATE = 2048, 256, 5632
# name: (bits, block, symmetric, accuracy_level)
VARIANTS = {
    "int4-b128-l4": (4, 128, False, 4), "int4-b64-l4": (4, 64, False, 4), "int4-b32-l4": (4, 32, False, 4),
    "int4-b256-l4": (4, 256, False, 4), "int4-b128-sym-l4": (4, 128, True, 4), "int4-b128-l0": (4, 128, False, 0),
    "int8-b128-l4": (8, 128, False, 4), "int8-b32-l4": (8, 32, False, 4), "int8-b128-l0": (8, 128, False, 0),
}


def linears_graph(path: Path, layers: int) -> None:
    """x -> per layer: q, k, v, o(q), gate, up, down(gate * up), x = o + down; k and v are outputs."""
    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    x = "x"

    def linear(name: str, source: str, k: int, n: int) -> str:
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [source, f"{name}.weight"], [name], name=name))
        return name

    for i in range(layers):
        p = f"layers.{i}."
        q = linear(p + "q", x, HIDDEN, HIDDEN)
        outputs += [linear(p + "k", x, HIDDEN, KV), linear(p + "v", x, HIDDEN, KV)]
        o = linear(p + "o", q, HIDDEN, HIDDEN)
        nodes.append(helper.make_node("Mul", [linear(p + "gate", x, HIDDEN, INTERMEDIATE),
                                              linear(p + "up", x, HIDDEN, INTERMEDIATE)], [p + "act"], name=p + "act"))
        down = linear(p + "down", p + "act", INTERMEDIATE, HIDDEN)
        nodes.append(helper.make_node("Add", [o, down], [p + "out"], name=p + "out"))
        x = p + "out"
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, HIDDEN])],
                              [value(x), *map(value, outputs)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def variant_graph(source: Path, target: Path, bits: int, block: int, symmetric: bool, level: int) -> None:
    model = ir.load(str(source))
    nodes, _ = linear_nodes(model.graph, True)
    quantize_graph(model, nodes, bits, block, symmetric=symmetric, qdq=False, accuracy_level=level)
    save_beside(model, target, 10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-matmul-nbits"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / f"fp32-{args.layers}layers.onnx"
    if not source.is_file():
        linears_graph(source, args.layers)
    files = {"fp32": source}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        target = args.work / f"{name}-{args.layers}layers.onnx"
        if not target.is_file():
            variant_graph(source, target, *VARIANTS[name])
        files[name] = target
    sessions = {name: ort_session(path, threads=args.threads) for name, path in files.items()}
    x = np.random.default_rng(1).standard_normal((1, 1, HIDDEN), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            for _ in range(3):
                session.run(None, {"x": x})
            start = time.perf_counter()
            for _ in range(args.runs):
                session.run(None, {"x": x})
            times[name].append((time.perf_counter() - start) / args.runs)
    print(f"{args.layers} layers of TinyLlama-1.1B linears, M=1, {args.threads} threads, {args.rounds} interleaved rounds")
    print("| variant | ms per run (median) | weight bytes | GB/s read | speed vs fp32 (same rounds) |\n|---|---|---|---|---|")
    for name, path in files.items():
        seconds = statistics.median(times[name])
        size = path.with_name(path.name + ".data").stat().st_size
        ratio = statistics.median(f / t for f, t in zip(times["fp32"], times[name]))
        print(f"| {name} | {seconds * 1e3:.2f} | {size / 1e6:.0f} MB | {size / seconds / 1e9:.1f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
