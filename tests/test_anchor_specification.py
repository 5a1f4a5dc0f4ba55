"""Hand-worked cases for the numpy AnchorInsert specification (attanchor_graphs.specification).

The shared example (T=5, placeholder at 1, M=3, D=2)::

    I_0 = ( 1, 0)   I_1 = (0, 1)   I_2 = (-1, 0)
    T_0 = ( 1, 0)   prefix text, similar to I_0 but never a candidate
    T_1 = ( 0, 0)   the image placeholder
    T_2 = ( 0, 2)   cos = (0, 1, 0)                    -> best I_1, score 1
    T_3 = ( 1, 1)   cos = (.707, .707, -.707)  (tie)   -> best I_0 (first), score .707
    T_4 = (-3, 1)   cos = (-.949, .316, .949)          -> best I_2, score .949

concat(text, image) indices: text n -> n, image m -> 5 + m.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from attanchor_graphs.specification import (
    anchor_insert,
    anchor_pairs,
    cosine_scores,
    position_ids_from_mask,
)

T_VECS = [[1, 0], [0, 0], [0, 2], [1, 1], [-3, 1]]
I_VECS = [[1, 0], [0, 1], [-1, 0]]


def _case(text=T_VECS, image=I_VECS):
    x = np.array([text], dtype=np.float32)
    y = np.array([image], dtype=np.float32)
    mask = np.ones((1, x.shape[1]), dtype=np.int64)
    pos = np.array([1], dtype=np.int64)
    return x, y, mask, pos


def _run(threshold, mode="t2i", k=None, **kw):
    x, y, mask, pos = _case(**kw)
    return anchor_insert(x, y, mask, pos, np.float32(threshold), mode=mode, max_anchors=k)


def _plain_layout(mask_row, p, t, m):
    """The unmodified LLaVA layout of one row: text before, image block, text after."""
    valid = [n for n in range(t) if mask_row[n]]
    return [n for n in valid if n < p] + [t + j for j in range(m)] + [n for n in valid if n > p]


# ---------------------------------------------------------------------------------------------
# text-into-image


def test_t2i_hand_worked_all_anchors():
    gi, om = _run(0.5)
    #                      T0 I0 T3 I1 T2 I2 T4 | T2 T3 T4
    assert gi.tolist() == [[0, 5, 3, 6, 2, 7, 4, 2, 3, 4]]
    assert om.tolist() == [[1] * 10]
    assert gi.dtype == np.int64 and om.dtype == np.int64
    assert anchor_pairs(gi, om, 5, "t2i") == [[(3, 0), (2, 1), (4, 2)]]


def test_t2i_threshold_is_inclusive_and_filters():
    gi, _ = _run(0.8)  # drops T_3 (.707)
    assert gi.tolist() == [[0, 5, 6, 2, 7, 4, 2, 3, 4]]
    gi, _ = _run(1.0)  # score exactly 1.0 >= 1.0 is kept
    assert gi.tolist() == [[0, 5, 6, 2, 7, 2, 3, 4]]


def test_t2i_several_anchors_on_one_image_keep_prompt_order():
    # T_2 = (0,2) and T_4 = (0,3) both pick I_1 -> I_1, T_2, T_4 in ascending n.
    text = [[1, 0], [0, 0], [0, 2], [0, -1], [0, 3]]
    gi, _ = _run(0.5, text=text)
    assert gi.tolist() == [[0, 5, 6, 2, 4, 7, 2, 3, 4]]
    assert anchor_pairs(gi, np.ones_like(gi), 5, "t2i") == [[(2, 1), (4, 1)]]


def test_t2i_budget():
    # K=1 keeps T_2 (score 1). L = T - 1 + M + K = 8: no padding left.
    gi, om = _run(0.5, k=1)
    assert gi.tolist() == [[0, 5, 6, 2, 7, 2, 3, 4]]
    assert om.tolist() == [[1] * 8]
    # K=2 keeps T_2 (1.0) and T_4 (.949) and drops T_3 (.707).
    gi, om = _run(0.5, k=2)
    assert gi.tolist() == [[0, 5, 6, 2, 7, 4, 2, 3, 4]]
    # K=5 > 3 anchors: all kept, two unused slots become left padding (L = 12).
    gi, om = _run(0.5, k=5)
    assert gi.tolist() == [[0, 0, 0, 5, 3, 6, 2, 7, 4, 2, 3, 4]]
    assert om.tolist() == [[0, 0] + [1] * 10]
    # max_anchors=0 means no budget, like None.
    assert np.array_equal(_run(0.5, k=0)[0], _run(0.5)[0])


def test_t2i_budget_ties_go_to_lower_n():
    # T_2 and T_3 both score exactly 1 on I_1; K=1 keeps T_2.
    text = [[1, 0], [0, 0], [0, 1], [0, 2], [-3, -3]]
    gi, _ = _run(0.5, k=1, text=text)
    assert gi.tolist() == [[0, 5, 6, 2, 7, 2, 3, 4]]


def test_t2i_argmax_tie_goes_to_first_image():
    # T_3 = (1,1) is equally close to I_0 and I_1: it goes after I_0.
    gi, _ = _run(0.7)
    assert anchor_pairs(gi, np.ones_like(gi), 5, "t2i") == [[(3, 0), (2, 1), (4, 2)]]


# ---------------------------------------------------------------------------------------------
# image-into-text


def test_i2t_hand_worked():
    # I_0 -> best T_3 (.707), I_1 -> T_2 (1), I_2 -> T_4 (.949).
    gi, om = _run(0.5, mode="i2t")
    #                      T0 I0 I1 I2 T2 I1 T3 I0 T4 I2
    assert gi.tolist() == [[0, 5, 6, 7, 2, 6, 3, 5, 4, 7]]
    assert om.tolist() == [[1] * 10]
    assert anchor_pairs(gi, om, 5, "i2t") == [[(2, 1), (3, 0), (4, 2)]]


def test_i2t_several_copies_after_one_token_in_image_order():
    # I_2 = (0,2) also picks T_2 (cos exactly 1): T_2 is followed by I_1 then I_2.
    image = [[1, 0], [0, 1], [0, 2]]
    gi, om = _run(0.5, mode="i2t", image=image)
    assert gi.tolist() == [[0, 5, 6, 7, 2, 6, 7, 3, 5, 4]]
    assert anchor_pairs(gi, om, 5, "i2t") == [[(2, 1), (2, 2), (3, 0)]]
    # K=1: I_1 and I_2 tie at exactly 1.0, the lower m wins. L = 4 + 3 + 1 = 8.
    gi, om = _run(0.5, mode="i2t", image=image, k=1)
    assert gi.tolist() == [[0, 5, 6, 7, 2, 6, 3, 4]]
    assert om.tolist() == [[1] * 8]
    gi, om = _run(0.5, mode="i2t", image=image, k=2)
    assert gi.tolist() == [[0, 5, 6, 7, 2, 6, 7, 3, 4]]


def test_float32_operation_order_is_part_of_the_spec():
    # |(1,1)|^2 = sqrt(2)*sqrt(2) is 1.9999999 in float32, so cos((1,1),(1,1)) = 1.0000001:
    # it beats an exact 1.0 under a budget. Any other evaluation order could flip this.
    image = [[1, 0], [0, 1], [1, 1]]
    s = cosine_scores(*_case(image=image)[:2])
    assert s[0, 3, 2] == np.float32(1.0000001) and s[0, 2, 1] == np.float32(1.0)
    gi, _ = _run(0.5, mode="i2t", image=image, k=1)
    assert gi.tolist() == [[0, 5, 6, 7, 2, 3, 7, 4]]


def test_i2t_argmax_ties_go_to_first_candidate():
    # Every candidate text token is identical: each image copies after T_2 only.
    text = [[1, 0], [0, 0], [2, 1], [2, 1], [2, 1]]
    gi, om = _run(-1.0, mode="i2t", text=text)
    assert gi.tolist() == [[0, 5, 6, 7, 2, 5, 6, 7, 3, 4]]


def test_i2t_no_text_after_image():
    x, y, mask, _ = _case()
    pos = np.array([4])
    for mode in ("t2i", "i2t"):
        gi, om = anchor_insert(x, y, mask, pos, -1.0, mode=mode)
        assert gi.tolist() == [[0, 1, 2, 3, 5, 6, 7]]
        assert anchor_pairs(gi, om, 5, mode) == [[]]


# ---------------------------------------------------------------------------------------------
# batches, padding, plain layout


def test_padded_batch():
    x0, y0, _, _ = _case()
    # Row 1: two padding tokens whose vectors would make perfect anchors if they were
    # candidates, prefix T_2, placeholder at 3, one candidate T_4 -> I_1.
    x1 = np.array([[0, 1], [0, 1], [1, 0], [0, 0], [0, 3]], dtype=np.float32)
    x = np.stack([x0[0], x1])
    y = np.concatenate([y0, y0])
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    pos = np.array([1, 3])
    gi, om = anchor_insert(x, y, mask, pos, 0.5)
    assert gi.tolist() == [
        [0, 5, 3, 6, 2, 7, 4, 2, 3, 4],
        [0, 0, 0, 0, 2, 5, 6, 4, 7, 4],
    ]
    assert om.tolist() == [[1] * 10, [0] * 4 + [1] * 6]
    assert anchor_pairs(gi, om, 5, "t2i") == [[(3, 0), (2, 1), (4, 2)], [(4, 1)]]
    assert position_ids_from_mask(om).tolist() == [
        list(range(10)),
        [1, 1, 1, 1, 0, 1, 2, 3, 4, 5],
    ]
    # With a budget every row is padded to the static T - 1 + M + K.
    gi, om = anchor_insert(x, y, mask, pos, 0.5, max_anchors=2)
    assert gi.shape == (2, 5 - 1 + 3 + 2)
    assert gi.tolist() == [
        [0, 5, 6, 2, 7, 4, 2, 3, 4],
        [0, 0, 0, 2, 5, 6, 4, 7, 4],
    ]


@pytest.mark.parametrize("mode", ["t2i", "i2t"])
@pytest.mark.parametrize("k", [None, 3])
def test_threshold_above_one_is_plain_llava(mode, k):
    rng = np.random.default_rng(0)
    b, t, m, d = 3, 9, 4, 6
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    y = rng.standard_normal((b, m, d)).astype(np.float32)
    x[0, 5] = y[0, 2]  # an exact match still scores <= 1 (or a hair above: 1.01 covers it)
    mask = np.ones((b, t), dtype=np.int64)
    mask[1, :2] = 0
    mask[2, :5] = 0
    pos = np.array([2, 4, 8])
    gi, om = anchor_insert(x, y, mask, pos, 1.01, mode=mode, max_anchors=k)
    rows = [_plain_layout(mask[i], pos[i], t, m) for i in range(b)]
    length = max(map(len, rows)) if k is None else t - 1 + m + k
    assert gi.shape == om.shape == (b, length)
    for i, row in enumerate(rows):
        pad = length - len(row)
        assert gi[i].tolist() == [0] * pad + row
        assert om[i].tolist() == [0] * pad + [1] * len(row)
    assert anchor_pairs(gi, om, t, mode) == [[], [], []]


# ---------------------------------------------------------------------------------------------
# scores: zero vectors and NaN


def test_zero_vectors_score_zero():
    text = [[1, 0], [0, 0], [0, 0], [1, 1], [-3, 1]]
    image = [[1, 0], [0, 0], [-1, 0]]
    s = cosine_scores(*_case(text, image)[:2])
    assert not np.isnan(s).any()
    assert (s[0, 2] == 0).all() and (s[0, 1] == 0).all()  # zero text rows
    assert (s[0, :, 1] == 0).all()  # zero image column
    # Threshold 0: the zero-vector T_2 scores 0 everywhere -> anchor of the first image.
    gi, om = _run(0.0, text=text, image=image)
    assert anchor_pairs(gi, om, 5, "t2i") == [[(2, 0), (3, 0), (4, 2)]]
    # Any positive threshold drops it.
    gi, om = _run(0.01, text=text, image=image)
    assert anchor_pairs(gi, om, 5, "t2i") == [[(3, 0), (4, 2)]]


@pytest.mark.parametrize("mode", ["t2i", "i2t"])
def test_nan_is_never_an_anchor(mode):
    text = [[1, 0], [0, 0], [np.nan, 1], [0, 2], [np.nan, np.nan]]
    image = [[np.nan, 0], [0, 1], [0, 1]]
    x, y, mask, pos = _case(text, image)
    s = cosine_scores(x, y)
    assert not np.isnan(s).any()
    assert (s[0, 2] == -np.inf).all() and (s[0, :, 0] == -np.inf).all()
    for thr in (-np.inf, -1.0, 0.5):
        gi, om = anchor_insert(x, y, mask, pos, np.float32(thr), mode=mode)
        pairs = anchor_pairs(gi, om, 5, mode)[0]
        # Only T_3 with I_1 (first of the two equal images) is a valid finite score.
        if mode == "t2i":
            assert pairs == [(3, 1)]
        else:
            assert pairs == [(3, 1), (3, 2)]


def test_nan_threshold_inserts_nothing():
    gi, _ = _run(np.nan)
    assert gi.tolist() == [[0, 5, 6, 7, 2, 3, 4]]


# ---------------------------------------------------------------------------------------------
# helpers


def test_position_ids_from_mask():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(mask).dtype == np.int64


def test_anchor_pairs_roundtrip_random():
    rng = np.random.default_rng(1)
    for _ in range(50):
        b, t, m, d = 2, 8, 4, 3
        x = rng.integers(-2, 3, (b, t, d)).astype(np.float32)
        y = rng.integers(-2, 3, (b, m, d)).astype(np.float32)
        mask = np.ones((b, t), dtype=np.int64)
        mask[1, :3] = 0
        pos = np.array([rng.integers(0, t), rng.integers(3, t)])
        s = cosine_scores(x, y)
        for mode in ("t2i", "i2t"):
            gi, om = anchor_insert(x, y, mask, pos, 0.3, mode=mode)
            for i, pairs in enumerate(anchor_pairs(gi, om, t, mode)):
                n_valid = int(mask[i].sum())
                assert int(om[i].sum()) == n_valid - 1 + m + len(pairs)
                for n, j in pairs:
                    assert n > pos[i] and mask[i, n] == 1
                    assert s[i, n, j] >= np.float32(0.3)


def test_reference_is_fast_at_llava_scale():
    rng = np.random.default_rng(2)
    b, t, m, d = 4, 700, 576, 256
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    y = rng.standard_normal((b, m, d)).astype(np.float32)
    mask = np.ones((b, t), dtype=np.int64)
    mask[1, :40] = 0
    pos = np.array([30, 60, 30, 30])
    start = time.perf_counter()
    for mode in ("t2i", "i2t"):
        gi, om = anchor_insert(x, y, mask, pos, 0.1, mode=mode)
        anchor_pairs(gi, om, t, mode)
    # Generous: the target is well under a second per call; this only catches O(T*M) Python.
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mode="x2y"), "mode must be one of"),
        (dict(max_anchors=-1), "max_anchors"),
        (dict(max_anchors=1.5), "max_anchors"),
        (dict(max_anchors=True), "max_anchors"),
        (dict(image_position=np.array([5])), "out of range"),
        (dict(image_position=np.array([-1])), "out of range"),
        (dict(image_position=np.array([1, 1])), "image_position must have shape"),
        (dict(image_position=np.array([1.0])), "integer"),
        (dict(attention_mask=np.array([[1, 0, 1, 1, 1]])), "padding token"),
        (dict(attention_mask=np.array([[1, 2, 1, 1, 1]])), "0 \\(padding\\) or 1"),
        (dict(attention_mask=np.ones((1, 4), np.int64)), "attention_mask must have shape"),
        (dict(attention_mask=np.ones((1, 5), np.float32)), "integer"),
        (dict(text_embeds=np.zeros((1, 5, 2), np.float64)), "float32"),
        (dict(text_embeds=np.zeros((5, 2), np.float32)), "shape \\[B, \\*, D\\]"),
        (dict(image_features=np.zeros((1, 3, 4), np.float32)), "does not match"),
        (dict(image_features=np.zeros((2, 3, 2), np.float32)), "does not match"),
        (dict(image_features=np.zeros((1, 0, 2), np.float32)), ">= 1"),
        (dict(threshold=np.array([0.5], np.float32)), "scalar"),
        (dict(threshold="0.5"), "real number"),
    ],
)
def test_validation(change, message):
    x, y, mask, pos = _case()
    kwargs = dict(text_embeds=x, image_features=y, attention_mask=mask, image_position=pos, threshold=0.5)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        anchor_insert(**kwargs)


def test_anchor_pairs_validation():
    with pytest.raises(ValueError, match="mode"):
        anchor_pairs(np.zeros((1, 3)), np.zeros((1, 3)), 2, "both")
    with pytest.raises(ValueError, match="\\[B, L\\]"):
        anchor_pairs(np.zeros((1, 3)), np.zeros((1, 4)), 2, "t2i")


# ---------------------------------------------------------------------------------------------
# version 2: candidate_mask (words only)


def test_t2i_candidate_mask_hand_worked():
    # The shared example at 0.5 anchors T2, T3 and T4; with T3 excluded only T2 and T4 remain.
    x, y, mask, pos = _case()
    gi, om = anchor_insert(x, y, mask, pos, 0.5, candidate_mask=np.array([[1, 1, 1, 0, 1]]))
    #                      T0 I0 I1 T2 I2 T4 | T2 T3 T4
    assert gi.tolist() == [[0, 5, 6, 2, 7, 4, 2, 3, 4]]
    assert anchor_pairs(gi, om, 5, "t2i") == [[(2, 1), (4, 2)]]


def test_i2t_candidate_mask_moves_the_best_token():
    # I2 = (-1, 0): best candidate T4 (cos .949); with T4 excluded the best is T2 (cos 0) or T3 (-.707).
    x, y, mask, pos = _case()
    full = anchor_pairs(*anchor_insert(x, y, mask, pos, -1.0, mode="i2t"), 5, "i2t")[0]
    cut = anchor_pairs(*anchor_insert(x, y, mask, pos, -1.0, mode="i2t",
                                      candidate_mask=np.array([[1, 1, 1, 1, 0]])), 5, "i2t")[0]
    assert (4, 2) in full and all(n != 4 for n, _ in cut)
    assert (2, 2) in cut  # cos(T2, I2) = 0 > cos(T3, I2) = -.707


@pytest.mark.parametrize("mode", ["t2i", "i2t"])
@pytest.mark.parametrize("k", [None, 2])
def test_candidate_mask_equals_a_token_that_scores_nan(mode, k):
    """An excluded token behaves as if its similarity were NaN (never an anchor, never a best match)
    while it stays in the text: an independent statement of what version 2 adds."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        b, t, m, d = 2, int(rng.integers(2, 9)), int(rng.integers(1, 6)), 3
        x = rng.integers(-3, 4, (b, t, d)).astype(np.float32)
        y = rng.integers(-3, 4, (b, m, d)).astype(np.float32)
        mask = np.ones((b, t), np.int64)
        mask[1, : int(rng.integers(0, t))] = 0
        pos = np.array([int(rng.integers(0, t)), int(rng.integers(t - mask[1].sum(), t))])
        cm = rng.integers(0, 2, (b, t))
        thr = np.float32(rng.choice([-1.0, 0.0, 0.3, 0.7]))
        nan_x = x.copy()
        nan_x[cm == 0] = np.nan
        want = anchor_insert(nan_x, y, mask, pos, thr, mode=mode, max_anchors=k)
        got = anchor_insert(x, y, mask, pos, thr, mode=mode, max_anchors=k, candidate_mask=cm)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("mode", ["t2i", "i2t"])
def test_candidate_mask_of_ones_is_version_1(mode):
    x, y, mask, pos = _case()
    for thr in (-1.0, 0.5, 0.9):
        v1 = anchor_insert(x, y, mask, pos, thr, mode=mode)
        v2 = anchor_insert(x, y, mask, pos, thr, mode=mode, candidate_mask=np.ones((1, 5), np.int64))
        np.testing.assert_array_equal(v1[0], v2[0])


def test_candidate_mask_from_ids():
    from attanchor_graphs.specification import candidate_mask_from_ids

    ids = np.array([[5, 1, 9, 2], [2, 2, 7, 0]])
    assert candidate_mask_from_ids(ids, [1, 2]).tolist() == [[1, 0, 1, 0], [0, 0, 1, 1]]
    assert candidate_mask_from_ids(ids, []).tolist() == [[1] * 4] * 2
    assert candidate_mask_from_ids(ids, [1]).dtype == np.int64


@pytest.mark.parametrize(
    "candidate_mask, message",
    [
        (np.ones((1, 4), np.int64), "candidate_mask must have shape"),
        (np.ones((1, 5), np.float32), "integer"),
        (np.full((1, 5), 2), "0 \\(never an anchor\\) or 1"),
    ],
)
def test_candidate_mask_validation(candidate_mask, message):
    x, y, mask, pos = _case()
    with pytest.raises(ValueError, match=message):
        anchor_insert(x, y, mask, pos, 0.5, candidate_mask=candidate_mask)
