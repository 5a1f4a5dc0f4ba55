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
                profile: str | None = None, prepack: bool = True):
    """memory_arena=False: give each run's buffers back instead of growing an arena (one-off checks on big
    models, where the arena's high-water mark would add to the export's peak memory).
    profile: a file prefix for onnxruntime's per-node profiler (session.end_profiling() writes the JSON).
    prepack=False: constant weights are not repacked into the GEMM's layout when the session opens. For a
    session that runs a few calls (a parity check) that is time saved: a 1B fp32 decoder opens in 0.1 s
    instead of 6-9 s, and a second prompt run is 5-14% slower. A session that generates keeps it: its decode
    steps at batch 8 ran 1.5-1.9x slower without (scripts/measure_prepack.py)."""
    import onnxruntime as ort

    if device not in _PROVIDERS:
        raise ArtifactError(f"unknown device {device!r}: choose one of {', '.join(_PROVIDERS)}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ArtifactError(
            "device 'cuda' needs onnxruntime-gpu: pip uninstall onnxruntime && pip install 'attanchor-export[gpu]'"
        )
    options = _options(threads, memory_arena, profile, prepack)
    return _open(Path(path), str(path), options, _PROVIDERS[device])


def _options(threads: int | None, memory_arena: bool, profile: str | None = None, prepack: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    options.enable_cpu_mem_arena = memory_arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, str(profile)
    threads = threads or int(os.environ.get("ATTANCHOR_THREADS", "0")) or None
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # onnxruntime's pool threads spin between kernels by default: 1.1-1.45x faster decode on idle cores,
    # ~1.6x slower where other busy processes need those cores (docs/PERFORMANCE.md, Lever 4).
    spinning = os.environ.get("ATTANCHOR_ORT_SPINNING")
    if spinning is not None:
        if spinning not in ("0", "1"):
            raise ArtifactError(f"ATTANCHOR_ORT_SPINNING must be 0 or 1, not {spinning!r}")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    return options


def _open(path: Path, model, options, providers: list[str], **extra):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, options, providers=providers, **extra)
    except Exception as e:  # onnxruntime raises its own untyped errors: keep the first line only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"onnxruntime cannot load {path.name}: {first}") from None


class FedWeightsSession:
    """A CPU session of a graph with fp16 weights that never holds an fp32 copy of them.

    onnxruntime's CPU provider has no fp16 MatMul: when a session opens, it casts every fp16 initializer
    to fp32 and keeps that copy (2x the fp16 bytes, folding on or off; a 7B fp16 decoder needs ~40 GB).
    Here each fp16 weight in external data becomes a graph input, fed at every run straight from the
    memory-mapped data file, so the casts happen inside each run. Priority-based execution order runs
    each cast just before its MatMul: in the default order every cast goes first and all the fp32
    copies are alive at once. Graph optimizations are off: with them on, a 7B fp16 decoder's casts
    were again all alive at once (anonymous memory past 19 GiB within 35 s of a 16-token prefill,
    0.97 GiB peak with them off, 13 s). The graph's nodes and weight bytes are the file's; what it costs
    is time (every run widens every weight again), so it serves one-off checks and gates, not generation.
    Memory: the mapped fp16 bytes (page cache) plus about one widened weight.
    `run(output_names, feeds)` as InferenceSession's."""

    def __init__(self, path, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        self.weights: dict = {}  # graph input name -> np.memmap of the fp16 weight
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT16:
                mapped = _mapped_external(init, path.parent)
                if mapped is not None:
                    self.weights[init.name] = mapped
        kept = [init for init in model.graph.initializer if init.name not in self.weights]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for name, array in self.weights.items():
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT16, array.shape))
        options = _options(threads, memory_arena=False)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        # Opened from bytes: the other external initializers are found relative to the graph's folder.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        self.session = _open(path, model.SerializeToString(), options, _PROVIDERS["cpu"])

    def run(self, output_names, feeds: dict, run_options=None):
        return self.session.run(output_names, {**feeds, **self.weights}, run_options)

    def get_inputs(self):
        return [i for i in self.session.get_inputs() if i.name not in self.weights]

    def get_outputs(self):
        return self.session.get_outputs()

    def get_overridable_initializers(self):
        return self.session.get_overridable_initializers()


def has_external_fp16_weights(path) -> bool:
    """Whether the graph at `path` keeps fp16 initializers in external data: what FedWeightsSession feeds.
    A graph without them (fp32, int4, int8) gains nothing from that session and loses onnxruntime's graph
    optimizations, which on an int4 QDQ decoder include the DequantizeLinear + MatMul -> MatMulNBits fusion
    (without it every weight is dequantized at every step: decode steps 6-11x slower on tiny-vqa-qwen)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 and init.data_location == onnx.TensorProto.EXTERNAL
               for init in model.graph.initializer)


def _mapped_external(init, folder: Path):
    """A read-only numpy mapping of an initializer stored in external data, or None (stored inline)."""
    import numpy as np
    from onnx import TensorProto, helper

    info = {entry.key: entry.value for entry in init.external_data}
    if init.data_location != TensorProto.EXTERNAL or "location" not in info:
        return None
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    file = folder / info["location"]
    if not file.is_file():
        raise ArtifactError(f"{file.name} is missing: it holds the weights of {init.name}")
    shape = tuple(int(d) for d in init.dims)
    if not all(shape):  # numpy cannot map zero bytes
        return None
    return np.memmap(file, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)
