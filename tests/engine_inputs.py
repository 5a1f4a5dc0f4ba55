"""Inputs for engine tests (the fake TensorRT in CI, the real one on a GPU): prompt rows and pixels that fit
an artifact's manifest."""

from __future__ import annotations

import numpy as np
from attanchor_runtime.manifest import Manifest


def prompt_rows(folder, rows=((5, 6), (7,))):
    """One int64 row per entry: BOS, the image placeholder, the given ids, then 9, 10."""
    text = Manifest.load(folder, verify="none").text
    return [np.array([text.bos_token_id, text.image_token_id, *r, 9, 10], np.int64) for r in rows]


def random_pixels(folder, batch, seed=0):
    size = Manifest.load(folder, verify="none").dims.image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
