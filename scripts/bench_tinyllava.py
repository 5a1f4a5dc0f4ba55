"""The TinyLLaVA-1B benchmark in one command: its dimensions, random weights, fp32, 2 threads.

    python scripts/bench_tinyllava.py [--threads 2] [--repeats 3] [--json out.json] [--chart out.png]

1. makes the random-weight checkpoint (scripts/make_random_checkpoint.py --dims tinyllava-1b) if it is absent;
2. exports it (validation against PyTorch on, last-position logits, decoder graph optimised by
   attanchor_export.trace.optimize and checked against the un-optimised graph) in a child process, and
   records the export's wall time and peak RSS (/usr/bin/time -v, else getrusage of the child);
3. runs attanchor_export.bench.run_bench with compare_torch at the given threads and prints the
   figures and the targets: decode tok/s >= 1.3x torch eager and >= 85% of the memory-bandwidth
   bound; TTFT <= 1.0x torch eager (576 image tokens + ~40-50 text tokens); AnchorInsert <= 0.5% of
   TTFT; Python overhead per decode step <= 5%.

Heavy: ~6 GB of RAM for the checkpoint, ~12 GB for the export with validation, ~11 GB for the bench
(runtime and torch models side by side), ~15 GB of disk under /tmp. On a shared machine take a lock
(`flock /tmp/heavy.lock python scripts/bench_tinyllava.py`) and keep --quiet-wait: every measured run
first waits (up to that many seconds) for other processes to leave the CPU idle, and the report
prints how much CPU they used meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKPOINT = Path("/tmp/tinyllava-1b-random")
ARTIFACT = Path("/tmp/tinyllava-1b-onnx")


def run_child(argv: list[str]) -> dict:
    """Run a child process, streaming its output; returns wall seconds and its peak RSS."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    stats_file = None
    cmd = list(argv)
    if time_bin:
        stats_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-tinyllava-time-{os.getpid()}.txt"
        cmd = [time_bin, "-v", "-o", str(stats_file), *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    seconds = time.perf_counter() - t0
    peak = None
    if stats_file is not None and stats_file.exists():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats_file.read_text())
        peak = int(match.group(1)) * 1024 if match else None
        stats_file.unlink()
    if peak is None:  # the largest child so far; exact when this is the largest one
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak = after * 1024 if after > before else None
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed with exit code {proc.returncode}")
    return {"seconds": seconds, "peak_rss_bytes": peak}


def export_child(checkpoint: str, output: str) -> None:
    """Child: export with validation, then make sure the decoder is optimised (parity-checked)."""
    import contextlib
    import dataclasses

    from attanchor_runtime.manifest import Manifest, Optimizations, write_manifest

    from attanchor_export.exporter import ExportOptions, export_artifact
    from attanchor_export.trace.optimize import optimize_decoder

    @contextlib.contextmanager
    def steps(name):
        t0 = time.perf_counter()
        print(f"  {name} ...", flush=True)
        yield
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    result = export_artifact(checkpoint, ExportOptions(output=Path(output), last_logits_only=True, force=True),
                             steps)
    checks = result.checks
    worst = max((c.value for c in checks if "diff" in c.metric), default=None)
    print(f"  validation: {sum(c.passed for c in checks)}/{len(checks)} checks passed, worst diff {worst}",
          flush=True)
    manifest = Manifest.load(output, verify="none")
    if not manifest.optimizations.decoder:
        # An artifact exported with --no-optimize: rewrite it here, checked against the graph that was
        # just validated against PyTorch.
        with steps("optimize decoder graph (+ parity vs the validated graph)"):
            report = optimize_decoder(manifest.graph_path("decoder"), manifest.dims, check=True)
        print(f"  optimize: {report['attention']['layers']} attention layers rewritten, parity "
              f"{report['parity']['max_abs_diff']:.3g}", flush=True)
        with steps("rewrite manifest"):
            write_manifest(dataclasses.replace(manifest, optimizations=Optimizations(decoder=report)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--artifact", type=Path, default=ARTIFACT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threshold", default="auto",
                        help='"auto" (~10%% of text tokens become anchors, as in the paper), "default" or a number')
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait for an idle CPU before each measured run (0: do not wait)")
    parser.add_argument("--reexport", action="store_true", help="export again even if the artifact exists")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--json", type=Path, default=Path("/tmp/tinyllava-1b-bench.json"))
    parser.add_argument("--chart", type=Path, default=Path("/tmp/tinyllava-1b-bench.png"))
    parser.add_argument("--_export-child", nargs=2, metavar=("CHECKPOINT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._export_child:
        export_child(*args._export_child)
        return 0

    figures = {}
    if not (args.checkpoint / "config.json").is_file():
        print(f"[1/3] making the random-weight checkpoint at {args.checkpoint}", flush=True)
        figures["make_checkpoint"] = run_child(
            [sys.executable, str(HERE / "make_random_checkpoint.py"), "--dims", "tinyllava-1b", "--dtype", "fp32",
             "--out", str(args.checkpoint)])
    else:
        print(f"[1/3] checkpoint {args.checkpoint} exists", flush=True)

    if args.reexport or not (args.artifact / "manifest.json").is_file():
        print(f"[2/3] exporting to {args.artifact} (validation on)", flush=True)
        figures["export"] = run_child([sys.executable, str(Path(__file__).resolve()), "--_export-child",
                                       str(args.checkpoint), str(args.artifact)])
        print(f"  export: {figures['export']['seconds']:.0f} s, peak RSS "
              f"{(figures['export']['peak_rss_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
    else:
        print(f"[2/3] artifact {args.artifact} exists (--reexport to redo it)", flush=True)

    print(f"[3/3] bench: threads={args.threads}, repeats={args.repeats}, compare_torch={not args.no_torch}",
          flush=True)
    from attanchor_export.bench import format_report, run_bench, write_chart

    threshold = None if args.threshold == "default" else (args.threshold if args.threshold == "auto"
                                                           else float(args.threshold))
    result = run_bench(args.artifact, max_new_tokens=args.max_new_tokens, threads=args.threads,
                       compare_torch=not args.no_torch, repeats=args.repeats, threshold=threshold,
                       quiet_wait=args.quiet_wait, progress=lambda m: print(f"  {m}", flush=True))
    result["build"] = figures
    from attanchor_runtime.manifest import Manifest

    manifest = Manifest.load(args.artifact, verify="none")
    result["artifact"] = {
        "optimizations": manifest.optimizations.to_json(),
        "last_logits_only": manifest.graphs.decoder.notes.last_logits_only,
        "validation_passed": manifest.validation.passed if manifest.validation else None,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    write_chart(result, args.chart)

    print()
    print(format_report(result))
    for name, fig in figures.items():
        print(f"  {name:28s} {fig['seconds']:.0f} s, peak RSS {(fig['peak_rss_bytes'] or 0) / 2**30:.2f} GiB")
    art = result["artifact"]
    print(f"  artifact: last-position logits {art['last_logits_only']}, validation passed "
          f"{art['validation_passed']}, decoder optimised "
          f"{bool((art['optimizations'] or {}).get('decoder'))}")
    print(f"\n  wrote {args.json} and {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
