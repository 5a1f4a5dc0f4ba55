"""What --prefill-int8 buys (docs/PERFORMANCE.md, Lever 6): one linear, then a whole artifact.

    python scripts/measure_prefill_int8.py                     # one 2048 x 5632 linear, 512 rows, 2 threads
    python scripts/measure_prefill_int8.py ARTIFACT [--rounds 5] [--questions 200]

    python scripts/measure_prefill_int8.py ARTIFACT --other PROMPT.onnx   # a second prompt graph beside it
    python scripts/measure_prefill_int8.py ARTIFACT --chunks 1,16 --prompts 1   # attention chunk counts

Without an artifact: the linear as fp32 MatMul, as MatMulNBits (int4, blocks of 128, accuracy level 4:
what the int4 decoder runs), and in the 8-bit forms onnxruntime has: DynamicQuantizeMatMul (one
activation scale per tensor); MatMulInteger with per-token scales, uint8 x int8 and int8 x int8, its
output widened and scaled by separate Cast and Mul nodes (Lever 6's first prompt graph); and the prompt
graph as `write_prefill_graph` writes it now (MatMulIntegerToFloat). Median of 7 runs each; TFLOP/s =
2 M K N / time; error = max |y - x W| / max |x W| against numpy fp32.

With an artifact exported with --prefill-int8: its prompts with and without the prompt graph (the same
decoder object, the prompt session switched), rotating the order, `--rounds` rounds of one prefill of a
batch of the artifact's gate questions; `--other FILE` adds another prompt graph of the same decoder
(written by write_prefill_graph into a copy of the folder, e.g. by an older or newer version), and
`--chunks 1,16` prompt graphs of the artifact's decoder with those attention chunk counts (Lever 8), each
written into a temporary folder beside a copy of the decoder (onnx reads no external data through a link);
`--prompts N` takes the first N gate prompts (batch N) instead of all of them; then,
with --questions N, the easy-vqa answers to the first N questions of the gate's validation split each
way (the model must be trained for answers to mean anything).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("", "graphs", "runtime")]


def _linear(m: int, k: int, n: int, threads: int) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from attanchor_export.precision.prefill_int8 import write_prefill_graph
    from attanchor_export.precision.streamed_weights import int8_weight

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    ref = x[0] @ weight

    def model(nodes, inits, opset=18):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                       helper.make_opsetid("com.microsoft", 1)])

    fp32 = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(weight, "W")])
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False, accuracy_level=4, bits=4)
    quantizer = MatMulNBitsQuantizer(copy.deepcopy(fp32), algo_config=config)
    quantizer.process()
    q, scale = int8_weight(weight)
    w8 = [numpy_helper.from_array(q, "W8"), numpy_helper.from_array(scale, "ws")]
    per_tensor = model([helper.make_node("DynamicQuantizeMatMul", ["x", "W8", "ws", "", ""], ["y"],
                                         domain="com.microsoft")], w8)

    def per_token(signed: bool):
        nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMax", ["a", "axes"], ["mx"], keepdims=1),
                 helper.make_node("Mul", ["mx", "inv"], ["s0"]), helper.make_node("Max", ["s0", "tiny"], ["s"]),
                 helper.make_node("Div", ["x", "s"], ["xs"]), helper.make_node("Round", ["xs"], ["xr"])]
        consts = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                  numpy_helper.from_array(np.array(1 / 127, np.float32), "inv"),
                  numpy_helper.from_array(np.array(1e-12, np.float32), "tiny")]
        if signed:
            nodes += [helper.make_node("Cast", ["xr"], ["xq"], to=TensorProto.INT8),
                      helper.make_node("MatMulInteger", ["xq", "W8"], ["acc"])]
        else:
            consts += [numpy_helper.from_array(np.array(128, np.float32), "c"),
                       numpy_helper.from_array(np.array(128, np.uint8), "zp")]
            nodes += [helper.make_node("Add", ["xr", "c"], ["xu"]),
                      helper.make_node("Cast", ["xu"], ["xq"], to=TensorProto.UINT8),
                      helper.make_node("MatMulInteger", ["xq", "W8", "zp"], ["acc"])]
        nodes += [helper.make_node("Cast", ["acc"], ["f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["f", "s"], ["y0"]), helper.make_node("Mul", ["y0", "ws"], ["y"])]
        return model(nodes, [*w8, *consts])

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(quantizer.model.model, f"{tmp}/d.onnx")
        write_prefill_graph(Path(tmp) / "d.onnx", Path(tmp) / "d.prefill.onnx")
        ours = onnx.load(f"{tmp}/d.prefill.onnx")  # its external data read in while the folder exists

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    print(f"one linear: M={m} rows, K={k}, N={n}, {threads} threads (median of 7)")
    print(f"{'form':56s} {'ms':>8s} {'TFLOP/s':>8s} {'error':>9s}")
    for name, form in (("fp32 MatMul", fp32), ("MatMulNBits int4, accuracy level 4", quantizer.model.model),
                       ("DynamicQuantizeMatMul (per-tensor uint8 x int8)", per_tensor),
                       ("MatMulInteger + Cast + Mul + Mul, per-token uint8 x int8", per_token(False)),
                       ("MatMulInteger + Cast + Mul + Mul, per-token int8 x int8", per_token(True)),
                       ("prompt graph (MatMulIntegerToFloat, per-token u8 x s8)", ours)):
        session = ort.InferenceSession(form.SerializeToString(), options, providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": x})[0]
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
        ms = float(np.median(times)) * 1e3
        error = float(np.abs(y[0] - ref).max() / np.abs(ref).max())
        print(f"{name:56s} {ms:8.1f} {2 * m * k * n / ms / 1e9:8.3f} {error:9.2g}")


def _artifact(folder: Path, rounds: int, questions: int, others: list[Path], threads: int, prompts: int | None,
              chunks: list[int], scratch: Path) -> None:
    from attanchor_runtime.manifest import Manifest
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.pipeline import Pipeline
    from attanchor_runtime.sessions import ort_session

    from attanchor_export.checks.task_accuracy import evaluate_artifact
    from attanchor_export.load.datasets import GATE_SPLIT, gate_samples, load_task
    from attanchor_export.precision.prefill_int8 import write_prefill_graph

    manifest = Manifest.load(folder)
    pipe = Pipeline(manifest, OrtBackend(manifest, threads=threads))
    decoder = pipe.backend.decoder
    prompt = decoder.prefill_session
    if prompt is None:
        sys.exit(f"{folder}: no prompt graph (export it with --prefill-int8)")
    systems = {"int4 decoder": None, "prompt graph": prompt}
    for other in others:
        systems[f"other: {other}"] = ort_session(other, "cpu", threads)
    for name in ("decoder.onnx", "decoder.onnx.data"):  # the onnxruntime decoder the prompt graph sits beside
        if chunks:  # a copy: onnx reads no external data through a symbolic or hard link
            shutil.copy(folder / name, scratch / name)
    for n in chunks:
        written = write_prefill_graph(scratch / "decoder.onnx", scratch / f"decoder.prefill_{n}.onnx", n)
        systems[f"{n} chunks"] = ort_session(scratch / written["file"], "cpu", threads)
    samples = gate_samples()[:prompts]
    front = pipe.front_end([pipe.prompt_ids(s.prompt) for s in samples],
                           np.concatenate([pipe.images(s.image) for s in samples]))
    step = pipe.family.first_step(front.attention_mask, front.position_ids)

    def prefill(session) -> float:
        decoder.prefill_session = session
        t0 = time.perf_counter()
        decoder.decode_next(front.inputs_embeds, step.attention_mask, step.position_ids, decoder.empty_cache(len(samples)))
        return time.perf_counter() - t0

    names = list(systems)
    for name in names:
        prefill(systems[name])  # warm-up
    times = {name: [] for name in names}
    ratios = {name: [] for name in names[1:]}
    for r in range(rounds):
        got = {}
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            got[name] = prefill(systems[name])
        for name in names:
            times[name].append(got[name])
        for name in names[1:]:
            ratios[name].append(got[name] / got[names[0]])
    positions = int(front.attention_mask.sum())
    print(f"{folder}: prefill of {len(samples)} gate prompts ({positions} positions), {rounds} rounds, rotating")
    for name, ts in times.items():
        print(f"  {name:18s} median {np.median(ts):.3f} s (min {min(ts):.3f}, max {max(ts):.3f})")
    for name, rs in ratios.items():
        print(f"  same-round ratio {name} / int4 decoder: median {np.median(rs):.3f}")
    for name in names[2:]:
        rs = [b / a for a, b in zip(times["prompt graph"], times[name], strict=True)]
        print(f"  same-round ratio {name} / prompt graph: median {np.median(rs):.3f}")
    if questions:
        items = load_task("easy-vqa", split=GATE_SPLIT, limit=questions)
        answers = {}
        for name in names:
            decoder.prefill_session = systems[name]
            result = evaluate_artifact(pipe, items)
            answers[name] = [r["answer"] for r in result["records"]]
            print(f"  {name:18s} easy-vqa {GATE_SPLIT} accuracy {result['accuracy']:.3f} over {len(items)}")
        for name in names[1:]:
            same = np.mean([a == b for a, b in zip(answers[names[0]], answers[name], strict=True)])
            print(f"  same answers as the int4 decoder, {name}: {same:.3f}")
    decoder.prefill_session = prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--questions", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--other", type=Path, action="append", default=[],
                        help="another prompt graph of the artifact's decoder, timed beside it (repeatable)")
    parser.add_argument("--chunks", type=lambda v: [int(n) for n in v.split(",")], default=[],
                        help="also time prompt graphs written with these attention chunk counts, e.g. 1,16")
    parser.add_argument("--prompts", type=int, default=None, help="the first N gate prompts only (default: all)")
    args = parser.parse_args()
    if args.artifact is None:
        _linear(512, 2048, 5632, args.threads)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            _artifact(args.artifact, args.rounds, args.questions, args.other, args.threads, args.prompts,
                      args.chunks, Path(scratch))


if __name__ == "__main__":
    main()
