"""AnchorInsert on its own: its inputs for one prompt, its time in ONNX Runtime, and the scores that
pick an "auto" threshold.

Running the embedding graph at threshold 2.0 would not isolate the op: the similarity matrix is still
computed, only no anchor passes. So the op runs in a one-node model (attanchor_graphs.build_anchor_model)
fed the very inputs the embedding graph gives it, in the same ONNX Runtime with the same threads.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def anchor_inputs(pipe, ids: np.ndarray, features: np.ndarray):
    """The AnchorInsert inputs (text embeds, image features, mask, image position) for one prompt row,
    as the embedding graph computes them."""
    ids = ids[None, :] if ids.ndim == 1 else ids
    text = np.asarray(pipe.embed_table[ids], np.float32)
    mask = np.ones_like(ids)
    position = np.argmax(ids == pipe.image_token_id, axis=1).astype(np.int64)
    return text, np.asarray(features, np.float32), mask, position


def best_scores(text, features, mask, position) -> np.ndarray:
    """t2i best cosine per candidate text token (after the image, not padding), numpy float32."""
    scores = []
    for b in range(text.shape[0]):
        t = text[b, position[b] + 1:][mask[b, position[b] + 1:].astype(bool)]
        if not len(t):
            continue
        tn = np.linalg.norm(t, axis=-1, keepdims=True)
        fn = np.linalg.norm(features[b], axis=-1, keepdims=True)
        s = (t @ features[b].T) / np.maximum(tn * fn.T, 1e-30)
        scores.append(s.max(axis=1))
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


class AnchorOp:
    """AnchorInsert alone in ONNX Runtime (the model-local function the embedding graph inlines)."""

    def __init__(self, manifest, threads):
        import onnxruntime as ort
        from attanchor_graphs.model import build_anchor_model

        anchor = manifest.anchor
        model = build_anchor_model(anchor.mode, anchor.max_anchors)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def time(self, text, features, mask, position, threshold, runs: int = 25) -> tuple[float, float]:
        """(median, best) seconds of one AnchorInsert call."""
        feeds = {"text_embeds": text, "image_features": features, "text_attention_mask": mask,
                 "image_position": position, "threshold": np.asarray(threshold, np.float32)}
        self.session.run(None, feeds)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        return float(statistics.median(times)), float(min(times))
