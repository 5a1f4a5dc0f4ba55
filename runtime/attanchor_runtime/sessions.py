"""Opening ONNX Runtime sessions with one set of defaults for the runtime, checks and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ArtifactError

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_session(path, device: str = "cpu", threads: int | None = None, memory_arena: bool = True,
                fold_constants: bool = True, profile: str | None = None):
    """memory_arena=False: give each run's buffers back instead of growing an arena (one-off checks on big
    models, where the arena's high-water mark would add to the export's peak memory).
    fold_constants=False: keep Cast(weight) nodes as runtime casts. The CPU provider has no fp16 MatMul,
    so it casts fp16 weights to fp32 and constant folding makes those fp32 copies permanent: 27 GB for a
    7B fp16 decoder. Unfolded, each cast lives only while its MatMul runs (slower, for one-off checks).
    profile: a file prefix for onnxruntime's per-node profiler (session.end_profiling() writes the JSON)."""
    import onnxruntime as ort

    if device not in _PROVIDERS:
        raise ArtifactError(f"unknown device {device!r}: choose one of {', '.join(_PROVIDERS)}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ArtifactError(
            "device 'cuda' needs onnxruntime-gpu: pip uninstall onnxruntime && pip install 'attanchor-export[gpu]'"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    options.enable_cpu_mem_arena = memory_arena
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, str(profile)
    threads = threads or int(os.environ.get("ATTANCHOR_THREADS", "0")) or None
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    path = Path(path)
    try:
        extra = {} if fold_constants else {"disabled_optimizers": ["ConstantFolding"]}
        return ort.InferenceSession(str(path), options, providers=_PROVIDERS[device], **extra)
    except Exception as e:  # onnxruntime raises its own untyped errors: keep the first line only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"onnxruntime cannot load {path.name}: {first}") from None
