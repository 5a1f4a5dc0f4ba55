"""The TensorRT backend (decode.Backend) over engines built by ``attanchor-export build DIR``.

    backend = TrtBackend(Manifest.load(folder))          # picks engines/<gpu>-sm<cc>-trt<ver>/
    feats = backend.vision({"pixel_values": pixels})      # float32 [B, M, D]
    emb = backend.embed(feeds)                            # the embedding graph's outputs by name
    cache = backend.empty_cache(B)                        # a KVCache on the GPU (length 0)
    logits, cache = backend.decode(emb["inputs_embeds"], emb["attention_mask"], emb["position_ids"], cache)
    logits, cache = backend.decode(step_embeds, mask, next_pos, cache)      # one token, same cache

The decode loop (decode.decoder_calls / generate) drives it as it drives OrtBackend. ``decode``'s cache
is the object a previous call returned (or ``empty_cache``); a flat list of numpy arrays [k0, v0, k1, v1,
...] (OrtBackend's form) is accepted too and uploaded. ``KVCache.to_numpy()`` gives that list back for
parity checks (and is what ``copy_cache`` returns).
Logits come back for the last position only, shape [B, 1, vocab] (the graph contract allows
``seq_len | 1``); copying [B, 600, 32064] float32 per prefill to the host would cost more than the
prefill on a Jetson. ``full_logits=True`` returns every position.

The KV cache (:class:`KVCache`) lives on the device. Per past tensor (2 per layer) it holds two
buffers ("sides") of batch x kv_heads x capacity x head_dim elements, capacity = max_seq_len the
engines were built for, allocated once per batch size. A step binds the past as a dense
[B, H, t, D] tensor on side s and binds ``present.*`` ([B, H, t+S, D]) to side 1-s, then the
sides swap: no host round trip and no copy besides the Concat the graph itself does. Writing only
the new positions into a slot of one max_seq_len buffer is not possible with this graph: its
``present`` is the full concatenation (binding it over its own past would read and write one
buffer in the same kernel), and a dense [B, H, t, D] tensor does not sit inside a buffer laid out
for [B, H, max_seq_len, D] once B x H > 1. That needs a decoder that outputs only the new keys
(TensorRT 10.15's TensorScatter / Attention, opset 24), which JetPack 6's TensorRT 10.3 lacks.

Execution: one CUDA stream; one execution context per optimization profile (the decoder has
``prefill`` and ``decode``, chosen per call by :func:`select_profile` from the shapes);
``set_input_shape`` for every dynamic input on every call; ``execute_async_v3``; then one stream
synchronize per call. Input staging and output buffers grow only, so after the first prefill a
decode step allocates nothing. The embedding graph runs on onnxruntime CPU unless the artifact has
an anchor budget and an embedding engine was built.

:mod:`.engines` picks the engine folder, reads its engine.json (and refuses folders built for
another GPU, TensorRT version or export) and chooses the optimization profile. The calls above exist unchanged in TensorRT 10.x and 11.x
(11 removed only builder-side precision APIs), so there is one code path for both. CUDA goes through
cuda-python (:mod:`.cuda_util` says why); tensorrt and cuda-python are imported only when this backend
is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cuda_util import Cuda
from .engines import open_engine_dir, rebuild_hint, select_profile
from .errors import ArtifactError, RuntimeInputError
from .sessions import ort_session

__all__ = ["KVCache", "TRT_INSTALL_HINT", "TrtBackend", "import_tensorrt", "select_profile"]

TRT_INSTALL_HINT = (
    "pip install 'attanchor-export[trt]' on a desktop GPU; on a Jetson use JetPack's TensorRT "
    "(sudo apt install python3-libnvinfer)"
)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ArtifactError(f"the trt backend needs TensorRT's Python package: {TRT_INSTALL_HINT}; or use "
                            "--backend ort") from None
    return tensorrt


# ---- KV cache -----------------------------------------------------------------------------------
class KVCache:
    """Device KV cache with two sides per past tensor; see the module docstring.

    ``length`` counts the positions held (including the masked slot in masked-slot mode); ``side``
    is where the current past lives. Only one cache per backend is live: ``empty_cache`` resets it.
    """

    def __init__(self, cuda, count: int, batch: int, heads: int, head_dim: int, capacity: int, dtype, slot: int = 0):
        self.cuda, self.count, self.batch, self.heads, self.head_dim = cuda, count, batch, heads, head_dim
        self.capacity, self.dtype, self.slot = capacity, np.dtype(dtype), slot
        self.nbytes = kv_buffer_bytes(batch, heads, capacity, head_dim, self.dtype.itemsize)
        self._ptrs = [(cuda.malloc(self.nbytes), cuda.malloc(self.nbytes)) for _ in range(count)]
        self.length, self.side = 0, 0
        self.reset()

    def ptr(self, index: int, side: int) -> int:
        return self._ptrs[index][side]

    def shape(self, length: int | None = None) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.length if length is None else length, self.head_dim)

    def reset(self) -> None:
        self.side, self.length = 0, self.slot
        if self.slot:  # the masked slot must hold finite values: zeros
            slot_bytes = self.batch * self.heads * self.slot * self.head_dim * self.dtype.itemsize
            for ptrs in self._ptrs:
                self.cuda.memset(ptrs[0], slot_bytes)

    def upload(self, arrays) -> None:
        """Fill from a flat [k0, v0, ...] list of [B, H, t, D] arrays."""
        if len(arrays) != self.count:
            raise RuntimeInputError(f"past has {len(arrays)} arrays, the decoder takes {self.count}")
        self.reset()
        t = arrays[0].shape[2]
        if self.slot + t > self.capacity:
            raise RuntimeInputError(f"past of {t} positions exceeds the engines' max_seq_len {self.capacity - self.slot}")
        for i, a in enumerate(arrays):
            a = np.asarray(a, self.dtype)
            if a.shape != (self.batch, self.heads, t, self.head_dim):
                raise RuntimeInputError(f"past array {i} has shape {a.shape}, expected {self.shape(t)}")
            if self.slot:
                a = np.concatenate([np.zeros(self.shape(self.slot), self.dtype), a], axis=2)
            self.cuda.htod(self.ptr(i, 0), np.ascontiguousarray(a))
        self.length = self.slot + t
        self.cuda.synchronize()

    def to_numpy(self) -> list[np.ndarray]:
        """The cache as OrtBackend's flat list of [B, H, t, D] arrays (without the masked slot)."""
        out = []
        for i in range(self.count):
            a = np.empty(self.shape(), self.dtype)
            self.cuda.dtoh(a, self.ptr(i, self.side))
            out.append(a)
        self.cuda.synchronize()
        return [a[:, :, self.slot:] for a in out]

    def close(self) -> None:
        for a, b in self._ptrs:
            self.cuda.free(a)
            self.cuda.free(b)
        self._ptrs = []


def kv_buffer_bytes(batch: int, heads: int, capacity: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one side of one past tensor."""
    return int(batch) * int(heads) * int(capacity) * int(head_dim) * int(itemsize)


# ---- engines ----------------------------------------------------------------------------------
_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
                "BOOL": np.bool_, "UINT8": np.uint8}


def numpy_dtype(trt, dtype) -> np.dtype:
    """trt.nptype, with a fallback: some TensorRT releases map no INT64, and some build their table
    with np.bool, which numpy 1.24-1.26 (common on Jetson) does not have."""
    try:
        return np.dtype(trt.nptype(dtype))
    except (TypeError, AttributeError):
        name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
        if name in _NUMPY_TYPES:
            return np.dtype(_NUMPY_TYPES[name])
        raise ArtifactError(f"engine tensor type {name} has no numpy equivalent (bind it as float32 in the "
                            "export)") from None


class _Engine:
    """One deserialized engine, one execution context per optimization profile, grow-only buffers."""

    def __init__(self, backend: TrtBackend, graph: str):
        trt, cuda = backend.trt, backend.cuda
        self.graph, self.cuda = graph, cuda
        path = backend.engine_dir / backend.meta.engine_file(graph)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ArtifactError(f"cannot read {path}: {e.strerror}: {rebuild_hint(backend.folder)}") from None
        self.engine = backend.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot deserialize {path.name} (see its log above): "
                                f"{rebuild_hint(backend.folder)}")
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtype = {n: numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.static_shape = {n: tuple(engine.get_tensor_shape(n)) for n in self.inputs}
        self.profiles = backend.meta.profiles(graph)
        if engine.num_optimization_profiles != len(self.profiles):
            raise ArtifactError(f"{path.name} has {engine.num_optimization_profiles} profiles, engine.json lists "
                                f"{len(self.profiles)}: {rebuild_hint(backend.folder)}")
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        self.contexts = []
        for index in range(len(self.profiles)):
            ctx = engine.create_execution_context(strategy) if strategy is not None else \
                engine.create_execution_context()
            if index:
                ctx.set_optimization_profile_async(index, cuda.stream)
            self.contexts.append(ctx)
        cuda.synchronize()
        self._buffers: dict[str, tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, -1))
        if size < nbytes:
            if size >= 0:
                self.cuda.free(ptr)
            ptr = self.cuda.malloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _set_shape(self, ctx, name: str, shape) -> None:
        shape = tuple(int(d) for d in shape)
        static = self.static_shape[name]
        if all(d >= 0 for d in static):
            if static != shape:
                raise RuntimeInputError(f"{self.graph} input {name} must have shape {static}, got {shape}")
            return
        if not ctx.set_input_shape(name, shape):
            raise RuntimeInputError(f"the {self.graph} engine rejects {name} of shape {shape}")

    def run(self, profile: int, host_inputs: dict, device_inputs: dict | None = None,
            device_outputs: dict | None = None, fetch=(), last_position: tuple = ()) -> dict:
        """Bind, execute on the stream, copy `fetch` outputs to the host (only the last position
        along axis 1 for names in `last_position`), synchronize once."""
        ctx, cuda = self.contexts[profile], self.cuda
        keep = []
        for name, array in host_inputs.items():
            array = np.asarray(array, dtype=self.dtype[name], order="C")  # not ascontiguousarray: 0-d stays 0-d
            keep.append(array)
            self._set_shape(ctx, name, array.shape)
            ptr = self._buffer(name, array.nbytes)
            cuda.htod(ptr, array)
            ctx.set_tensor_address(name, ptr)
        for name, (ptr, shape) in (device_inputs or {}).items():
            self._set_shape(ctx, name, shape)
            ctx.set_tensor_address(name, ptr)
        shapes, ptrs = {}, {}
        for name in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ArtifactError(f"{self.graph} output {name} has a data-dependent shape {shape}: this engine "
                                    "cannot run with static output buffers")
            shapes[name] = shape
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype[name].itemsize
            if device_outputs and name in device_outputs:
                ptr = device_outputs[name]
            else:
                ptr = self._buffer(name, nbytes)
            ptrs[name] = ptr
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(cuda.stream):
            raise ArtifactError(f"TensorRT failed to run the {self.graph} engine (see its log above)")
        results = {}
        for name in fetch:
            shape, dtype = shapes[name], self.dtype[name]
            if name in last_position and len(shape) == 3 and shape[1] > 1:
                b, s, v = shape
                out = np.empty((b, 1, v), dtype)
                row = v * dtype.itemsize
                cuda.dtoh_rows(out, ptrs[name] + (s - 1) * row, s * row, row, b)
            else:
                out = np.empty(shape, dtype)
                cuda.dtoh(out, ptrs[name])
            results[name] = out
        cuda.synchronize()
        del keep
        return results

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers = {}


class TrtBackend:
    name = "trt"

    def __init__(self, manifest, engine_dir=None, *, full_logits: bool = False, device: int = 0, trt=None,
                 cuda=None):
        """`trt`/`cuda` default to the tensorrt module and a cuda_util.Cuda; tests pass fakes."""
        self.manifest, self.folder, self.full_logits = manifest, Path(manifest.folder), full_logits
        self.trt = trt if trt is not None else import_tensorrt()
        self.cuda = cuda if cuda is not None else Cuda(device)
        self.engine_dir, self.meta = open_engine_dir(manifest, cuda.device_info().sm, self.trt.__version__,
                                                     engine_dir)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)  # must outlive the runtime and engines
        self.runtime = self.trt.Runtime(self.logger)
        self.vision_engine = _Engine(self, "vision")
        self.decoder_engine = _Engine(self, "decoder")
        if self.meta.on_tensorrt("embedding"):
            self.embedding_engine, self.embedding_session = _Engine(self, "embedding"), None
        else:
            self.embedding_engine = None
            self.embedding_session = ort_session(manifest.graph_path("embedding"), "cpu")
        dims, graphs = manifest.dims, manifest.graphs
        self.kv_heads, self.head_dim = dims.num_kv_heads, dims.head_dim
        self.past_names, self.present_names = graphs.decoder.past_names, graphs.decoder.present_names
        self.decoder_inputs = [n for n in graphs.decoder.input_names if n not in self.past_names]
        self.logits_name = graphs.decoder.output_names[0]
        self.slot = 1 if self.meta.empty_past == "masked-slot" else 0
        self.capacity = self.meta.max_dim("decoder", "total_len")
        self._cache: KVCache | None = None

    # -- the backend interface ---------------------------------------------------------------------
    def vision(self, feeds: dict) -> np.ndarray:
        (output,) = self.manifest.graphs.vision.output_names
        shapes = {k: np.shape(v) for k, v in feeds.items()}
        profile = select_profile(self.vision_engine.profiles, shapes, "vision")
        return self.vision_engine.run(profile, feeds, fetch=[output])[output]

    def embed(self, feeds: dict) -> dict:
        names = self.manifest.graphs.embedding.output_names
        if self.embedding_engine is None:
            return dict(zip(names, self.embedding_session.run(names, feeds)))
        shapes = {k: np.shape(v) for k, v in feeds.items() if np.ndim(v)}  # scalars (threshold) have no profile
        profile = select_profile(self.embedding_engine.profiles, shapes, "embedding")
        return self.embedding_engine.run(profile, feeds, fetch=names)

    def empty_cache(self, batch: int) -> KVCache:
        cache = self._cache
        if cache is None or cache.batch != batch:
            if cache is not None:
                cache.close()
            dtype = self.decoder_engine.dtype[self.past_names[0]]
            cache = self._cache = KVCache(self.cuda, len(self.past_names), batch, self.kv_heads, self.head_dim,
                                          self.capacity, dtype, self.slot)
        else:
            cache.reset()
        return cache

    def copy_cache(self, cache) -> list[np.ndarray]:
        """The cache as host arrays (decode uploads them again): only one device cache is live per backend."""
        return cache.to_numpy() if isinstance(cache, KVCache) else list(cache)

    def decode(self, inputs_embeds, attention_mask, position_ids, past) -> tuple[np.ndarray, KVCache]:
        inputs_embeds = np.asarray(inputs_embeds)
        batch, seq = inputs_embeds.shape[:2]
        if isinstance(past, KVCache):
            cache = past
        else:
            arrays = list(past)
            cache = self.empty_cache(batch)
            if arrays and arrays[0].shape[2]:
                cache.upload(arrays)
        if cache.batch != batch:
            raise RuntimeInputError(f"the KV cache holds batch {cache.batch}, inputs_embeds has batch {batch}")
        mask = np.asarray(attention_mask, np.int64)
        if self.slot:
            mask = np.concatenate([np.zeros((batch, self.slot), np.int64), mask], axis=1)
        past_len, total = cache.length, cache.length + seq
        if mask.shape != (batch, total):
            raise RuntimeInputError(f"attention_mask has shape {tuple(np.shape(attention_mask))}, expected "
                                    f"({batch}, {total - self.slot}) for {past_len - self.slot} cached + {seq} new "
                                    "positions")
        if total > cache.capacity:
            raise RuntimeInputError(f"{total - self.slot} positions exceed the max_seq_len "
                                    f"{cache.capacity - self.slot} the engines were built for: rebuild with "
                                    f"`attanchor-export build {self.folder} --max-seq-len N`")
        host = dict(zip(self.decoder_inputs, (inputs_embeds, mask, np.asarray(position_ids, np.int64))))
        past_shape = cache.shape(past_len)
        shapes = {**{k: np.shape(v) for k, v in host.items()}, **{n: past_shape for n in self.past_names}}
        profile = select_profile(self.decoder_engine.profiles, shapes, "decoder")
        src, dst = cache.side, 1 - cache.side
        device_inputs = {n: (cache.ptr(i, src), past_shape) for i, n in enumerate(self.past_names)}
        device_outputs = {n: cache.ptr(i, dst) for i, n in enumerate(self.present_names)}
        logits = self.logits_name
        out = self.decoder_engine.run(profile, host, device_inputs, device_outputs, fetch=[logits],
                                      last_position=() if self.full_logits else (logits,))
        cache.side, cache.length = dst, total
        return out[logits], cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        for engine in (self.vision_engine, self.decoder_engine, self.embedding_engine):
            if engine is not None:
                engine.close()
