"""scripts/measure_int4_sensitivity.py's int4 rounding: the clip search it measures against onnxruntime's
rounding (docs/QUANTIZATION.md, "Block 256") writes MatMulNBits' layout, and at factor 1 is that rounding."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import load_script

from attanchor_export.precision.prefill_int8 import dequantize_nbits
from attanchor_export.precision.streamed_weights import _quantizer


@pytest.fixture(scope="module")
def measure():
    return load_script("measure_int4_sensitivity")


def _dequantized(packed, scales, zeros, k, block):
    """[K, N] fp32 of MatMulNBits' 4-bit layout, as the prompt graph's writer reads it."""
    return dequantize_nbits(packed, scales, zeros, 4, block, k, len(packed)).T


@pytest.mark.parametrize("k, block", [(576, 128), (576, 256), (256, 128)])  # 576: a padded last block, odd count
def test_factor_one_is_onnxruntimes_rounding(measure, k, block):
    rng = np.random.default_rng(k + block)
    w = (rng.standard_normal((k, 48)) * rng.uniform(0.01, 2, (1, 48))).astype(np.float32)
    w[5, 3] = 40.0  # an outlier
    w[:, 7] = 0.0  # a dead column: codes 0, scale 0
    w[:, 9] = -np.abs(w[:, 9])  # all negative: the range still holds 0
    ours = measure.clip_search_blocks(w, block, factors=(1.0,))
    theirs = _quantizer(4, block, False, False, 4).qbits_block_quant(w)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_the_search_never_rounds_worse(measure):
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (512, 64)).astype(np.float32)  # heavy tails: where a narrower range pays
    plain = measure.clip_search_blocks(w, 256, factors=(1.0,))
    searched = measure.clip_search_blocks(w, 256)
    err = [((_dequantized(*q, 512, 256) - w) ** 2).reshape(2, 256, 64).sum(1) for q in (plain, searched)]
    assert (err[1] <= err[0] + 1e-6).all() and err[1].sum() < 0.95 * err[0].sum()


def test_weighted_search_favours_the_heavy_channels(measure):
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, (256, 64)).astype(np.float32)
    flat = measure.clip_search_blocks(w, 128, channel_weight=np.full(256, 3.0, np.float32))
    for a, b in zip(flat, measure.clip_search_blocks(w, 128)):  # a uniform weight is no weight
        np.testing.assert_array_equal(a, b)
    heavy = np.ones(256, np.float32)
    heavy[::16] = 1e4  # a few channels whose activations run large
    weighted = measure.clip_search_blocks(w, 128, channel_weight=heavy)
    err = [(_dequantized(*q, 256, 128) - w) ** 2 for q in (flat, weighted)]
    assert err[1][::16].sum() < err[0][::16].sum()  # the heavy rows' error falls
    assert (err[1] * heavy[:, None]).sum() <= (err[0] * heavy[:, None]).sum()  # and the weighted total with it
