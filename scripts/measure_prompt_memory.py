"""Peak memory of one generate call against attanchor_runtime.prompt_cost's estimate, per prompt length.

    python scripts/measure_prompt_memory.py ARTIFACT [--lengths 500,1000,2000] [--new-tokens 2]

Each length runs in a fresh process: load the pipeline, warm it up on a short prompt, reset the
kernel's peak-RSS mark (/proc/self/clear_refs), run one prompt of that many token ids (threshold 2:
no anchors) on a blank image, and report the peak RSS growth (VmHWM) beside the estimate. Linux only.
Memory only: the token ids are one repeated id.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
import numpy as np
from attanchor_runtime import Pipeline
from attanchor_runtime import prompt_cost

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

folder, n, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = Pipeline.load(folder, verify="none", memory_budget=1024)
dims = pipe.manifest.dims
ids = np.full(n, 100, np.int64)
ids[1] = pipe.manifest.text.image_token_id
pixels = np.zeros((1, 3, dims.image_size, dims.image_size), np.float32)
pipe.generate(input_ids=[ids[:8]], pixel_values=pixels, max_new_tokens=2, threshold=2.0)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
start = time.perf_counter()
pipe.generate(input_ids=[ids], pixel_values=pixels, max_new_tokens=new, threshold=2.0)
seconds = time.perf_counter() - start
positions = n - 1 + dims.image_tokens
last_only = pipe.manifest.graphs.decoder.notes.last_logits_only
estimate = prompt_cost.prompt_bytes(dims, 1, positions, new, all_logits=not last_only)
print(json.dumps({"tokens": n, "positions": positions, "peak_growth_bytes": status("VmHWM") - base,
                  "estimate_bytes": estimate, "seconds": round(seconds, 2)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--lengths", default="500,1000,2000")
    parser.add_argument("--new-tokens", type=int, default=2)
    args = parser.parse_args()
    for n in (int(x) for x in args.lengths.split(",")):
        run = subprocess.run([sys.executable, "-c", CHILD, args.artifact, str(n), str(args.new_tokens)],
                             capture_output=True, text=True, check=True)
        row = json.loads(run.stdout.strip().splitlines()[-1])
        row["estimate_over_measured"] = round(row["estimate_bytes"] / max(1, row["peak_growth_bytes"]), 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
