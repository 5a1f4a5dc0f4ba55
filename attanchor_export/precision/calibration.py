"""Real decoder inputs for int8 calibration, made by the artifact's own Pipeline.

A quantized decoder is only as good as the activations it was calibrated on. LLaVA decoders see two
kinds of rows, image features from the projector and text embeddings, and text-only calibration is a
known way to wreck them (TensorRT-LLM #1860: INT4 AWQ on LLaVA calibrated on text). So every sample
(load.datasets: an image and a prompt) goes through the artifact itself:

    image --preprocess--> pixel_values --vision.onnx--> image_features
    prompt --tokenizer + chat template--> input_ids --embedding.onnx (AnchorInsert)--> decoder inputs

(Pipeline.front_end), giving the decoder inputs exactly as the runtime feeds decoder.onnx (anchors
included), with an empty KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from attanchor_runtime.ort_backend import empty_past
from attanchor_runtime.pipeline import Pipeline

from attanchor_export.load.datasets import Sample


class DecoderCalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader protocol over decoder prefill feeds (batch 1 per
    sample, empty past), computed up front by the artifact's fp32 vision + embedding graphs."""

    def __init__(self, feeds: Iterable[dict]):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    @classmethod
    def from_samples(cls, pipe: Pipeline, samples: Sequence[Sample]) -> DecoderCalibrationReader:
        manifest = pipe.manifest
        spec, dims = manifest.graphs.decoder, manifest.dims
        names = [n for n in spec.input_names if n not in spec.past_names]
        feeds = []
        for s in samples:
            front = pipe.front_end([pipe.prompt_ids(s.prompt)], pipe.images(s.image))
            inputs = dict(zip(names, (front.inputs_embeds, front.attention_mask, front.position_ids)))
            feeds.append({**inputs, **empty_past(spec.past_names, 1, dims.num_kv_heads, dims.head_dim)})
        return cls(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


class VisionCalibrationReader(DecoderCalibrationReader):
    """Same, for vision.onnx: one pixel input batch of 1 per distinct image (easy-vqa's calibration set
    asks several questions about one image: its label names the image)."""

    @classmethod
    def from_samples(cls, pipe: Pipeline, samples: Sequence[Sample]) -> VisionCalibrationReader:
        distinct = {s.label or id(s): s for s in samples}.values()
        return cls(pipe.family.vision_feeds(np.asarray(pipe.images(s.image)), 1) for s in distinct)


__all__ = ["DecoderCalibrationReader", "VisionCalibrationReader"]
