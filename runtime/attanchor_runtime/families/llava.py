"""LLaVA at run time: CLIP/SigLIP preprocessing, one image placeholder per row, 1-D sequential positions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
        if not np.isfinite(pixels).all():
            raise RuntimeInputError("pixel_values contain NaN or Inf")
        (name,) = self.manifest.graphs.vision.input_names
        return {name: pixels.astype(np.float32, copy=False)}

    def example_pixels(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        size = self.manifest.dims.image_size
        return rng.standard_normal((batch, 3, size, size)).astype(np.float32)

    def prompt_ids(self, text, question: str) -> np.ndarray:
        return text.prompt_ids(question)

    def prepare_batch(self, input_ids, attention_mask=None) -> PreparedBatch:
        text = self.manifest.text
        return prepare_input_ids(input_ids, text.image_token_id, text.pad_or_zero, attention_mask)

    def embedding_feeds(self, batch: PreparedBatch, image_features: np.ndarray, threshold: float,
                        vision_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask, features, thr = self.manifest.graphs.embedding.input_names
        return {ids: batch.input_ids, mask: batch.attention_mask,
                features: np.asarray(image_features, np.float32), thr: np.asarray(threshold, np.float32)}

    def first_step(self, attention_mask: np.ndarray, position_ids: np.ndarray) -> SequentialStep:
        return SequentialStep.after_prefill(attention_mask, position_ids)
