"""Fake ``tensorrt`` and CUDA modules for CPU tests, in both TensorRT API generations.

    cuda = FakeCuda()
    trt = make_fake_trt(cuda, TRT10)     # "10.3.0.30": JetPack 6's TensorRT, the 10.x names
    trt = make_fake_trt(cuda, TRT11)     # "11.5.0": the names TensorRT 11.0 removed are absent

Just enough of the module for trt_build and trt_backend. The "engine" runs its ONNX file with
onnxruntime, reading and writing the "device" buffers the backend bound, and the fake enforces what
TensorRT enforces: shapes inside the context's profile, a range for every dynamic input in every
profile, no input/output aliasing, bounds-checked device memory. It says nothing about TensorRT's
own numerics.

The two generations differ where the real ones do (the 11.x migration guide's removed-API list):

* 10.x has BuilderFlag FP16/BF16/INT8/FP8/INT4/FP4, OBEY/PREFER_PRECISION_CONSTRAINTS and DIRECT_IO,
  ``Builder.platform_has_fast_fp16/int8``, ``IBuilderConfig.int8_calibrator`` and its quantization
  flags, the CUBLAS/CUBLAS_LT/CUDNN tactic sources. A network is weakly typed unless created with
  STRONGLY_TYPED, and a strongly typed network fails to build when a precision flag is set.
* 11.x has none of those: using one raises AttributeError, as on the real 11.x. Every network is
  strongly typed; STRONGLY_TYPED is still accepted and ignored (deprecated in 11.0), and
  ``strongly_typed_flag=False`` models a later release that drops the name.

Builds are recorded in ``trt.built`` (onnx path, flags set at build time, strongly typed or not) and
executions in ``trt.executions`` ((engine name, profile index)). ``fake = generations_fixture()`` in a
test module gives its tests a ``fake`` fixture: (fake tensorrt, fake cuda) of each generation in turn,
installed where attanchor_export.trt.build looks for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from attanchor_runtime.cuda_util import DeviceInfo

TRT10 = "10.3.0.30"
TRT11 = "11.5.0"
GENERATIONS = {"trt10": TRT10, "trt11": TRT11}  # pytest ids -> version, for parametrized fixtures

PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}


class FakeCuda:
    """Device memory as numpy byte arrays; pointers are ints; every access is bounds-checked."""

    stream = 7

    def __init__(self, sm=(8, 7)):
        self.mem: dict[int, np.ndarray] = {}
        self._next = 1 << 20
        self.sm = sm

    def device_info(self):
        return DeviceInfo(0, "Fake Orin", self.sm[0], self.sm[1], 8 << 30)

    def malloc(self, nbytes):
        ptr = self._next
        self._next += (max(int(nbytes), 1) // 256 + 2) * 256
        self.mem[ptr] = np.zeros(max(int(nbytes), 1), np.uint8)
        return ptr

    def free(self, ptr):
        del self.mem[ptr]

    def view(self, ptr, nbytes):
        for base, buf in self.mem.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return buf[ptr - base: ptr - base + nbytes]
        raise AssertionError(f"device access out of bounds: {ptr:#x}+{nbytes}")

    def htod(self, dst, array):
        if array.nbytes:
            self.view(dst, array.nbytes)[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    def dtoh(self, array, src):
        if array.nbytes:
            array.reshape(-1).view(np.uint8)[:] = self.view(src, array.nbytes)

    def dtoh_rows(self, array, src, src_pitch, row_bytes, rows):
        flat = array.reshape(-1).view(np.uint8)
        for r in range(rows):
            flat[r * row_bytes:(r + 1) * row_bytes] = self.view(src + r * src_pitch, row_bytes)

    def memset(self, dst, nbytes):
        if nbytes:
            self.view(dst, nbytes)[:] = 0

    def synchronize(self):
        pass


def _dims(shape):
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def _enums(trt, generation: int, strongly_typed_flag: bool) -> None:
    flags = ["TF32", "DEBUG", "REFIT", "SPARSE_WEIGHTS", "VERSION_COMPATIBLE", "STRIP_PLAN"]
    sources = ["EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"]
    creation = {"PREFER_AOT_PYTHON_PLUGINS": 2, "PREFER_JIT_PYTHON_PLUGINS": 3}
    if generation == 10:
        flags += [*PRECISION_FLAGS, "DIRECT_IO"]
        sources += ["CUBLAS", "CUBLAS_LT", "CUDNN"]
        creation["EXPLICIT_BATCH"] = 0
    if strongly_typed_flag:
        creation["STRONGLY_TYPED"] = 1  # kSTRONGLY_TYPED's value in NvInfer.h
    trt.BuilderFlag = SimpleNamespace(**{n: n for n in flags})
    trt.TacticSource = SimpleNamespace(**{n: n for n in sources})
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(**creation)
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    trt.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(ON_PROFILE_CHANGE="on_profile_change")
    trt.float32, trt.float16 = np.dtype(np.float32), np.dtype(np.float16)
    trt.nptype = lambda dtype: dtype


def make_fake_trt(cuda: FakeCuda, version: str = TRT10, strongly_typed_flag: bool = True):
    """A fake tensorrt module of `version`'s API generation (10 or 11, from the major version)."""
    generation = int(version.split(".")[0])
    assert generation in (10, 11), version
    assert strongly_typed_flag or generation == 11, "every 10.x has STRONGLY_TYPED"
    trt = SimpleNamespace(__version__=version)
    _enums(trt, generation, strongly_typed_flag)
    trt.built, trt.executions = [], []

    class Logger:
        WARNING = 2

        def __init__(self, level=2):
            pass

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            if generation == 11:
                self.strongly_typed = True  # the only kind 11.x has; the flag is ignored
            else:
                self.strongly_typed = bool(flags & (1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            self.path, self.inputs = None, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            model = onnx.load(path)  # reads the external data, as TensorRT's parser does
            inits = {i.name for i in model.graph.initializer}
            for vi in model.graph.input:
                if vi.name not in inits:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                                 for d in vi.type.tensor_type.shape.dim)
                    self.network.inputs.append(Tensor(vi.name, dims))
            self.network.path = path
            return True

    class Profile:
        def __init__(self, network):
            self.network, self.shapes = network, {}

        def set_shape(self, name, lo, opt, hi):
            shape = next(t.shape for t in self.network.inputs if t.name == name)
            assert len(lo) == len(opt) == len(hi) == len(shape), name
            for fixed, a, b, c in zip(shape, lo, opt, hi):
                assert 0 <= a <= b <= c, (name, lo, opt, hi)
                assert fixed < 0 or a == b == c == fixed, (name, shape, lo, hi)
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Config:
        # Real bindings reject an attribute the class does not have (`config.int8_calibrator = ...` on
        # 11.x raises AttributeError); __slots__ makes the fake do the same instead of storing it.
        __slots__ = ("flags", "profiles", "cache", "limits", "builder_optimization_level")

        def __init__(self):
            self.flags = {trt.BuilderFlag.TF32}  # TensorRT enables TF32 by default
            self.profiles, self.cache, self.limits = [], None, {}
            self.builder_optimization_level = 3

        def set_memory_pool_limit(self, pool, size):
            self.limits[pool] = size

        def set_flag(self, flag):
            assert flag in vars(trt.BuilderFlag).values()
            self.flags.add(flag)

        def clear_flag(self, flag):
            assert flag in vars(trt.BuilderFlag).values()
            self.flags.discard(flag)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Config10(Config):
        """The calibrator API 11.x removed (weakly typed INT8 only)."""

        __slots__ = ("int8_calibrator",)

        def __init__(self):
            super().__init__()
            self.int8_calibrator = None

        def set_quantization_flag(self, flag):
            pass

    class Builder:
        def __init__(self, logger):
            self._network = None

        def create_network(self, flags=0):
            self._network = Network(flags)  # TensorRT ties profiles to the builder; the fake to its last network
            return self._network

        def create_builder_config(self):
            return Config10() if generation == 10 else Config()

        def create_optimization_profile(self):
            return Profile(self._network)

        def build_serialized_network(self, network, config):
            dynamic = [t.name for t in network.inputs if any(d < 0 for d in t.shape)]
            for profile in config.profiles:
                if set(profile.shapes) != set(dynamic):
                    return None  # TensorRT: every dynamic input needs a range in every profile
            if network.strongly_typed and config.flags & set(PRECISION_FLAGS):
                return None  # 10.x: precision flags are an API usage error on a strongly typed network
            trt.built.append({"path": network.path, "flags": sorted(config.flags),
                              "strongly_typed": network.strongly_typed})
            return json.dumps({"onnx": network.path, "profiles": [p.shapes for p in config.profiles]}).encode()

    if generation == 10:
        Builder.platform_has_fast_fp16 = Builder.platform_has_fast_int8 = Builder.platform_has_tf32 = True

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addr, self._out = engine, 0, {}, {}, None

        def set_optimization_profile_async(self, index, stream):
            assert 0 <= index < len(self.engine.profiles)
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profiles[self.profile][name]
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name], self._out = tuple(shape), None
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            if name in self.engine.inputs:
                self._out = None
            return True

        def _input_shape(self, name):
            shape = self.shapes.get(name, self.engine.shapes[name])
            assert all(d >= 0 for d in shape), f"{name}: shape not set"
            return shape

        def _run(self):
            if self._out is None:
                feeds = {}
                for name in self.engine.inputs:
                    shape, dtype = self._input_shape(name), self.engine.dtypes[name]
                    array = np.zeros(shape, dtype)
                    if array.nbytes:
                        cuda.dtoh(array, self.addr[name])
                    feeds[name] = array
                self._out = dict(zip(self.engine.outputs, self.engine.session.run(self.engine.outputs, feeds)))
            return self._out

        def get_tensor_shape(self, name):
            if name in self.engine.inputs:
                return self.shapes.get(name, self.engine.shapes[name])
            return self._run()[name].shape

        def execute_async_v3(self, stream):
            assert stream == cuda.stream
            out = self._run()
            spans = {n: (self.addr[n], np.prod(self._input_shape(n), dtype=np.int64) * self.engine.dtypes[n].itemsize)
                     for n in self.engine.inputs}
            for name, value in out.items():
                ptr = self.addr[name]
                for other, (start, size) in spans.items():
                    assert not (size and value.nbytes and start < ptr + value.nbytes and ptr < start + size), \
                        f"output {name} aliases input {other}"
                cuda.htod(ptr, np.ascontiguousarray(value))
            self._out = None
            trt.executions.append((self.engine.name, self.profile))
            return True

    class Engine:
        def __init__(self, data):
            spec = json.loads(bytes(data))
            self.name = Path(spec["onnx"]).name
            self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.profiles = spec["profiles"]
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]
            ios = [*self.session.get_inputs(), *self.session.get_outputs()]
            self.dtypes = {i.name: np.dtype(_ORT_TYPES[i.type]) for i in ios}
            self.shapes = {i.name: _dims(i.shape) for i in ios}
            self.names = self.inputs + self.outputs
            self.num_io_tensors = len(self.names)
            self.num_optimization_profiles = len(self.profiles)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def get_tensor_shape(self, name):
            return self.shapes[name]

        def create_execution_context(self, strategy=None):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(data)

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, OnnxParser, Builder, Runtime
    return trt


# ---- pytest wiring ------------------------------------------------------------------------------------
def install(monkeypatch, trt, cuda):
    """Make attanchor_export.trt.build use these fakes instead of importing tensorrt and cuda-python."""
    from attanchor_export.trt import build

    monkeypatch.setattr(build, "require_tensorrt", lambda folder: (trt, cuda))
    return trt, cuda


def generations_fixture():
    """A `fake` fixture for a test module: (fake tensorrt, fake cuda) of each API generation, installed."""

    @pytest.fixture(params=list(GENERATIONS.values()), ids=list(GENERATIONS))
    def fake(request, monkeypatch):
        cuda = FakeCuda()
        return install(monkeypatch, make_fake_trt(cuda, request.param), cuda)

    return fake
