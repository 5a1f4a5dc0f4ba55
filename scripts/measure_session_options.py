"""onnxruntime session options A/B on one decoder: each variant in fresh processes, alternating, same prompt.

    python scripts/measure_session_options.py DECODER.onnx [--variant NAME=KEY=VALUE[,KEY=VALUE]] ...
        [--rounds 6] [--steps 64] [--prompt-len 512] [--threads 2] [--json OUT]

Why processes and not one: intra-op spinning is a property of a session's own thread pool, and two pools
in one process spin against each other (scripts/ab_decoders.py shares one pool for that reason). So every
round starts one child per variant, in an order rotated each round; a child opens the decoder with the
runtime's session options (attanchor_runtime.sessions) plus its variant's config entries, prefills
`--prompt-len` random embeddings, then times `--steps` cached decode steps with the runtime's decode loop
(scripts/ab_decoders.Decoder). Printed per variant: prefill s and decode ms/step (median over rounds), and
the median over rounds of its decode speed relative to the first variant in the same round.

Default variants: the runtime's options as shipped; intra-op spinning off; denormals flushed to zero; both.
Random inputs: speed only. Not in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "runtime")]

DEFAULT_VARIANTS = [
    "shipped=",
    "no-spin=session.intra_op.allow_spinning=0",
    "denormal-zero=session.set_denormal_as_zero=1",
    "no-spin+denormal-zero=session.intra_op.allow_spinning=0,session.set_denormal_as_zero=1",
]


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, entries = text.partition("=")
    config = {}
    for entry in filter(None, entries.split(",")):
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: variant {text!r}: each entry is KEY=VALUE")
        config[key] = value
    return name, config


def child(decoder: str, config: dict[str, str], args) -> dict:
    from ab_decoders import Decoder
    from attanchor_runtime.sessions import _options

    options = _options(args.threads, memory_arena=True)
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    start = time.perf_counter()
    stepper = Decoder(decoder, args.prompt_len, options=options)  # opens and prefills
    prefill_s = time.perf_counter() - start
    steps = [stepper.decode_step() for _ in range(args.steps)]
    return {"open_and_prefill_s": prefill_s, "step_ms": statistics.median(steps) * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder")
    parser.add_argument("--variant", action="append", help="NAME=KEY=VALUE[,KEY=VALUE] (repeatable)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.decoder, json.loads(args.child), args)))
        return 0
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for name, config in order:
            cmd = [sys.executable, __file__, args.decoder, "--child", json.dumps(config), "--steps", str(args.steps),
                   "--prompt-len", str(args.prompt_len), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"error: variant {name}: {done.stderr.strip().splitlines()[-1]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {runs[n][-1]['step_ms']:.2f} ms" for n, _ in variants),
              flush=True)
    first = variants[0][0]
    print(f"\n{args.decoder}: prompt {args.prompt_len}, {args.steps} decode steps per child, {args.threads} threads, "
          f"{args.rounds} rounds, order rotated every round")
    print("| variant | config entries | open + prefill s (median) | decode ms/step (median) | tok/s | "
          f"decode speed vs {first} (same rounds) |\n|---|---|---|---|---|---|")
    table = {}
    for name, config in variants:
        step = statistics.median(x["step_ms"] for x in runs[name])
        ratio = statistics.median(a["step_ms"] / b["step_ms"] for a, b in zip(runs[first], runs[name]))
        prefill = statistics.median(x["open_and_prefill_s"] for x in runs[name])
        table[name] = {"config": config, "step_ms": step, "open_and_prefill_s": prefill, "speed_vs_first": ratio}
        entries = ", ".join(f"{k}={v}" for k, v in config.items()) or "(as shipped)"
        print(f"| {name} | {entries} | {prefill:.2f} | {step:.2f} | {1e3 / step:.1f} | {ratio:.3f}x |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "table": table,
                                         "runs": runs}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
