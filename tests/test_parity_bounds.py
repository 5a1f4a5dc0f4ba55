"""The export check's inputs and bounds (attanchor_export.checks.parity), without a model: validation prompts
are laid out as real ones are, and the present-KV bound scales with each layer's own magnitude."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from attanchor_runtime.decode import SequentialStep

from attanchor_export.checks.parity import (
    TEXT_BEFORE_IMAGE,
    DecoderCall,
    ParityCase,
    _compare_decoder,
    make_prompts,
)

IMAGE, PAD = 7, 0
MANIFEST = SimpleNamespace(text=SimpleNamespace(image_token_id=IMAGE, pad_token_id=PAD, pad_or_zero=PAD),
                           dims=SimpleNamespace(vocab_size=50))


def test_image_placeholder_follows_a_role_prefix():
    """3 text tokens before the image (as ChatML's `<|im_start|>user\n`) and one after it. Patches at the
    first positions are ill-conditioned in trained LMs (scripts/measure_parity_conditioning.py)."""
    rng = np.random.default_rng(0)
    pool = np.arange(10, 50)
    for draw in range(300):
        lengths = [int(n) for n in rng.integers(5, 14, size=3)]
        ids, mask = make_prompts(MANIFEST, rng, lengths, pool if draw % 2 else None)
        for row, m, n in zip(ids, mask, lengths, strict=True):
            real = row[m.astype(bool)]
            assert len(real) == n and (real == IMAGE).sum() == 1
            at = int(np.flatnonzero(real == IMAGE)[0])
            assert TEXT_BEFORE_IMAGE == 3 and 3 <= at <= n - 2, (draw, real)


class ReplayDecoder:
    """Returns fixed outputs: the reference's, with `shift` added to one layer's key."""

    def __init__(self, logits, cache):
        self.logits, self.cache = logits, cache

    def empty_cache(self, batch):
        return []

    def decode(self, inputs_embeds, attention_mask, position_ids, cache):
        return self.logits, self.cache


def _present_check(key_scale: float, shift: float):
    rng = np.random.default_rng(1)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int64)
    step = SequentialStep(mask, np.array([[1, 0, 1, 2], [0, 1, 2, 3]], np.int64))
    logits = rng.standard_normal((2, 4, 11)).astype(np.float32)
    present = {j: (rng.uniform(-1, 1, (2, 1, 4, 8)).astype(np.float32) * (key_scale if j == 1 else 1),
                   rng.uniform(-1, 1, (2, 1, 4, 8)).astype(np.float32)) for j in (0, 1)}
    ref = DecoderCall(np.zeros((2, 4, 3), np.float32), step, logits, present, mask.astype(bool))
    cache = [t.copy() for j in (0, 1) for t in present[j]]
    cache[2][1, 0, 2, 5] += shift  # layer 1's key, a real position
    cache[0][0, 0, 0, :] += 1.0  # layer 0's key at row 0's padding: never compared
    case = ParityCase("fake", None, None, 2.0, None, None, [ref])
    results = _compare_decoder(ReplayDecoder(logits, cache), case, [0, 1], 1e-4)
    return {r.metric: r for r in results}


def test_present_bound_scales_with_the_layer_magnitude():
    """Same 2e-4 error on a key: within bounds when that layer's keys reach 20 (1e-4 + 1e-5 x 20 = 3e-4),
    out of them when they stay under 1 (~1.1e-4); padding never counts."""
    large = _present_check(key_scale=20.0, shift=2e-4)["present_max_abs_diff"]
    assert large.passed and abs(large.value - 2e-4) < 4e-6 and 2.9e-4 < large.limit <= 3e-4
    small = _present_check(key_scale=1.0, shift=2e-4)["present_max_abs_diff"]
    assert not small.passed and small.limit < 1.11e-4
    exact = _present_check(key_scale=1.0, shift=0.0)
    assert exact["present_max_abs_diff"].value == 0.0 and exact["logits_max_abs_diff"].passed
