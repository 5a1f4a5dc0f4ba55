"""The ONNX Runtime backend: three sessions and a KV cache handed from one step to the next.

A standard-op decoder concatenates past and new keys itself: each step's `present` arrays become the
next step's `past` as they are (a whole-cache copy inside the graph per step). A decoder whose
manifest says KV_SHARED_BUFFER (the int4/int8 onnxruntime form, its attention fused into
GroupQueryAttention) instead gets one preallocated buffer per layer on the CPU, bound as both past and
present, which the kernel appends to in place (SharedKV). On CUDA the cache stays on the device
through IO binding (OrtValues in, OrtValues out), so no step round-trips through host memory.
"""

from __future__ import annotations

import numpy as np

from .decoder_feeds import empty_past, past_names, prefill_feeds, present_names
from .errors import RuntimeInputError
from .manifest import KV_SHARED_BUFFER, Manifest
from .sessions import ort_session

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SharedKV:
    """One [B, kv_heads, capacity, head_dim] key and value buffer per layer, written in place by the
    decoder. Capacity grows by doubling (one copy each time, so O(1) per token amortised) up to the
    model's context; past that, a clear error instead of a kernel's out-of-range write."""

    def __init__(self, batch: int, dims: dict, dtype, limit: int, initial: int = 256):
        self.batch, self.dims, self.dtype, self.limit, self.initial = batch, dims, dtype, limit, initial
        self.capacity, self.buffers, self.values = 0, [], []

    def reserve(self, total: int) -> None:
        import onnxruntime as ort

        if total <= self.capacity:
            return
        if total > self.limit:
            raise RuntimeInputError(f"context full: {total} positions, the model's context is {self.limit}")
        capacity = min(self.limit, max(total, 2 * self.capacity, self.initial))
        shape = (self.batch, self.dims["num_kv_heads"], capacity, self.dims["head_dim"])
        buffers = [np.zeros(shape, self.dtype) for _ in range(2 * self.dims["num_layers"])]
        for old, new in zip(self.buffers, buffers):
            new[:, :, : self.capacity] = old
        # OrtValues over the numpy memory (no copy): the kernel's writes land in `buffers`.
        self.capacity, self.buffers = capacity, buffers
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]


def decode_shared(session, past: list[str], present: list[str], inputs_embeds, attention_mask, position_ids,
                  cache: SharedKV) -> np.ndarray:
    """One call of a KV_SHARED_BUFFER decoder session: `cache` grows to the mask's length if needed and is
    bound as both past and present, so the step's keys and values land in it; returns the logits."""
    cache.reserve(attention_mask.shape[1])
    binding = session.io_binding()
    binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds))
    binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask))
    binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids))
    binding.bind_output("logits", "cpu")
    for past_name, present_name, value in zip(past, present, cache.values):
        binding.bind_ortvalue_input(past_name, value)
        binding.bind_ortvalue_output(present_name, value)  # the same memory: appended to in place
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


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
        self.shared_kv = device == "cpu" and manifest.precision.kv_cache(decoder_file) == KV_SHARED_BUFFER
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
        if self.shared_kv:
            return SharedKV(batch, self.manifest.dims, self.kv_dtype, int(self.manifest.dims["max_position_embeddings"]))
        return list(empty_past(self.manifest.dims, batch, self.kv_dtype).values())

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        """One decoder call; `past` and the returned cache are flat [k0, v0, k1, v1, ...] lists, or one
        SharedKV (from empty_cache) that every call appends to in place."""
        if isinstance(past, SharedKV):
            return self._decode_shared(inputs_embeds, attention_mask, position_ids, past)
        if self.device == "cuda":
            return self._decode_bound(inputs_embeds, attention_mask, position_ids, past)
        feeds = prefill_feeds(inputs_embeds, attention_mask, position_ids, dict(zip(self.past_names, past)))
        outputs = self.decoder_session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def _decode_shared(self, inputs_embeds, attention_mask, position_ids, cache: SharedKV):
        logits = decode_shared(self.decoder_session, self.past_names, self.present_names, inputs_embeds,
                               attention_mask, position_ids, cache)
        return logits, cache

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
