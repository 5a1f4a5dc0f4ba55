"""The child side of scripts/bench_peers.py: `--child TASK --spec JSON` runs one runner or helper task and
prints its result as ONE JSON line carrying MARK (the parent reads it with common.parse_child_output)."""

from __future__ import annotations

import json
from pathlib import Path

from .chart import task_chart
from .common import MARK
from .gguf_tasks import task_gguf_bytes, task_gguf_convert, task_gguf_quantize
from .runners import run_bandwidth, run_genai, run_llama, run_project, run_transformers
from .systems import BANDWIDTH

CHILDREN = {"project": run_project, "transformers": run_transformers, "genai": run_genai, "llama": run_llama,
            BANDWIDTH: run_bandwidth, "gguf-convert": task_gguf_convert, "gguf-quantize": task_gguf_quantize,
            "gguf-bytes": task_gguf_bytes, "chart": task_chart}


def vm_hwm() -> int | None:
    """This process's peak resident set (VmHWM) in bytes: its own, unlike ru_maxrss of a forked child, which
    also counts the parent's pages at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_child_main(task: str, spec: dict) -> int:
    result = CHILDREN[task](spec)
    print(json.dumps({MARK: 1, "task": task, **result, "vm_hwm_bytes": vm_hwm()}), flush=True)
    return 0

