"""What an export cost: wall time, peak resident memory and the weight bytes it handled.

Recorded in the manifest's "export" section and printed in the CLI summary, so a user can see what
exporting a model of a given size needs before trying a bigger one. Peak RSS is the process's
high-water mark (getrusage), which includes the interpreter, torch and onnxruntime themselves.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def checkpoint_weight_bytes(folder: Path) -> int:
    """Bytes of weight files in a checkpoint folder, as stored (fp16 shards count as they are on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def release_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and peak RSS is what users pay)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


class ExportCost:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.checkpoint: dict = {}

    def record_checkpoint(self, loaded) -> None:
        params = sum(p.numel() for p in loaded.model.parameters())
        self.checkpoint = {"parameters": params, "fp32_weight_bytes": 4 * params,
                           "checkpoint_weight_bytes": checkpoint_weight_bytes(loaded.folder)}

    def to_json(self, artifact: Path) -> dict:
        out = {
            "seconds": round(time.perf_counter() - self.started, 1),
            "peak_rss_bytes": peak_rss_bytes(),
            "artifact_bytes": sum(p.stat().st_size for p in Path(artifact).rglob("*") if p.is_file()),
            **self.checkpoint,
        }
        if self.checkpoint:
            out["peak_rss_over_fp32_weights"] = round(out["peak_rss_bytes"] / max(1, out["fp32_weight_bytes"]), 2)
        return out


def size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def describe(cost: dict) -> str:
    """One line for the CLI summary."""
    text = f"{cost['seconds']:.0f} s, peak RSS {size(cost['peak_rss_bytes'])}"
    if "fp32_weight_bytes" in cost:
        text += f" ({cost['peak_rss_over_fp32_weights']:.2f}x the {size(cost['fp32_weight_bytes'])} of fp32 weights)"
    return text + f", artifact {size(cost['artifact_bytes'])}"
