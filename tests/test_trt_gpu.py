"""TensorRT engines and the trt backend.

Three parts:
* CPU, always: the one-line errors without tensorrt (`build`, `--trt`, `--backend trt`), engine
  folder selection and refusal, profile selection, KV buffer math.
* CPU, always: `build_engines` and `TrtBackend` driven end to end against fake `tensorrt` and CUDA
  modules. The fake engine runs the ONNX graph with onnxruntime, reading and writing the "device"
  buffers the backend bound, and enforces what TensorRT enforces (shapes inside the context's
  profile, every dynamic input in every profile, no input/output aliasing). This exercises the
  binding, profile switching, ping-pong KV cache, last-position logits copy and the gate without
  a GPU; it cannot say anything about TensorRT's own numerics.
* GPU (`-m gpu`): real engines for a tiny artifact, the gate, and trt-vs-onnxruntime parity.
  Skipped with a reason when tensorrt, cuda-python or a CUDA GPU is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from attanchor_runtime.cuda_util import DeviceInfo
from attanchor_runtime.errors import ArtifactError, RuntimeInputError
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.trt_backend import (
    KVCache,
    engine_mismatch,
    find_engine_dir,
    kv_buffer_bytes,
    select_profile,
)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


# ---- fakes ------------------------------------------------------------------------------------------
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


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}


def _dims(shape):
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def make_fake_trt(cuda: FakeCuda, version="10.3.0.30"):
    """Just enough of the tensorrt module for trt_build and trt_backend."""
    trt = SimpleNamespace(__version__=version)
    trt.float32 = np.dtype(np.float32)
    trt.nptype = lambda dtype: dtype
    trt.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.BuilderFlag = SimpleNamespace(**{n: n for n in ("FP16", "TF32", "OBEY_PRECISION_CONSTRAINTS", "INT8")})
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    trt.LayerType = SimpleNamespace(SHAPE=1, CONSTANT=2, CAST=3, IDENTITY=4)
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(ON_PROFILE_CHANGE="on_profile_change")
    trt.built = []

    class Logger:
        WARNING = 2

        def __init__(self, level=2):
            pass

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.strongly_typed, self.path, self.inputs, self.num_layers = bool(flags & 1), None, [], 0

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
        def __init__(self):
            self.flags, self.profiles, self.cache, self.limits = set(), [], None, {}
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

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile(self._network)

        def build_serialized_network(self, network, config):
            dynamic = [t.name for t in network.inputs if any(d < 0 for d in t.shape)]
            for profile in config.profiles:
                if set(profile.shapes) != set(dynamic):
                    return None  # TensorRT: every dynamic input needs a range in every profile
            trt.built.append({"path": network.path, "flags": sorted(config.flags),
                              "strongly_typed": network.strongly_typed})
            return json.dumps({"onnx": network.path, "profiles": [p.shapes for p in config.profiles]}).encode()

    # create_optimization_profile needs the network: TensorRT ties it to the builder, the fake to the last network.
    original = Builder.create_network

    def create_network(self, flags):
        self._network = original(self, flags)
        return self._network

    Builder.create_network = create_network

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
    trt.executions = []
    return trt


@pytest.fixture
def fake(monkeypatch):
    """(fake tensorrt, fake cuda), installed where trt_build looks for them."""
    from attanchor_export import trt_build

    cuda = FakeCuda()
    trt = make_fake_trt(cuda)
    monkeypatch.setattr(trt_build, "require_tensorrt", lambda folder: (trt, cuda))
    return trt, cuda


@pytest.fixture
def workdir(artifact, tmp_path):
    """copy(name) -> a private copy of a shared artifact (builds write engines/ into it)."""

    def copy(name="clip-t2i"):
        dst = tmp_path / name
        shutil.copytree(artifact(name), dst)
        return dst

    return copy


def _ids(folder, rows=((5, 6), (7,))):
    text = json.loads((folder / "manifest.json").read_text())["text"]
    return [np.array([text["bos_token_id"], text["image_token_id"], *r, 9, 10], np.int64) for r in rows]


def _pixels(folder, batch, seed=0):
    size = json.loads((folder / "manifest.json").read_text())["dims"]["image_size"]
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


# ---- CPU: fake tensorrt, end to end ------------------------------------------------------------------
@pytest.mark.parametrize(("name", "empty_past"), [("clip-t2i", "zero"), ("siglip-t2i-k4", "masked-slot")])
def test_build_and_generate_with_fake_tensorrt(fake, workdir, name, empty_past):
    from attanchor_runtime import Pipeline
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.trt_backend import TrtBackend

    from attanchor_export.trt_build import build_engines

    trt, cuda = fake
    folder = workdir(name)
    result = build_engines(folder, max_batch=2, max_input_len=64, max_seq_len=96, empty_past=empty_past)
    assert result.engine_dir == folder / "engines" / "fake-orin-sm87-trt10.3.0.30"
    meta = json.loads((result.engine_dir / "engine.json").read_text())
    assert meta["gate"]["passed"], meta["gate"]
    assert {c["case"] for c in meta["gate"]["checks"] if c["graph"] == "decoder"} == {"prefill", "decode step"}
    assert meta["sm"] == "87" and meta["tensorrt"] == "10.3.0.30" and meta["compute_capability"] == "8.7"
    files = Manifest.load(folder).data["files"]
    for record in meta["engines"].values():
        for source, digest in record.get("sources", {}).items():
            assert files[source]["sha256"] == digest
    assert (result.engine_dir / "timing.cache").is_file()
    assert all(b["flags"] == [] for b in trt.built)  # fp32: TF32 cleared, nothing set
    assert not list((folder / "engines").glob(".*"))  # no staging left behind
    has_k = name.endswith("k4")
    assert (meta["engines"]["embedding"]["backend"] == "tensorrt") is has_k

    manifest = Manifest.load(folder)
    trt_pipe = Pipeline(manifest, TrtBackend(manifest, trt=trt, cuda=cuda))
    ort_pipe = Pipeline(manifest, OrtBackend(manifest))
    ids, pixels = _ids(folder), _pixels(folder, 2)
    trt.executions.clear()
    got = trt_pipe.generate(ids, pixels, max_new_tokens=6)
    want = ort_pipe.generate(ids, pixels, max_new_tokens=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.anchors == want.anchors
    profiles = [p for graph, p in trt.executions if graph.startswith("decoder")]
    assert profiles[0] == 0 and set(profiles[1:]) == {1}, "prefill profile first, then the decode profile"
    trt_pipe.backend.close()
    assert not cuda.mem, "every device buffer is freed"


def test_decode_matches_onnxruntime_and_cache_round_trips(fake, workdir):
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.trt_backend import TrtBackend

    from attanchor_export.trt_build import build_engines

    trt, cuda = fake
    folder = workdir("clip-t2i")
    build_engines(folder, max_batch=2, max_input_len=64, max_seq_len=96)
    manifest = Manifest.load(folder)
    backend = TrtBackend(manifest, trt=trt, cuda=cuda, full_logits=True)
    ref = OrtBackend(manifest)
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((2, 7, manifest.dims["hidden_size"])).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    pos = np.tile(np.arange(7), (2, 1))
    logits, cache = backend.decode(embeds, mask, pos, backend.empty_cache(2))
    want, past = ref.decode(embeds, mask, pos, ref.empty_cache(2))
    np.testing.assert_allclose(logits, want, atol=1e-5)
    for a, b in zip(cache.to_numpy(), past):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Feed OrtBackend's numpy cache to the trt backend (upload path) and step once more.
    step = embeds[:, :1]
    mask2 = np.ones((2, 8), np.int64)
    got, _ = backend.decode(step, mask2, pos[:, -1:] + 1, past)
    want, _ = ref.decode(step, mask2, pos[:, -1:] + 1, past)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(RuntimeInputError, match="attention_mask has shape"):
        backend.decode(step, mask, pos[:, -1:], backend.empty_cache(2))
    with pytest.raises(RuntimeInputError, match="no TensorRT optimization profile fits"):
        backend.decode(embeds[:, :3], np.ones((2, 10), np.int64), pos[:, :3], past)  # chunked prefill
    backend.close()


def test_gate_failure_keeps_engines_aside(fake, workdir, monkeypatch):
    from attanchor_export import trt_build

    folder = workdir("clip-t2i")
    real_compare = trt_build.compare

    def pessimist(ref, got, gate, graph, case):
        check = real_compare(ref, got, gate, graph, case)
        return {**check, "passed": graph != "decoder"}

    monkeypatch.setattr(trt_build, "compare", pessimist)
    with pytest.raises(trt_build.GateFailed, match="engine gate check"):
        trt_build.build_engines(folder, max_input_len=64, max_seq_len=96)
    assert (folder / "engines" / "fake-orin-sm87-trt10.3.0.30.failed" / "engine.json").is_file()
    trt, cuda = fake
    with pytest.raises(ArtifactError, match="failed its accuracy gate"):
        from attanchor_runtime.trt_backend import TrtBackend

        TrtBackend(Manifest.load(folder), trt=trt, cuda=cuda)


# ---- CPU: engine folder selection, refusal, profiles, buffers -----------------------------------------
def _meta(**kw):
    return {"format": "attanchor-engines", "format_version": 1, "sm": "87", "tensorrt": "10.3.0.30", "gpu": "Orin",
            "engines": {}, **kw}


def test_engine_refusal(tmp_path):
    assert engine_mismatch(_meta(), "87", "10.3.0.30") is None
    assert "sm87" in engine_mismatch(_meta(), "89", "10.3.0.30")
    assert "TensorRT 10.3.0.30" in engine_mismatch(_meta(), "87", "10.7.0")
    assert "gate" in engine_mismatch(_meta(gate={"passed": False}), "87", "10.3.0.30")
    with pytest.raises(ArtifactError, match="no TensorRT engines in .*attanchor-export build"):
        find_engine_dir(tmp_path, "87", "10.3.0.30")
    (tmp_path / "engines" / "orin-sm87-trt10.3.0.30").mkdir(parents=True)
    (tmp_path / "engines" / "orin-sm87-trt10.3.0.30" / "engine.json").write_text(json.dumps(_meta()))
    path, meta = find_engine_dir(tmp_path, "87", "10.3.0.30")
    assert path.name == "orin-sm87-trt10.3.0.30"
    with pytest.raises(ArtifactError) as info:
        find_engine_dir(tmp_path, "89", "10.3.0.30")
    message = str(info.value)
    assert "built for sm87" in message and f"rebuild with `attanchor-export build {tmp_path}`" in message
    assert "\n" not in message


def test_engines_from_another_export_are_refused(fake, workdir):
    from attanchor_runtime.trt_backend import TrtBackend

    from attanchor_export.trt_build import build_engines

    trt, cuda = fake
    folder = workdir("clip-t2i")
    result = build_engines(folder, max_input_len=64, max_seq_len=96, gate=False)
    meta = json.loads((result.engine_dir / "engine.json").read_text())
    meta["engines"]["decoder"]["sources"]["decoder.onnx"] = "0" * 64
    (result.engine_dir / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="built from another decoder.onnx"):
        TrtBackend(Manifest.load(folder), trt=trt, cuda=cuda)
    with pytest.raises(ArtifactError, match="built for sm87"):
        TrtBackend(Manifest.load(folder), trt=trt, cuda=FakeCuda(sm=(8, 9)))


def test_select_profile(artifact):
    from attanchor_export.trt_plan import BuildOptions, make_plan

    plan = make_plan(artifact("clip-t2i"), BuildOptions(max_batch=2, max_input_len=64, max_seq_len=128))
    profiles = [json.loads(json.dumps(p.__dict__)) for p in plan.engines["decoder"].profiles]
    kv = {f"past_key_values.{i}.{k}": None for i in range(2) for k in ("key", "value")}

    def shapes(batch, seq, past):
        return {"inputs_embeds": (batch, seq, 64), "attention_mask": (batch, past + seq),
                "position_ids": (batch, seq), **{n: (batch, 2, past, 16) for n in kv}}

    assert select_profile(profiles, shapes(1, 30, 0)) == 0
    assert select_profile(profiles, shapes(2, 1, 0)) == 0  # a one-token prompt is still a prefill
    assert select_profile(profiles, shapes(2, 1, 127)) == 1
    with pytest.raises(RuntimeInputError, match="max-seq-len"):
        select_profile(profiles, shapes(1, 1, 128), "decoder")
    with pytest.raises(RuntimeInputError, match="prefill: batch 1..2"):
        select_profile(profiles, shapes(3, 4, 0), "decoder")


def test_kv_cache_buffers():
    assert kv_buffer_bytes(1, 4, 2048, 64, 4) == 2 << 20  # TinyLlama: 2 MiB per K or V per side at batch 1
    cuda = FakeCuda()
    cache = KVCache(cuda, 4, batch=2, heads=2, head_dim=8, capacity=16, dtype=np.float32, slot=1)
    assert len(cuda.mem) == 8 and all(len(b) == 2 * 2 * 16 * 8 * 4 for b in cuda.mem.values())
    assert cache.length == 1 and cache.side == 0
    arrays = [np.full((2, 2, 3, 8), i, np.float32) for i in range(4)]
    cache.upload(arrays)
    assert cache.length == 4
    for a, b in zip(cache.to_numpy(), arrays):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeInputError, match="max_seq_len"):
        cache.upload([np.zeros((2, 2, 16, 8), np.float32)] * 4)
    cache.close()
    assert not cuda.mem


# ---- CPU: what a machine without tensorrt says -----------------------------------------------------
@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here: the missing-tensorrt path cannot run")
def test_build_without_tensorrt_is_one_line(workdir):
    from attanchor_export.trt_build import TrtUnavailable, build_engines

    folder = workdir("clip-t2i")
    with pytest.raises(TrtUnavailable) as info:
        build_engines(folder, max_input_len=64, max_seq_len=96)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert "tensorrt" in message and "pip install 'attanchor-export[trt]'" in message
    assert "python3-libnvinfer" in message and str(folder) in message and "ONNX graphs are written" in message
    assert not (folder / "engines").exists() or not any((folder / "engines").iterdir())


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here: the missing-tensorrt path cannot run")
def test_cli_build_and_trt_export_exit_2(workdir, checkpoint, tmp_path):
    from click.testing import CliRunner

    from attanchor_export.cli import main

    folder = workdir("clip-t2i")
    runner = CliRunner()
    result = runner.invoke(main, ["build", str(folder), "--max-input-len", "64", "--max-seq-len", "96"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot build TensorRT engines: the tensorrt Python package is not installed")
    assert "Traceback" not in result.output
    out = tmp_path / "exported"
    result = runner.invoke(main, [str(checkpoint("clip-llama")), "-o", str(out), "--trt", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "ONNX graphs are written in" in result.output and str(out) in result.output
    assert (out / "manifest.json").is_file()  # the export itself is complete


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_trt_backend_without_tensorrt(artifact):
    from attanchor_runtime import Pipeline

    with pytest.raises(ArtifactError, match="pip install 'attanchor-export\\[trt\\]'"):
        Pipeline.load(artifact("clip-t2i"), backend="trt")


# ---- GPU -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_gpu():
    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    from attanchor_runtime.cuda_util import Cuda, CudaUnavailable

    try:
        cuda = Cuda()
    except CudaUnavailable as e:
        pytest.skip(f"no CUDA for TensorRT: {e}")
    return trt, cuda


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "empty_past"), [("clip-t2i", "zero"), ("siglip-t2i-k4", "zero"),
                                                   ("clip-t2i", "masked-slot")])
def test_real_engines_match_onnxruntime(real_gpu, workdir, name, empty_past):
    from attanchor_runtime import Pipeline
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.trt_backend import TrtBackend

    from attanchor_export.trt_build import build_engines

    folder = workdir(name)
    result = build_engines(folder, max_batch=2, max_input_len=64, max_seq_len=128, workspace_mib=512,
                           empty_past=empty_past)
    gate = result.meta["gate"]
    assert gate["passed"], gate
    manifest = Manifest.load(folder)
    backend = TrtBackend(manifest, full_logits=True)
    ref = OrtBackend(manifest)
    ids, pixels = _ids(folder), _pixels(folder, 2)
    trt_out = Pipeline(manifest, backend).generate(ids, pixels, max_new_tokens=8)
    ort_out = Pipeline(manifest, ref).generate(ids, pixels, max_new_tokens=8)
    assert trt_out.anchors == ort_out.anchors
    np.testing.assert_array_equal(trt_out.tokens, ort_out.tokens)
    feats = ref.vision(pixels)
    np.testing.assert_allclose(backend.vision(pixels), feats, atol=1e-3)
    embedded = ref.embed(*_prepared(manifest, ids), feats, 0.12)
    logits, _ = backend.decode(embedded["inputs_embeds"], embedded["attention_mask"], embedded["position_ids"],
                               backend.empty_cache(2))
    want, _ = ref.decode(embedded["inputs_embeds"], embedded["attention_mask"], embedded["position_ids"],
                         ref.empty_cache(2))
    assert np.max(np.abs(logits - want)) <= 1e-3
    backend.close()


def _prepared(manifest, ids):
    from attanchor_runtime.pipeline import prepare_input_ids

    batch = prepare_input_ids(ids, manifest.text["image_token_id"], manifest.text["pad_token_id"])
    return batch.input_ids, batch.attention_mask
