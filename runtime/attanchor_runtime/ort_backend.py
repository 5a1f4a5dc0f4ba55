"""The ONNX Runtime backend: the artifact's three graphs as sessions, opened on first use.

OrtDecoder is the decoder half (decode.Decoder): it carries the KV cache from one call to the next.
A standard-op decoder (KV_CONCAT) concatenates past and new keys itself: each call's `present` arrays
become the next call's past as they are (a whole-cache copy inside the graph per step). A decoder whose
manifest says KV_APPEND (the int4/int8 onnxruntime form, precision.ort_fusions) reads its past where it
lies and returns only the new positions: the cache is one preallocated buffer per layer (KVBuffer), fed
whole, and the new positions are written in after each call (a list cache is concatenated instead). On
CUDA a KV_CONCAT cache stays on the device through IO binding (OrtValues in, OrtValues out); a KVBuffer
is host memory that onnxruntime copies in per call (TensorRT is the GPU path this project measures).

    backend = OrtBackend(manifest)                                # sessions open when first used
    features = backend.vision({"pixel_values": pixels})
    decoder = OrtDecoder.of_session(session, max_positions=2048)  # a bare decoder file (benchmarks)
"""

from __future__ import annotations

import numpy as np

from .errors import RuntimeInputError
from .manifest import KV_APPEND, KV_CONCAT, LOGITS_TO_KEEP, NEXT_TOKEN, PAST_PREFIX, PRESENT_PREFIX, Manifest
from .sessions import FedWeightsSession, has_external_fp16_weights, ort_session

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def empty_past(past_names, batch: int, kv_heads: int, head_dim: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Zero-length KV cache: one [B, kv_heads, 0, head_dim] array per past input."""
    empty = np.zeros((batch, kv_heads, 0, head_dim), dtype)
    return dict.fromkeys(past_names, empty)


_KEEP_LAST = np.array(1, np.int64)  # the logits_to_keep feed of a caller that reads the last position only


def _overridable(session) -> set[str]:
    """Names of the initializers a feed may override (onnxruntime lists them apart from the inputs)."""
    get = getattr(session, "get_overridable_initializers", None)
    return {i.name for i in get()} if get is not None else set()


class KVBuffer:
    """One [B, kv_heads, capacity, head_dim] key and one value buffer per layer, for a KV_APPEND decoder.
    Capacity grows in steps of `chunk` positions (one copy of what is there each time, so the decoder reads
    fewer than `chunk` unused slots) up to the model's context; past that, a clear error instead of a
    write out of range."""

    def __init__(self, batch: int, count: int, kv_heads: int, head_dim: int, dtype, limit: int, chunk: int = 32):
        self.batch, self.count, self.kv_heads, self.head_dim = batch, count, kv_heads, head_dim
        self.dtype, self.limit, self.chunk = dtype, limit, chunk
        self.capacity, self.buffers = 0, []
        self.binding = None  # OrtDecoder's _StepBinding for this cache's decode steps (not copied)

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        if total > self.limit:
            raise RuntimeInputError(f"context full: {total} positions, the model's context is {self.limit}")
        capacity = min(self.limit, -(-total // self.chunk) * self.chunk)
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        buffers = [np.zeros(shape, self.dtype) for _ in range(self.count)]
        for old, new in zip(self.buffers, buffers):
            new[:, :, : self.capacity] = old
        self.capacity, self.buffers = capacity, buffers

    def past(self, length: int) -> list[np.ndarray]:
        """What the decoder reads as its past when `length` positions are filled: the whole buffers (the
        graph ignores the slots after `length`), or zero-length arrays for a prefill."""
        if length == 0:
            return [np.zeros((self.batch, self.kv_heads, 0, self.head_dim), self.dtype)] * self.count
        return self.buffers

    def append(self, present: list[np.ndarray], start: int) -> None:
        for buffer, new in zip(self.buffers, present):
            buffer[:, :, start : start + new.shape[2]] = new

    def copy(self) -> KVBuffer:
        twin = KVBuffer(self.batch, self.count, self.kv_heads, self.head_dim, self.dtype, self.limit, self.chunk)
        twin.capacity, twin.buffers = self.capacity, [b.copy() for b in self.buffers]
        return twin


class _StepBinding:
    """onnxruntime IO binding for the decode steps of one KVBuffer on the CPU: the layer buffers are bound
    once (again only when they grow), the present outputs are written into arrays allocated once, and
    only the step's three small inputs and its first output are bound anew; so onnxruntime allocates no
    output (its intermediates come from its arena) and no array is converted or copied out. What is new
    per step: the first output's array (next_token: 8 bytes a row; logits: [B, 1, V], which a caller may
    keep) and the three input wrappers."""

    def __init__(self, session, past_names, present_names, cache: KVBuffer, new: int):
        self.session, self.past_names, self.present_names = session, past_names, present_names
        self.binding = session.io_binding()
        self.capacity = -1
        shape = (cache.batch, cache.kv_heads, new, cache.head_dim)
        self.presents = [np.empty(shape, cache.dtype) for _ in present_names]
        self.new = new
        from onnxruntime import OrtValue

        self._ortvalue = OrtValue.ortvalue_from_numpy
        self._past_values: list = []
        self.first = None  # the first output bound (with the presents) at the last run

    def run(self, inputs: dict, first: str, first_shape: tuple, first_dtype, cache: KVBuffer) -> list[np.ndarray]:
        if self.capacity != cache.capacity:  # the buffers were (re)allocated: bind the new ones
            self._past_values = [self._ortvalue(b) for b in cache.buffers]
            for name, value in zip(self.past_names, self._past_values):
                self.binding.bind_ortvalue_input(name, value)
            self.capacity = cache.capacity
        for name, value in inputs.items():
            self.binding.bind_cpu_input(name, value)
        if first != self.first:  # (re)bind the outputs; logits <-> next_token: the other one unbound
            self.binding.clear_binding_outputs()
            for name, array in zip(self.present_names, self.presents):
                self.binding.bind_ortvalue_output(name, self._ortvalue(array))
            self.first = first
        out = np.empty(first_shape, first_dtype)
        self.binding.bind_ortvalue_output(first, self._ortvalue(out))
        self.session.run_with_iobinding(self.binding)
        return [out, *self.presents]


class OrtDecoder:
    """A decoder session (onnxruntime's, or anything with its `run`/`get_inputs`) as a decode.Decoder.
    The cache is a flat [k0, v0, k1, v1, ...] list of arrays (OrtValues on CUDA), or one KVBuffer for a
    KV_APPEND decoder (`appends_kv`: what empty_cache hands out). A graph with a `next_token` output (the
    onnxruntime form, precision.ort_fusions) makes the greedy choice itself: `greedy_in_graph`, decode_next.
    A KVBuffer's decode steps on the CPU run through IO binding (_StepBinding) when the session has one."""

    def __init__(self, session, past_names: list[str], present_names: list[str], kv_heads: int, head_dim: int,
                 max_positions: int, kv_cache: str = KV_CONCAT, device: str = "cpu", logits: str = "logits",
                 inputs: list[str] | None = None, logits_to_keep: str | None = LOGITS_TO_KEEP,
                 prefill_session=None):
        """inputs: the names of inputs_embeds, attention_mask and position_ids (default: the session's
        inputs other than the past, in graph order). logits_to_keep: the graph's optional input of that
        name, used where the session has it (decode_last, decode_next: a prefill's lm_head runs on the
        last position only). prefill_session: a second session of the same IO that runs every call of more
        than one position (a prompt), the decoder's --prefill-int8 graph."""
        self.session, self.past_names, self.present_names = session, list(past_names), list(present_names)
        self.prefill_session = prefill_session
        self.kv_heads, self.head_dim, self.max_positions, self.device = kv_heads, head_dim, max_positions, device
        self.kv_cache, self.appends_kv = kv_cache, kv_cache == KV_APPEND
        self.outputs = [logits, *self.present_names]
        self.inputs = inputs or [i.name for i in session.get_inputs() if not i.name.startswith(PAST_PREFIX + ".")]
        past_type = next(i.type for i in session.get_inputs() if i.name == self.past_names[0])
        self.kv_dtype = _NUMPY_TYPES.get(past_type, np.float32)
        outputs = {o.name: o for o in session.get_outputs()}
        self.greedy_in_graph = NEXT_TOKEN in outputs
        self.logits_to_keep = logits_to_keep if logits_to_keep in _overridable(session) else None
        self.vocab_size = outputs[logits].shape[-1] if isinstance(outputs[logits].shape[-1], int) else None
        # IO binding for a KVBuffer's decode steps: onnxruntime's own sessions (FedWeightsSession and test
        # doubles have none) on the CPU. Both levers are plain attributes: set either False to run without
        # it (scripts/ab_decoders.py measures each that way; the tests compare the answers).
        self.binds = device == "cpu" and hasattr(session, "io_binding") and self.vocab_size is not None

    @classmethod
    def open(cls, manifest: Manifest, file: str | None = None, device: str = "cpu", threads: int | None = None,
             memory_arena: bool = True, fed_weights: bool = False, profile: str | None = None,
             prepack: bool = True) -> OrtDecoder:
        """The artifact's decoder `file` (default: the one onnxruntime opens). fed_weights: its fp16 weights
        (if it keeps any in external data) fed from disk at every call (sessions.FedWeightsSession: a big
        fp16 decoder on a CPU, for checks).
        profile, prepack: see sessions.ort_session."""
        file = file or manifest.graph_file("decoder", "ort")
        path = manifest.path(file)
        fed = fed_weights and has_external_fp16_weights(path)  # a graph without fp16 weights opens normally
        session = FedWeightsSession(path, threads) if fed else ort_session(path, device, threads, memory_arena,
                                                                           profile, prepack)
        prefill = manifest.precision.prefill_file(file)
        # Its int8 linears are CPU kernels; on a GPU the one decoder graph runs prompts too.
        prefill_session = ort_session(manifest.path(prefill), device, threads, memory_arena, profile, prepack) \
            if prefill is not None and device == "cpu" else None
        spec, dims = manifest.graphs.decoder, manifest.dims
        return cls(session, spec.past_names, spec.present_names, dims.num_kv_heads, dims.head_dim,
                   dims.max_position_embeddings, manifest.precision.kv_cache(file), device, spec.output_names[0],
                   [n for n in spec.input_names if n not in spec.past_names], spec.notes.logits_to_keep,
                   prefill_session)

    @classmethod
    def of_session(cls, session, max_positions: int, kv_cache: str = KV_CONCAT) -> OrtDecoder:
        """A decoder file outside an artifact: its KV layout read from the session's own inputs."""
        past = [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX + ".")]
        present = [o.name for o in session.get_outputs() if o.name.startswith(PRESENT_PREFIX + ".")]
        _, heads, _, head_dim = past[0].shape
        return cls(session, [p.name for p in past], present, int(heads), int(head_dim), max_positions, kv_cache)

    def empty_cache(self, batch: int):
        if self.appends_kv:
            return KVBuffer(batch, len(self.past_names), self.kv_heads, self.head_dim, self.kv_dtype,
                            self.max_positions)
        return list(empty_past(self.past_names, batch, self.kv_heads, self.head_dim, self.kv_dtype).values())

    def copy_cache(self, cache):
        return cache.copy() if isinstance(cache, KVBuffer) else list(cache)

    def decode(self, inputs_embeds, attention_mask, position_ids, cache):
        return self._decode(self.outputs[0], inputs_embeds, attention_mask, position_ids, cache)

    def decode_last(self, inputs_embeds, attention_mask, position_ids, cache):
        """decode, with the logits of each row's last position only: [B, 1, V]."""
        return self._decode(self.outputs[0], inputs_embeds, attention_mask, position_ids, cache, last=True)

    def decode_next(self, inputs_embeds, attention_mask, position_ids, cache):
        """The graph's greedy choice (its `next_token` output, int64 [B]; -1: that row's logits were not
        finite) instead of the logits; only when `greedy_in_graph`."""
        return self._decode(NEXT_TOKEN, inputs_embeds, attention_mask, position_ids, cache, last=True)

    def _decode(self, first, inputs_embeds, attention_mask, position_ids, cache, last: bool = False):
        extra = self._extra_feeds(last)
        if isinstance(cache, KVBuffer):
            new = inputs_embeds.shape[1]
            start = attention_mask.shape[1] - new
            cache.reserve(attention_mask.shape[1])
            # A bound call runs the step graph and cannot feed logits_to_keep: steps of one position only,
            # or several where neither matters.
            if start and self.binds and (new == 1 or not (extra or self.prefill_session)):
                outputs = self._run_bound(first, inputs_embeds, attention_mask, position_ids, cache)
            else:
                outputs = self._run(first, inputs_embeds, attention_mask, position_ids, cache.past(start), extra)
            cache.append(outputs[1:], start)  # numpy inputs are read where they are, not copied
            return outputs[0], cache
        if self.device == "cuda" and not self.appends_kv:
            return self._decode_bound(first, inputs_embeds, attention_mask, position_ids, cache)
        outputs = self._run(first, inputs_embeds, attention_mask, position_ids, cache, extra)
        if self.kv_cache == KV_APPEND:  # present holds the new positions only: append them to the list
            return outputs[0], [np.concatenate([p, n], axis=2) for p, n in zip(cache, outputs[1:])]
        return outputs[0], outputs[1:]

    def _extra_feeds(self, last: bool) -> dict:
        """{logits_to_keep: 1} for a caller that reads the last position only, where the graph has that
        input. onnxruntime's IO binding cannot bind an initializer, so the bound paths (decode steps of one
        position, where 1 and every position are the same; CUDA) run without it."""
        return {self.logits_to_keep: _KEEP_LAST} if last and self.logits_to_keep is not None else {}

    def _run(self, first, inputs_embeds, attention_mask, position_ids, past, extra: dict) -> list:
        feeds = dict(zip(self.inputs, (inputs_embeds, attention_mask, position_ids)))
        feeds.update(zip(self.past_names, past))
        feeds.update(extra)
        prompt = self.prefill_session is not None and inputs_embeds.shape[1] > 1
        return (self.prefill_session if prompt else self.session).run([first, *self.present_names], feeds)

    def _run_bound(self, first, inputs_embeds, attention_mask, position_ids, cache: KVBuffer) -> list:
        new = inputs_embeds.shape[1]
        bound = cache.binding
        if bound is None or bound.new != new or bound.session is not self.session:
            cache.binding = _StepBinding(self.session, self.past_names, self.present_names, cache, new)
        batch = inputs_embeds.shape[0]
        if first == NEXT_TOKEN:
            shape, dtype = (batch,), np.int64
        else:  # a decode step's logits: [B, S, V] (a last-logits-only graph gives S = 1 anyway)
            shape, dtype = (batch, new, self.vocab_size), np.float32
        inputs = dict(zip(self.inputs, (np.ascontiguousarray(inputs_embeds, np.float32),
                                        np.ascontiguousarray(attention_mask, np.int64),
                                        np.ascontiguousarray(position_ids, np.int64))))
        return cache.binding.run(inputs, first, shape, dtype, cache)

    def _decode_bound(self, first, inputs_embeds, attention_mask, position_ids, past):
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in zip(self.inputs, (inputs_embeds, attention_mask, position_ids)):
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, past):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output(first, "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cuda")  # the cache stays on the GPU between steps
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]


class OrtBackend:
    """The artifact's graphs on onnxruntime (decode.Backend). `files`: {graph: file} to open instead of the
    ones the manifest gives onnxruntime (one precision form of a staging folder). Sessions open on first
    use and `release(graph)` closes one, so a check that needs the vision graph only once does not hold
    it through a long decoder run. memory_arena=False, fed_weights and prepack: see OrtDecoder.open."""

    name = "ort"

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 files: dict[str, str] | None = None, memory_arena: bool = True, fed_weights: bool = False,
                 prepack: bool = True):
        self.manifest, self.device, self.threads = manifest, device, threads
        self.files = {g: (files or {}).get(g) or manifest.graph_file(g, "ort") for g in ("vision", "embedding",
                                                                                        "decoder")}
        self.memory_arena, self.fed_weights, self.prepack = memory_arena, fed_weights, prepack
        self._sessions: dict = {}
        self._decoder: OrtDecoder | None = None

    def _session(self, graph: str):
        if graph not in self._sessions:
            # The anchor graph is tiny and partly data-dependent: it runs on the CPU everywhere.
            device = "cpu" if graph == "embedding" else self.device
            self._sessions[graph] = ort_session(self.manifest.path(self.files[graph]), device, self.threads,
                                                self.memory_arena, prepack=self.prepack)
        return self._sessions[graph]

    @property
    def decoder(self) -> OrtDecoder:
        if self._decoder is None:
            self._decoder = OrtDecoder.open(self.manifest, self.files["decoder"], self.device, self.threads,
                                            self.memory_arena, self.fed_weights, prepack=self.prepack)
        return self._decoder

    @property
    def appends_kv(self) -> bool:
        return self.decoder.appends_kv

    @property
    def greedy_in_graph(self) -> bool:
        return self.decoder.greedy_in_graph

    def decode_next(self, inputs_embeds, attention_mask, position_ids, cache):
        return self.decoder.decode_next(inputs_embeds, attention_mask, position_ids, cache)

    def decode_last(self, inputs_embeds, attention_mask, position_ids, cache):
        return self.decoder.decode_last(inputs_embeds, attention_mask, position_ids, cache)

    def vision(self, feeds: dict) -> np.ndarray:
        spec = self.manifest.graphs.vision
        return self._session("vision").run(spec.output_names, feeds)[0]

    def embed(self, feeds: dict) -> dict:
        names = self.manifest.graphs.embedding.output_names
        return dict(zip(names, self._session("embedding").run(names, feeds)))

    def empty_cache(self, batch: int):
        return self.decoder.empty_cache(batch)

    def copy_cache(self, cache):
        return self.decoder.copy_cache(cache)

    def decode(self, inputs_embeds, attention_mask, position_ids, cache):
        return self.decoder.decode(inputs_embeds, attention_mask, position_ids, cache)

    def release(self, *graphs: str) -> None:
        """Close these graphs' sessions (they reopen if used again)."""
        for graph in graphs:
            if graph == "decoder":
                self._decoder = None
            self._sessions.pop(graph, None)

    def close(self) -> None:
        self.release("vision", "embedding", "decoder")


__all__ = ["KVBuffer", "OrtBackend", "OrtDecoder", "empty_past"]
