"""LLaVA at run time: CLIP/SigLIP preprocessing, one image placeholder per row, 1-D sequential positions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from attanchor_graphs.specification import anchor_insert, candidate_mask_from_ids, position_ids_from_mask

from ..batch import PreparedBatch, prepare_input_ids
from ..decode import SequentialStep
from ..errors import RuntimeInputError
from ..preprocess import ImagePreprocessor
from .base import RuntimeFamily, register


@dataclass(frozen=True)
class LlavaPayload:
    """manifest family.payload of a LLaVA artifact."""

    image_preprocessing: Mapping[str, Any] = field(default_factory=dict)  # ImagePreprocessor.from_config
    positions: str = "sequential"  # position_ids = cumsum(mask) - 1; each new token at the last + 1


@register("llava")
class Llava(RuntimeFamily):
    payload_type = LlavaPayload

    def image_processor(self) -> ImagePreprocessor:
        return ImagePreprocessor.from_config(self.payload.image_preprocessing)

    def _value_range(self, margin: float = 0.0) -> tuple[float, float]:
        if not hasattr(self, "_processor"):
            self._processor = self.image_processor()
        return self._processor.value_range(margin)

    def vision_feeds(self, pixel_values, batch: int, **image_inputs) -> dict[str, np.ndarray]:
        if image_inputs:
            raise RuntimeInputError(f"unexpected image inputs {sorted(image_inputs)}: a LLaVA artifact takes "
                                    "pixel_values only")
        pixels = np.asarray(pixel_values)
        size = self.manifest.dims.image_size
        if pixels.shape != (batch, 3, size, size):
            raise RuntimeInputError(
                f"pixel_values must be float32 [{batch}, 3, {size}, {size}] (one image per row), got {pixels.shape}"
            )
        if not np.issubdtype(pixels.dtype, np.floating):
            raise RuntimeInputError(
                f"pixel_values must be float32 as the image processor makes them (pipe.images(image)), got "
                f"{pixels.dtype}: raw 0-255 pixels are not normalized"
            )
        self._check_pixel_values(pixels, "pipe.images(image)")
        (name,) = self.manifest.graphs.vision.input_names
        return {name: pixels.astype(np.float32, copy=False)}

    def _check_pixel_values(self, pixels: np.ndarray, make_them: str) -> None:
        """Finite, and within what the artifact's image processor can make (raw 0-255 pixels are not)."""
        if not np.isfinite(pixels).all():
            raise RuntimeInputError("pixel_values contain NaN or Inf")
        low, high = self._value_range(margin=4.0)
        if pixels.min() < low or pixels.max() > high:
            made = self._value_range()
            raise RuntimeInputError(
                f"pixel_values range from {float(pixels.min()):.4g} to {float(pixels.max()):.4g}, far outside "
                f"what the artifact's image processor makes ({made[0]:.3g} to {made[1]:.3g}): pass "
                f"{make_them}, not raw pixels"
            )

    def example_pixels(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        size = self.manifest.dims.image_size
        return rng.standard_normal((batch, 3, size, size)).astype(np.float32)

    def prompt_ids(self, text, question: str) -> np.ndarray:
        return text.prompt_ids(question)

    def chat_ids(self, text, messages: list[dict]) -> np.ndarray:
        return text.chat_ids(messages)

    def prepare_batch(self, input_ids, attention_mask=None) -> PreparedBatch:
        text = self.manifest.text
        return prepare_input_ids(input_ids, text.image_token_id, text.pad_or_zero, attention_mask,
                                 vocab_size=self.manifest.embed_table.shape[0])

    def embedding_feeds(self, batch: PreparedBatch, image_features: np.ndarray, threshold: float,
                        vision_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask, features, thr = self.manifest.graphs.embedding.input_names
        return {ids: batch.input_ids, mask: batch.attention_mask,
                features: np.asarray(image_features, np.float32), thr: np.asarray(threshold, np.float32)}

    def capped_embedding(self, batch: PreparedBatch, image_features: np.ndarray, threshold: float, cap: int,
                         vision_feeds: dict[str, np.ndarray], embed_table: np.ndarray) -> dict[str, np.ndarray]:
        ids, mask = batch.input_ids, batch.attention_mask
        text = np.asarray(embed_table[ids], np.float32)
        features = np.asarray(image_features, np.float32)
        image_position = np.argmax(ids == self.manifest.text.image_token_id, axis=1).astype(np.int64)
        limit = (np.float32(np.inf), None) if cap == 0 else (threshold, cap)  # K = 0 means "no budget"
        excluded = self.manifest.anchor.excluded_token_ids  # AnchorInsert v2: these ids are never anchors
        gather, out_mask = anchor_insert(text, features, mask, image_position, limit[0], self.manifest.anchor.mode,
                                         limit[1], candidate_mask_from_ids(ids, excluded) if excluded else None)
        used = int(out_mask.sum(axis=1).max())
        gather, out_mask = gather[:, gather.shape[1] - used:], out_mask[:, out_mask.shape[1] - used:]
        embeds = np.take_along_axis(np.concatenate([text, features], axis=1), gather[:, :, None], axis=1)
        names = self.manifest.graphs.embedding.output_names  # embeddings, mask, positions, gather index
        positions = self.position_ids(out_mask, gather, mask, image_position)
        return dict(zip(names, (embeds, out_mask, positions, gather), strict=True))

    def position_ids(self, out_mask, gather_index, text_attention_mask, image_position) -> np.ndarray:
        """The embedding graph's position ids of an anchored layout, in numpy (capped_embedding)."""
        return position_ids_from_mask(out_mask)

    def text_position_ids(self, attention_mask: np.ndarray) -> np.ndarray:
        return position_ids_from_mask(attention_mask)

    def first_step(self, attention_mask: np.ndarray, position_ids: np.ndarray) -> SequentialStep:
        return SequentialStep.after_prefill(attention_mask, position_ids)
