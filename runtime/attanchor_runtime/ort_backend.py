"""The ONNX Runtime backend: three sessions and a KV cache handed from one step to the next.

The decoder graph concatenates past and new keys itself, so Python never copies the cache: each
step's `present` arrays become the next step's `past` as they are. On CUDA the cache stays on the
device through IO binding (OrtValues in, OrtValues out), so no step round-trips through host memory.
"""

from __future__ import annotations

import numpy as np

from .decoder_feeds import empty_past, past_names, prefill_feeds
from .manifest import Manifest
from .sessions import ort_session


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
        self.output_names = [o.name for o in self.decoder_session.get_outputs()]

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

    def empty_cache(self, batch: int) -> list:
        return list(empty_past(self.manifest.dims, batch).values())

    def decode(self, inputs_embeds, attention_mask, position_ids, past: list) -> tuple[np.ndarray, list]:
        """One decoder call; `past` and the returned cache are flat [k0, v0, k1, v1, ...] lists."""
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
