"""Step 4: the rounds. Every system and the bandwidth probe, each in a FRESH child process running
scripts/bench_peers.py --child, in a seeded order shuffled anew each round; one record per run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import MARK, SCRIPT, parse_child_output, say
from .systems import BANDWIDTH, System
from .venvs import peer_python


def fixed_prompt(length: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed + 1).integers(3, 32000, length).tolist()


def child_specs(systems: list[System], builds: dict, args, prompt: list[int], cache: Path) -> dict:
    specs = {}
    for s in systems:
        spec = {"model": builds[s.name]["model"], "prompt": prompt, "new_tokens": args.new_tokens,
                "threads": args.threads, "warmup": args.warmup}
        if s.family == "project":
            spec["dims"] = builds[s.name]["dims"]
            spec["embed"] = str(Path(builds[s.name]["model"]).with_name("embed_tokens.npy"))
            spec["kv_cache"] = builds[s.name].get("notes", {}).get("kv_cache")
            prefill = builds[s.name].get("notes", {}).get("prefill")  # --prefill-int8's prompt graph, if built
            spec["prefill"] = str(Path(spec["model"]).with_name(prefill["file"])) if prefill else None
        python = sys.executable if s.family in ("project", "transformers") else str(peer_python(cache))
        specs[s.name] = (spec, python, s.family)
    specs[BANDWIDTH] = ({"bytes": args.bandwidth_bytes, "repeats": 5}, sys.executable, BANDWIDTH)
    return specs


def run_child(cmd: list[str], log: Path, timeout: float, threads: int) -> tuple[int, str, int, float]:
    """(exit status, stdout, ru_maxrss in bytes, wall seconds); stderr goes to `log`. ru_maxrss is only the
    fallback figure for the child's peak RSS (see vm_hwm)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stdout, int(usage.ru_maxrss) * 1024, time.perf_counter() - t0


def run_record(name: str, round_no: int, rc: int, stdout: str, ru_maxrss: int, wall: float, log: Path) -> dict:
    """One measurement as the summary reads it: ok (exit 0 and a result line) with the child's figures, peak
    RSS (its VmHWM, else ru_maxrss), and where its log is."""
    result = parse_child_output(stdout) if rc == 0 else None
    run = {"system": name, "round": round_no, "returncode": rc, "ru_maxrss_bytes": ru_maxrss, "wall_s": round(wall, 2),
           "log": str(log), **({"ok": True, **result} if result else {"ok": False})}
    run.pop(MARK, None)
    run["peak_rss_bytes"] = run.get("vm_hwm_bytes") or ru_maxrss
    return run


def round_order(names: list[str], round_index: int, seed: int = 0) -> list[str]:
    """The order of one round: a seeded shuffle, different each round. Not a rotation: a rotation keeps
    every system behind the same neighbour, so whatever a neighbour leaves behind (a 4.7 GB fp32 process
    that just freed its memory) biases the same system every round. With rotation project-int4, always
    right after project-fp32, measured 0.87x the unfused int4 form; the two alone, 1.08x."""
    order = list(names)
    random.Random(f"{seed}-{round_index}").shuffle(order)
    return order


def measure(entries: list[str], specs: dict, args, cache: Path, log_dir: Path) -> list[dict]:
    """Every entry (systems + the bandwidth probe), `args.rounds` rounds, fresh child each, order shuffled."""
    runs = []
    for r in range(args.rounds):
        for name in round_order(entries, r, args.seed):
            spec, python, task = specs[name]
            log = log_dir / f"round{r + 1}-{name}.log"
            rc, stdout, rss, wall = run_child([python, str(SCRIPT), "--child", task, "--spec", json.dumps(spec)],
                                              log, args.child_timeout, args.threads)
            run = run_record(name, r + 1, rc, stdout, rss, wall, log)
            runs.append(run)
            if not run["ok"]:
                say(f"  round {r + 1} {name}: FAILED (exit {rc}); log: {log}")
            elif name == BANDWIDTH:
                say(f"  round {r + 1} {name}: {run['bytes_per_s'] / 1e9:.1f} GB/s ({run['method']})")
            else:
                say(f"  round {r + 1} {name}: prefill {run['prefill_s']:.2f} s, decode {run['decode_tok_s']:.1f} tok/s, "
                    f"peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB")
    return runs

