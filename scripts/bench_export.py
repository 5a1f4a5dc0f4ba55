"""What an export costs at real dimensions: peak RSS and wall time against the export targets.

    python scripts/bench_export.py --dims tinyllava-1b --ckpt-dtype fp32 [-- EXPORT OPTIONS...]
    python scripts/bench_export.py --dims llava-1.5-7b --ckpt-dtype fp16 -- --quant int4

Makes the random-weight checkpoint with scripts/make_random_checkpoint.py if it is absent, runs
`attanchor-export CHECKPOINT -o OUT --force EXPORT OPTIONS` in a child under /usr/bin/time -v, and
prints wall seconds, peak RSS (time's figure and the export's own manifest figure), the fp32 weight
bytes, their ratio, and each target met or not. Random weights: these are memory and time figures
only, never accuracy. Not run in CI (minutes to an hour, GBs of disk).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Targets: peak RSS as a multiple of the fp32 weight bytes (1B), or absolute (7B); wall seconds.
TARGETS = {
    "tinyllava-1b": {"peak_over_fp32_weights": 1.6, "seconds": 323},
    "llava-1.5-7b": {"peak_rss_gib": 20, "seconds": 3600},
}


def timed(argv: list[str]) -> dict:
    stats = Path(f"/tmp/bench-export-time-{time.time_ns()}.txt")
    time_bin = shutil.which("time") or "/usr/bin/time"
    cmd = [time_bin, "-v", "-o", str(stats), *argv] if Path(time_bin).exists() else argv
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    out = {"seconds": round(time.perf_counter() - t0, 1), "returncode": rc, "peak_rss_bytes": None}
    if stats.exists():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats.read_text())
        out["peak_rss_bytes"] = int(match.group(1)) * 1024 if match else None
        stats.unlink()
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=list(TARGETS), default="tinyllava-1b")
    parser.add_argument("--ckpt-dtype", choices=["fp16", "bf16", "fp32"], default="fp32")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or Path(f"/tmp/{args.dims}-random-{args.ckpt_dtype}")
    out = args.out or Path(f"/tmp/{args.dims}-export-{'-'.join(e.lstrip('-') for e in extra) or 'fp32'}")
    if not (checkpoint / "config.json").is_file():
        print(f"making {checkpoint}", flush=True)
        made = subprocess.run([sys.executable, str(HERE / "make_random_checkpoint.py"), "--dims", args.dims,
                               "--dtype", args.ckpt_dtype, "--out", str(checkpoint)])
        if made.returncode:
            return made.returncode
    exe = Path(sys.executable).with_name("attanchor-export")
    run = timed([str(exe), str(checkpoint), "-o", str(out), "--force", *extra])
    if run["returncode"]:
        print(f"export failed with exit code {run['returncode']}", file=sys.stderr)
        return run["returncode"]
    from attanchor_runtime.manifest import Manifest

    cost = Manifest.load(out, verify="none").export
    gib = 1 << 30
    peak = run["peak_rss_bytes"] or cost.peak_rss_bytes
    figures = {"dims": args.dims, "checkpoint_dtype": args.ckpt_dtype, "export_options": extra,
               "wall_seconds": run["seconds"], "peak_rss_bytes": peak, "manifest_export": cost.to_json(),
               "peak_over_fp32_weights": round(peak / cost.fp32_weight_bytes, 3)}
    target = TARGETS[args.dims]
    checks = {"seconds": run["seconds"] <= target["seconds"]}
    if "peak_over_fp32_weights" in target:
        checks["peak_over_fp32_weights"] = figures["peak_over_fp32_weights"] <= target["peak_over_fp32_weights"]
    if "peak_rss_gib" in target:
        checks["peak_rss_gib"] = peak / gib <= target["peak_rss_gib"]
    figures["targets"] = {k: {"target": target[k], "met": v} for k, v in checks.items()}
    print(f"{args.dims} ({args.ckpt_dtype} checkpoint) export {' '.join(extra) or '(fp32)'}:")
    print(f"  wall {run['seconds']:.0f} s (target <= {target['seconds']} s)")
    print(f"  peak RSS {peak / gib:.2f} GiB = {figures['peak_over_fp32_weights']:.2f}x the "
          f"{cost.fp32_weight_bytes / gib:.2f} GiB of fp32 weights (checkpoint {cost.checkpoint_weight_bytes / gib:.2f} "
          f"GiB, artifact {cost.artifact_bytes / gib:.2f} GiB)")
    for name, result in figures["targets"].items():
        print(f"  {name}: target {result['target']}: {'met' if result['met'] else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
