"""scripts/bench_peers.py's command line: the options, and a run top to bottom (checkpoint, peers venv, builds,
rounds, summary, table, --json, --chart); `--child` hands over to child.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __doc__ as PACKAGE_DOC
from .build import build
from .chart import save_chart
from .checkpoint import checkpoint
from .child import run_child_main
from .common import DEFAULT_CACHE, BenchError, say
from .rounds import child_specs, fixed_prompt, measure
from .stats import summarize
from .systems import BANDWIDTH, BY_NAME, GENAI_VERSION, LLAMA_CPP_VERSION, SYSTEMS
from .table import format_table
from .venvs import ensure_peers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=PACKAGE_DOC.splitlines()[0])
    parser.add_argument("--dims", choices=["tinyllava-1b", "small"], default="tinyllava-1b")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed after the first token")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default=",".join(s.name for s in SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(s.name for s in SYSTEMS)}")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("ATTANCHOR_PEERS_CACHE", DEFAULT_CACHE)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed generates in each child before the timed one")
    parser.add_argument("--bandwidth-bytes", type=int, default=1 << 30)
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chart", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child_main(args.child, json.loads(args.spec))
    wanted = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise BenchError(f"unknown system(s) {', '.join(unknown)}: choose from {', '.join(BY_NAME)}")
    systems = [BY_NAME[n] for n in wanted]
    cache = args.cache.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    ckpt = checkpoint(cache, args.dims, args.seed)
    ensure_peers(cache, {s.family for s in systems}, chart=bool(args.chart))
    builds = {s.name: build(s, cache, ckpt, args.dims, args.seed) for s in systems}
    say(f"checkpoint and systems ready in {time.perf_counter() - t0:.0f} s (cache {cache})")

    prompt = fixed_prompt(args.prompt_len, args.seed)
    specs = child_specs(systems, builds, args, prompt, cache)
    log_dir = cache / "logs" / time.strftime("run-%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True)
    say(f"{args.rounds} rounds of {len(specs)} fresh processes, {args.threads} threads, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens (child logs: {log_dir})")
    runs = measure([s.name for s in systems] + [BANDWIDTH], specs, args, cache, log_dir)
    summary = summarize(runs, builds, labels={s.name: s.label for s in systems})
    table = format_table(summary, args.prompt_len)
    say("\n" + table)

    settings = {"dims": args.dims, "seed": args.seed, "rounds": args.rounds, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "threads": args.threads, "warmup": args.warmup,
                "cpu_count": os.cpu_count(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "versions": {"onnxruntime-genai": GENAI_VERSION, "llama-cpp-python": LLAMA_CPP_VERSION}}
    result = {"settings": settings, "summary": summary, "builds": builds, "runs": runs, "table": table}
    if args.json:
        write_json(args.json, result)
        say(f"wrote {args.json}")
    if args.chart:
        save_chart(result, args.chart, cache, args.json)
        say(f"wrote {args.chart}")
    return 0


def write_json(path: Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

