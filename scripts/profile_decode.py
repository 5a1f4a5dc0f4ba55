"""Where a decode step's time goes: onnxruntime's profiler on an artifact's decoder, per op type.

    python scripts/profile_decode.py FOLDER [--prompt-len 512] [--steps 32] [--threads 2] [--levers all]
                                     [--json OUT]

FOLDER: an artifact, or a scripts/bench_peers.py build folder of this project (build.json: its decoder.onnx).
Opens the decoder the onnxruntime backend opens (the runtime's own session options), prefills
`--prompt-len` random embeddings, then profiles `--steps` cached decode steps fed exactly as the
runtime feeds them (its decode loop, decode.decoder_calls, on ort_backend.OrtDecoder: the fused form's
cache read in place from a KVBuffer). --levers: the runtime's decode-step levers, as in
scripts/ab_decoders.py: all (default, as the runtime runs: IO binding, the graph's greedy next_token
fetched instead of the logits), bind, greedy or none.
Prints, per decode step: wall ms, ms inside kernels, the gap between them (scheduling and per-node
overhead), nodes run, and each op type's ms and node count, largest first, with its share of the step. The prefill is profiled too and reported apart.
Random inputs: the figures are kernel times at the artifact's real dimensions, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from attanchor_runtime.decode import SequentialStep, decoder_calls  # noqa: E402
from attanchor_runtime.errors import ArtifactError  # noqa: E402
from attanchor_runtime.families import family_of  # noqa: E402
from attanchor_runtime.manifest import KV_CONCAT, Manifest  # noqa: E402
from attanchor_runtime.ort_backend import OrtDecoder  # noqa: E402
from attanchor_runtime.sessions import ort_session  # noqa: E402

LEVERS = {"none": (False, False), "bind": (True, False), "greedy": (False, True), "all": (True, True)}


def open_decoder(folder: Path, threads: int, profile: str):
    """(OrtDecoder, hidden size, first_step) of an artifact or of a bench_peers build folder."""
    if not (folder / "manifest.json").is_file() and (folder / "build.json").is_file():
        build = json.loads((folder / "build.json").read_text())
        session = ort_session(build["model"], "cpu", threads, profile=profile)
        decoder = OrtDecoder.of_session(session, build["dims"]["max_position_embeddings"],
                                        build.get("notes", {}).get("kv_cache", KV_CONCAT))
        return decoder, build["dims"]["hidden_size"], SequentialStep.after_prefill
    manifest = Manifest.load(folder)
    decoder = OrtDecoder.open(manifest, threads=threads, profile=profile)
    return decoder, manifest.dims.hidden_size, family_of(manifest).first_step


def run_profiled(folder: Path, prompt_len: int, steps: int, threads: int, seed: int = 0,
                 levers: str = "all") -> tuple[list, float]:
    prefix = Path(tempfile.mkdtemp(prefix="attanchor-profile-")) / "decoder"
    decoder, hidden, first_step = open_decoder(folder, threads, str(prefix))
    binds, greedy = LEVERS[levers]
    decoder.binds = decoder.binds and binds
    decoder.greedy_in_graph = greedy = decoder.greedy_in_graph and greedy
    rng = np.random.default_rng(seed)
    mask = np.ones((1, prompt_len), np.int64)
    first = first_step(mask, np.arange(prompt_len, dtype=np.int64)[None])

    def next_embeds(call):
        return rng.standard_normal((1, 1, hidden), dtype=np.float32) * 0.02 if call.index < steps else None

    calls = decoder_calls(decoder, first, rng.standard_normal((1, prompt_len, hidden), dtype=np.float32) * 0.02,
                          next_embeds, greedy=greedy)
    next(calls)  # the prefill
    started = time.perf_counter()
    for _ in calls:
        pass
    wall = time.perf_counter() - started
    trace = json.loads(Path(decoder.session.end_profiling()).read_text())
    shutil.rmtree(prefix.parent, ignore_errors=True)  # the trace (MBs per run) is read; leave nothing in /tmp
    return trace, wall


def summarize(trace: list, steps: int) -> dict:
    """Split the trace into its model runs (the first is the prefill) and total node time per op type."""
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]

    def window(run_events):
        by_op, count, inside = defaultdict(float), defaultdict(int), 0.0
        spans = [(r["ts"], r["ts"] + r["dur"]) for r in run_events]
        for e in nodes:
            if any(a <= e["ts"] <= b for a, b in spans):
                op = e.get("args", {}).get("op_name", "?")
                by_op[op] += e["dur"]
                count[op] += 1
                inside += e["dur"]
        n = max(1, len(run_events))
        wall = sum(r["dur"] for r in run_events) / n
        return {"wall_ms": wall / 1e3, "kernel_ms": inside / n / 1e3, "gap_ms": (wall - inside / n) / 1e3,
                "nodes": sum(count.values()) / n,
                "ops": {op: {"ms": by_op[op] / n / 1e3, "nodes": count[op] / n}
                        for op in sorted(by_op, key=by_op.get, reverse=True)}}

    return {"prefill": window(runs[:1]), "decode_step": window(runs[-steps:]), "decode_runs": len(runs[-steps:])}


def table(part: dict, title: str) -> str:
    lines = [f"{title}: {part['wall_ms']:.2f} ms wall, {part['kernel_ms']:.2f} ms in kernels, "
             f"{part['gap_ms']:.2f} ms between them, {part['nodes']:.0f} nodes"]
    for op, row in part["ops"].items():
        share = 100 * row["ms"] / part["wall_ms"] if part["wall_ms"] else 0
        lines.append(f"  {op:<36} {row['ms']:8.3f} ms  {share:5.1f}%  {row['nodes']:6.0f} nodes")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levers", choices=list(LEVERS), default="all")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        trace, wall = run_profiled(args.artifact, args.prompt_len, args.steps, args.threads, levers=args.levers)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = summarize(trace, args.steps)
    report.update(artifact=str(args.artifact), prompt_len=args.prompt_len, threads=args.threads, levers=args.levers,
                  decode_tok_s_profiled=args.steps / wall)
    print(table(report["prefill"], f"prefill ({args.prompt_len} tokens)"))
    print(table(report["decode_step"], f"decode step (mean of {report['decode_runs']}, profiler on: "
                                       f"{report['decode_tok_s_profiled']:.1f} tok/s)"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
