"""What onnxruntime's weight prepacking costs and gives on a float decoder: session open, prompt runs and
decode steps, with it (the default) and without (`sessions.ort_session(prepack=False)`, what parity checks
open their graphs with).

    python scripts/measure_prepack.py FOLDER [--prompt-len 600] [--steps 5] [--threads 2]

FOLDER: an fp32 artifact (its decoder.onnx; e.g. `attanchor-export CKPT -o OUT --no-validate`). Each
setting runs in a fresh process, one after the other, twice (A B A B), sessions without the arena as
validation opens them. Printed per run: seconds to open the session, two prompt runs of `--prompt-len`
positions (batch 1), and the median of `--steps` decode steps at batch 1 and at batch 8 over a past of
`--prompt-len` positions. Random inputs: speed only. Not in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def feeds(session, batch: int, new: int, past: int, hidden: int, kv_heads: int, head_dim: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for i in session.get_inputs():
        if i.name == "inputs_embeds":
            out[i.name] = rng.standard_normal((batch, new, hidden)).astype(np.float32)
        elif i.name == "attention_mask":
            out[i.name] = np.ones((batch, past + new), np.int64)
        elif i.name == "position_ids":
            out[i.name] = np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(np.int64)
        elif i.name.startswith("past_key_values."):
            out[i.name] = rng.standard_normal((batch, kv_heads, past, head_dim)).astype(np.float32)
        elif i.name == "logits_to_keep":
            out[i.name] = np.array(1, np.int64)
    return out


def one_run(folder: Path, prepack: bool, prompt_len: int, steps: int, threads: int) -> dict:
    from attanchor_runtime.manifest import Manifest
    from attanchor_runtime.sessions import ort_session

    manifest = Manifest.load(folder)
    dims = manifest.dims
    start = time.perf_counter()
    session = ort_session(manifest.path(manifest.graphs.decoder.file), threads=threads, memory_arena=False,
                          prepack=prepack)
    opened = time.perf_counter() - start
    shape = (dims.hidden_size, dims.num_kv_heads, dims.head_dim)
    prompt = feeds(session, 1, prompt_len, 0, *shape)
    prompt_runs = []
    for _ in range(2):
        start = time.perf_counter()
        session.run(None, prompt)
        prompt_runs.append(time.perf_counter() - start)
    decode = {}
    for batch in (1, 8):
        step = feeds(session, batch, 1, prompt_len, *shape)
        times = []
        for _ in range(steps + 1):  # the first step of a shape is not counted
            start = time.perf_counter()
            session.run(None, step)
            times.append(time.perf_counter() - start)
        decode[batch] = statistics.median(times[1:])
    return {"prepack": prepack, "open": opened, "prompt": prompt_runs, "decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-len", type=int, default=600)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.folder, args.child == "on", args.prompt_len, args.steps, args.threads)))
        return
    print("| prepacking | open s | prompt run 1 s | prompt run 2 s | decode step, batch 1 ms | "
          "decode step, batch 8 ms |")
    print("|---|---|---|---|---|---|")
    for setting in ("on", "off", "on", "off"):  # fresh processes: the page cache is the only thing shared
        command = [sys.executable, __file__, str(args.folder), "--child", setting, "--prompt-len",
                   str(args.prompt_len), "--steps", str(args.steps), "--threads", str(args.threads)]
        r = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {setting} | {r['open']:.2f} | {r['prompt'][0]:.2f} | {r['prompt'][1]:.2f} | "
              f"{r['decode']['1'] * 1e3:.0f} | {r['decode']['8'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
