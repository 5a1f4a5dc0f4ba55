"""Where a decode step's time goes: onnxruntime's profiler on an artifact's decoder, per op type.

    python scripts/profile_decode.py ARTIFACT [--prompt-len 512] [--steps 32] [--threads 2] [--json OUT]

Opens the decoder the onnxruntime backend opens (the runtime's own session options), prefills
`--prompt-len` random embeddings, then profiles `--steps` cached decode steps fed exactly as the
runtime feeds them (decoder_feeds.Step; the fused form's cache read in place from ort_backend.KVBuffer).
Prints, per decode step: wall ms, ms inside kernels, the gap between them (scheduling and per-node
overhead), nodes run, and each op type's ms and node count, largest first, with its share of the step. The prefill is profiled too and reported apart.
Random inputs: the figures are kernel times at the artifact's real dimensions, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from attanchor_runtime.decoder_feeds import Step, empty_past, past_names, prefill_feeds, present_names  # noqa: E402
from attanchor_runtime.errors import ArtifactError  # noqa: E402
from attanchor_runtime.manifest import KV_APPEND, Manifest  # noqa: E402
from attanchor_runtime.ort_backend import KVBuffer, decode_append  # noqa: E402
from attanchor_runtime.sessions import ort_session  # noqa: E402


def run_profiled(folder: Path, prompt_len: int, steps: int, threads: int, seed: int = 0) -> tuple[list, float]:
    manifest = Manifest.load(folder)
    dims = manifest.dims
    prefix = Path(tempfile.mkdtemp(prefix="attanchor-profile-")) / "decoder"
    file = manifest.graph_file("decoder", "ort")
    session = ort_session(manifest.path(file), "cpu", threads, profile=str(prefix))
    rng = np.random.default_rng(seed)
    hidden = dims["hidden_size"]
    names = past_names(dims["num_layers"])
    if manifest.precision.kv_cache(file) == KV_APPEND:  # as OrtBackend decodes it: one buffer, read in place
        cache = KVBuffer(1, dims, np.float32, int(dims["max_position_embeddings"]))
        present = present_names(dims["num_layers"])

        def call(embeds, mask, positions):
            decode_append(session, names, present, embeds, mask, positions, cache)
    else:  # each call's present is the next call's past
        past = list(empty_past(dims, 1).values())

        def call(embeds, mask, positions):
            nonlocal past
            past = session.run(None, prefill_feeds(embeds, mask, positions, dict(zip(names, past))))[1:]

    mask = np.ones((1, prompt_len), np.int64)
    positions = np.arange(prompt_len, dtype=np.int64)[None]
    call(rng.standard_normal((1, prompt_len, hidden), dtype=np.float32) * 0.02, mask, positions)
    step = Step.after_prefill(mask, positions)
    started = time.perf_counter()
    for _ in range(steps):
        step = step.advance()
        call(rng.standard_normal((1, 1, hidden), dtype=np.float32) * 0.02, step.attention_mask, step.position_ids)
    wall = time.perf_counter() - started
    trace = json.loads(Path(session.end_profiling()).read_text())
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        trace, wall = run_profiled(args.artifact, args.prompt_len, args.steps, args.threads)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = summarize(trace, args.steps)
    report.update(artifact=str(args.artifact), prompt_len=args.prompt_len, threads=args.threads,
                  decode_tok_s_profiled=args.steps / wall)
    print(table(report["prefill"], f"prefill ({args.prompt_len} tokens)"))
    print(table(report["decode_step"], f"decode step (mean of {report['decode_runs']}, profiler on: "
                                       f"{report['decode_tok_s_profiled']:.1f} tok/s)"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
