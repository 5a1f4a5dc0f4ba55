"""Real decoder inputs for int8 calibration, made by the artifact's own Pipeline.

A quantized decoder is only as good as the activations it was calibrated on. LLaVA decoders see two
kinds of rows, image features from the projector and text embeddings, and text-only calibration is a
known way to wreck them (TensorRT-LLM #1860: INT4 AWQ on LLaVA calibrated on text). So every sample
(load.datasets: an image and a prompt) goes through the artifact itself:

    image --preprocess--> pixel_values --vision.onnx--> image_features
    prompt --tokenizer + chat template--> input_ids --embedding.onnx (AnchorInsert)--> decoder inputs

(Pipeline.front_end), giving the decoder inputs exactly as the runtime feeds decoder.onnx (anchors
included), with an empty KV cache. `channel_absmax` runs a graph over a reader's samples and keeps the
largest magnitude per channel of the values asked for: SmoothQuant's statistics, and (their maximum) the
int8 QDQ form's activation ranges.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

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


def channel_values(model_path: Path, reader, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Each named value as [rows, channels] (its last axis the channels), one dict per sample of `reader`
    (an onnxruntime CalibrationDataReader-like get_next/rewind). The values are added as graph outputs of
    a temporary copy of the graph beside the model (the weights are not copied); one sample at a time."""
    import onnx
    from attanchor_runtime.sessions import ort_session

    model_path = Path(model_path)
    proto = onnx.load(str(model_path), load_external_data=False)
    present = {o.name for o in proto.graph.output}
    inputs = {i.name for i in proto.graph.input}  # read from the feeds: a graph input cannot be an output
    for name in names:
        if name not in present and name not in inputs:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.NamedTemporaryFile(dir=model_path.parent, prefix=".calibration-stats-", suffix=".onnx") as tmp:
        tmp.write(proto.SerializeToString())
        tmp.flush()
        del proto
        # A few calls on float weights, at the export's peak for a big model: no repacked copy of every
        # weight, no arena kept at its high-water mark.
        session = ort_session(Path(tmp.name), memory_arena=False, prepack=False)
        computed = [n for n in names if n not in inputs]
        reader.rewind()
        while (feeds := reader.get_next()) is not None:
            outs = dict(zip(computed, session.run(computed, feeds) if computed else []))
            values = {}
            for name in names:
                out = np.asarray(feeds[name] if name in inputs else outs[name], np.float32)
                values[name] = out.reshape(-1, out.shape[-1])
            yield values
        reader.rewind()
        del session


def channel_absmax(model_path: Path, reader, names: list[str]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each named value, over every sample of `reader` (channel_values)."""
    maxima: dict[str, np.ndarray] = {}
    for values in channel_values(model_path, reader, names):
        for name, rows in values.items():
            m = np.abs(rows).max(axis=0).astype(np.float64)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    return maxima


__all__ = ["DecoderCalibrationReader", "VisionCalibrationReader", "channel_absmax", "channel_values"]
