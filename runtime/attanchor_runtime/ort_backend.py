"""The ONNX Runtime backend: three sessions and a KV cache handed from one step to the next.

A standard-op decoder (KV_CONCAT) concatenates past and new keys itself: each step's `present` arrays
become the next step's `past` as they are (a whole-cache copy inside the graph per step). A decoder
whose manifest says KV_APPEND (the int4/int8 onnxruntime form, precision.ort_fusions) reads its past
where it lies and returns only the new positions: the backend keeps one preallocated buffer per layer
(KVBuffer), feeds it whole, and writes the new positions in after each call. On CUDA a KV_CONCAT
cache stays on the device through IO binding (OrtValues in, OrtValues out); a KVBuffer is host memory
that onnxruntime copies in per call (TensorRT is the GPU path this project measures).
"""

from __future__ import annotations

import numpy as np

from .decoder_feeds import empty_past, past_names, prefill_feeds, present_names
from .errors import RuntimeInputError
from .manifest import KV_APPEND, Manifest
from .sessions import ort_session

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class KVBuffer:
    """One [B, kv_heads, capacity, head_dim] key and one value buffer per layer, for a KV_APPEND decoder.
    Capacity grows in steps of `chunk` positions (one copy of what is there each time, so the decoder reads
    fewer than `chunk` unused slots) up to the model's context; past that, a clear error instead of a
    write out of range."""

    def __init__(self, batch: int, dims: dict, dtype, limit: int, chunk: int = 32):
        self.batch, self.dims, self.dtype, self.limit, self.chunk = batch, dims, dtype, limit, chunk
        self.capacity, self.buffers = 0, []

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        if total > self.limit:
            raise RuntimeInputError(f"context full: {total} positions, the model's context is {self.limit}")
        capacity = min(self.limit, -(-total // self.chunk) * self.chunk)
        shape = (self.batch, self.dims["num_kv_heads"], capacity, self.dims["head_dim"])
        buffers = [np.zeros(shape, self.dtype) for _ in range(2 * self.dims["num_layers"])]
        for old, new in zip(self.buffers, buffers):
            new[:, :, : self.capacity] = old
        self.capacity, self.buffers = capacity, buffers

    def past(self, length: int) -> list[np.ndarray]:
        """What the decoder reads as its past when `length` positions are filled: the whole buffers (the
        graph ignores the slots after `length`), or zero-length arrays for a prefill."""
        if length == 0:
            return list(empty_past(self.dims, self.batch, self.dtype).values())
        return self.buffers

    def append(self, present: list[np.ndarray], start: int) -> None:
        for buffer, new in zip(self.buffers, present):
            buffer[:, :, start : start + new.shape[2]] = new


def decode_append(session, past: list[str], present: list[str], inputs_embeds, attention_mask, position_ids,
                  cache: KVBuffer) -> np.ndarray:
    """One call of a KV_APPEND decoder session: `cache` grows to the mask's length if needed, is read in
    place, and takes the new positions; returns the logits."""
    start = attention_mask.shape[1] - inputs_embeds.shape[1]
    cache.reserve(attention_mask.shape[1])
    feeds = prefill_feeds(inputs_embeds, attention_mask, position_ids, dict(zip(past, cache.past(start))))
    outputs = session.run(["logits", *present], feeds)  # numpy inputs are read where they are, not copied
    cache.append(outputs[1:], start)
    return outputs[0]


class BackendRun:
    """decoder_feeds.greedy's `run(output_names, feeds)` over OrtBackend.decode, so what greedy drives
    (benchmarks, gates) is what Pipeline runs: the backend's own cache (a KVBuffer where the decoder
    appends), carried here between calls. Returns [logits]; the past in `feeds` is ignored."""

    def __init__(self, backend, batch: int):
        self.backend, self.cache = backend, backend.empty_cache(batch)

    def __call__(self, output_names, feeds: dict) -> list:
        logits, self.cache = self.backend.decode(feeds["inputs_embeds"], feeds["attention_mask"],
                                                 feeds["position_ids"], self.cache)
        return [logits]


class OrtBackend:
    name = "ort"

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None):
        self.manifest, self.device = manifest, device
        # Quantized artifacts name a file per backend (e.g. MatMulNBits for onnxruntime, QDQ for TensorRT).
        self.vision_session = ort_session(manifest.path(manifest.graph_file("vision", "ort")), device, threads)
        # The anchor graph is tiny and partly data-dependent: it runs on the CPU everywhere.
        self.embedding_session = ort_session(manifest.graph_path("embedding"), "cpu", threads)
        self.decoder_session = ort_session(manifest.path(manifest.graph_file("decoder", "ort")), device, threads)
        self.num_layers = manifest.dims["num_layers"]
        self.past_names = past_names(self.num_layers)
        self.present_names = present_names(self.num_layers)
        self.output_names = [o.name for o in self.decoder_session.get_outputs()]
        decoder_file = manifest.graph_file("decoder", "ort")
        self.appends_kv = manifest.precision.kv_cache(decoder_file) == KV_APPEND
        past_type = next(i.type for i in self.decoder_session.get_inputs() if i.name == self.past_names[0])
        self.kv_dtype = _NUMPY_TYPES.get(past_type, np.float32)

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision_session.run(["image_features"], {"pixel_values": pixel_values})[0]

    def embed(self, input_ids, text_attention_mask, image_features, threshold: float) -> dict:
        names = ["inputs_embeds", "attention_mask", "position_ids", "gather_index"]
        feeds = {
            "input_ids": input_ids,
            "text_attention_mask": text_attention_mask,
            "image_features": image_features,
            "threshold": np.asarray(threshold, np.float32),
        }
        return dict(zip(names, self.embedding_session.run(names, feeds)))

    def empty_cache(self, batch: int):
        if self.appends_kv:
            return KVBuffer(batch, self.manifest.dims, self.kv_dtype, int(self.manifest.dims["max_position_embeddings"]))
        return list(empty_past(self.manifest.dims, batch, self.kv_dtype).values())

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        """One decoder call; `past` and the returned cache are flat [k0, v0, k1, v1, ...] lists, or one
        KVBuffer (from empty_cache) that every call appends to."""
        if isinstance(past, KVBuffer):
            logits = decode_append(self.decoder_session, self.past_names, self.present_names, inputs_embeds,
                                   attention_mask, position_ids, past)
            return logits, past
        if self.device == "cuda":
            return self._decode_bound(inputs_embeds, attention_mask, position_ids, past)
        feeds = prefill_feeds(inputs_embeds, attention_mask, position_ids, dict(zip(self.past_names, past)))
        outputs = self.decoder_session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def _decode_bound(self, inputs_embeds, attention_mask, position_ids, past):
        import onnxruntime as ort

        binding = self.decoder_session.io_binding()
        binding.bind_cpu_input("inputs_embeds", inputs_embeds)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", position_ids)
        for name, value in zip(self.past_names, past):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, "cuda")  # the cache stays on the GPU between steps
        self.decoder_session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]
