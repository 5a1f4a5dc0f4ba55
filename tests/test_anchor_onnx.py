"""The ONNX AnchorInsert function, run by ONNX Runtime, against the numpy reference.

Property tests draw embeddings from the integer grid [-3, 3]: every product, dot product and
squared norm is then an exact small integer in float32, so the only rounding is in sqrt,
the norm product and the division, which are correctly rounded (IEEE) in both numpy and
ONNX Runtime. Exact equality of the indices is therefore a fair requirement, ties included.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from attanchor_graphs import (
    DOMAIN,
    FUNCTION_OPS,
    MODEL_INPUTS,
    MODEL_INPUTS_V2,
    MODEL_OUTPUTS,
    OPSET,
    anchor_insert,
    anchor_insert_function,
    build_anchor_model,
    cosine_scores,
    ir_version_for_runtime,
    make_anchor_node,
)
from attanchor_graphs.onnx_utils import MIN_IR_VERSION
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

MODES = ("t2i", "i2t")
BUDGETS = (None, 1, 2, 5)
COMBOS = [(mode, k) for mode in MODES for k in BUDGETS]
THRESHOLDS = (-1.0, 0.0, 0.5, 1.0, 1.5)

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _session_for(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # One thread each: the CI box is small, and it rules out any thread-count effect.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


@functools.cache
def session(mode: str, k: int | None, inlined: bool = False, version: int = 1) -> ort.InferenceSession:
    """Building a session dominates the runtime of these tests: one per (mode, K, version)."""
    model = build_anchor_model(mode, k, version=version)
    if inlined:
        model = onnx.inliner.inline_local_functions(model)
    return _session_for(model)


def run_onnx(mode, k, x, y, mask, pos, thr, inlined=False, candidate_mask=None):
    values = [x, y, mask.astype(np.int64), pos.astype(np.int64), np.asarray(thr, dtype=np.float32)]
    names = MODEL_INPUTS
    if candidate_mask is not None:  # version 2
        values.append(np.asarray(candidate_mask, dtype=np.int64))
        names = MODEL_INPUTS_V2
    feeds = dict(zip(names, values, strict=True))
    return session(mode, k, inlined, 1 if candidate_mask is None else 2).run(list(MODEL_OUTPUTS), feeds)


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def anchor_cases(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(2, 8))
    m = draw(st.integers(1, 6))
    d = draw(st.integers(1, 5))
    grid = st.integers(-3, 3).map(float)
    x = draw(arrays(np.float32, (b, t, d), elements=grid)).copy()
    y = draw(arrays(np.float32, (b, m, d), elements=grid)).copy()

    # Exact ties: duplicated image / text vectors, or every image identical (all-equal scores).
    if m > 1 and draw(st.booleans()):
        i, j = draw(st.integers(0, m - 1)), draw(st.integers(0, m - 1))
        y[:, j] = y[:, i]
    if draw(st.booleans()):
        i, j = draw(st.integers(0, t - 1)), draw(st.integers(0, t - 1))
        x[:, j] = 2 * x[:, i]  # same direction, different norm: still an exact cosine tie
    if draw(st.integers(0, 5)) == 5:
        y[:] = y[:, :1]
    # Zero vectors (score 0 against everything).
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            x[draw(st.integers(0, b - 1)), draw(st.integers(0, t - 1))] = 0
        else:
            y[draw(st.integers(0, b - 1)), draw(st.integers(0, m - 1))] = 0
    # NaN in either input (that row / column must never produce an anchor).
    if draw(st.integers(0, 4)) == 4:
        target = x if draw(st.booleans()) else y
        idx = tuple(draw(st.integers(0, s - 1)) for s in target.shape)
        target[idx] = np.nan

    mask = np.ones((b, t), dtype=np.int64)
    pos = np.zeros(b, dtype=np.int64)
    for i in range(b):
        # Biased towards short padding and an early image so most rows have candidates;
        # pos = t - 1 (no text after the image) still comes up.
        pad = draw(st.one_of(st.just(0), st.integers(0, t - 1)))
        mask[i, :pad] = 0
        pos[i] = draw(st.one_of(st.integers(pad, (pad + t - 1) // 2), st.integers(pad, t - 1)))

    thr = draw(
        st.one_of(
            st.sampled_from(THRESHOLDS),
            st.floats(-1.25, 1.25, width=32),
        )
    )
    return x, y, mask, pos, np.float32(thr)


def _assert_same(mode, k, case):
    x, y, mask, pos, thr = case
    ref_gi, ref_mask = anchor_insert(x, y, mask, pos, thr, mode=mode, max_anchors=k)
    got_gi, got_mask = run_onnx(mode, k, x, y, mask, pos, thr)
    assert got_gi.dtype == np.int64 and got_mask.dtype == np.int64
    np.testing.assert_array_equal(got_gi, ref_gi)
    np.testing.assert_array_equal(got_mask, ref_mask)
    return ref_gi


# ---------------------------------------------------------------------------------------------
# property tests: exact agreement on the integer grid


@pytest.mark.parametrize("mode, k", COMBOS)
@SETTINGS
@given(case=anchor_cases())
def test_onnx_matches_reference_on_grid(mode, k, case):
    gi = _assert_same(mode, k, case)
    if k:
        x, y = case[0], case[1]
        assert gi.shape[1] == x.shape[1] - 1 + y.shape[1] + k


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=60, deadline=None)
@given(case=anchor_cases(), k=st.sampled_from(BUDGETS))
def test_inlined_function_matches_reference(mode, k, case):
    # TensorRT (and some tools) inline model-local functions; the inlined graph must agree too.
    x, y, mask, pos, thr = case
    ref = anchor_insert(x, y, mask, pos, thr, mode=mode, max_anchors=k)
    got = run_onnx(mode, k, x, y, mask, pos, thr, inlined=True)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", BUDGETS)
def test_onnx_matches_reference_hand_cases(mode, k):
    x = np.array([[[1, 0], [0, 0], [0, 2], [1, 1], [-3, 1]]], dtype=np.float32)
    y = np.array([[[1, 0], [0, 1], [-1, 0]]], dtype=np.float32)
    mask = np.ones((1, 5), dtype=np.int64)
    for p in range(5):
        for thr in (*THRESHOLDS, -np.inf, np.inf, np.nan):
            _assert_same(mode, k, (x, y, mask, np.array([p]), np.float32(thr)))


# ---------------------------------------------------------------------------------------------
# continuous floats


def _fragile_rows(x, y, mask, pos, thr, mode, k, margin):
    """Rows whose outcome could flip under a last-bit change in a similarity.

    ONNX Runtime's MatMul/ReduceSum may accumulate in another order than numpy (blocking,
    FMA), so with continuous inputs s can differ by a few ulps (~1e-7). A decision can only
    flip if two compared scores, or a score and the threshold, are closer than that; rows
    where every such gap is >= ``margin`` are required to match exactly.
    """
    s = cosine_scores(x, y)
    fragile = set()
    t = x.shape[1]
    for i in range(x.shape[0]):
        cand = (mask[i] == 1) & (np.arange(t) > pos[i])
        if not cand.any():
            continue
        # t2i compares along images per text row; i2t along candidate text rows per image.
        sc = s[i][cand] if mode == "t2i" else s[i][cand].T
        top = np.sort(sc, axis=1)[:, ::-1]
        best = top[:, 0]
        finite = np.isfinite(best)
        gaps = [np.abs(best[finite] - thr)]
        if top.shape[1] > 1:
            both = finite & np.isfinite(top[:, 1])
            gaps.append(top[both, 0] - top[both, 1])
        if k:
            kept = np.sort(best[finite & (best >= thr)])
            gaps.append(np.diff(kept))
        allgaps = np.concatenate([np.ravel(g) for g in gaps])
        if allgaps.size and allgaps.min() < margin:
            fragile.add(i)
    return fragile


@pytest.mark.parametrize("mode, k", COMBOS)
@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 3),
    t=st.integers(2, 12),
    m=st.integers(1, 10),
    d=st.integers(1, 48),
    thr=st.floats(-0.5, 0.5, width=32),
)
def test_onnx_matches_reference_continuous(mode, k, seed, b, t, m, d, thr):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    y = rng.standard_normal((b, m, d)).astype(np.float32)
    mask = np.ones((b, t), dtype=np.int64)
    pos = np.zeros(b, dtype=np.int64)
    for i in range(b):
        pad = int(rng.integers(0, t))
        mask[i, :pad] = 0
        pos[i] = rng.integers(pad, t)
    thr = np.float32(thr)
    ref_gi, ref_mask = anchor_insert(x, y, mask, pos, thr, mode=mode, max_anchors=k)
    got_gi, got_mask = run_onnx(mode, k, x, y, mask, pos, thr)
    fragile = _fragile_rows(x, y, mask, pos, thr, mode, k, margin=1e-5)
    if k or not fragile:  # without K a fragile row can change L and so every row's padding
        assert got_gi.shape == ref_gi.shape
    for i in range(b):
        if i in fragile:
            continue
        # Compare unpadded rows: L (hence padding) may differ if another row was fragile.
        np.testing.assert_array_equal(got_gi[i][got_mask[i] == 1], ref_gi[i][ref_mask[i] == 1])


# ---------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("mode, k", COMBOS)
def test_model_passes_full_checker(mode, k):
    model = build_anchor_model(mode, k)
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", OPSET), (DOMAIN, 1)}
    assert OPSET == 17
    (func,) = model.functions
    assert (func.domain, func.name) == (DOMAIN, "AnchorInsert")
    (node,) = model.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mode": mode.encode(), "max_anchors": k or 0}
    assert model.ir_version == ir_version_for_runtime()


BANNED = {"ArgMax", "ArgMin", "TopK", "NonZero", "Unique", "Loop", "If", "Scan", "ConstantOfShape"}


@pytest.mark.parametrize("mode, k", COMBOS)
def test_body_uses_only_declared_standard_ops(mode, k):
    func = anchor_insert_function(mode, k)
    assert [(o.domain, o.version) for o in func.opset_import] == [("", OPSET)]
    used = {n.op_type for n in func.node}
    assert used <= set(FUNCTION_OPS)
    assert all(n.domain in ("", "ai.onnx") for n in func.node)
    assert not used & BANNED
    assert not any(op.startswith("Sequence") for op in used)


def test_function_ops_are_standard_at_opset_17():
    assert len(set(FUNCTION_OPS)) == len(FUNCTION_OPS)
    used = set()
    for mode, k in COMBOS:
        used |= {n.op_type for n in anchor_insert_function(mode, k).node}
    assert used == set(FUNCTION_OPS)  # nothing declared that no body uses
    for op in FUNCTION_OPS:
        schema = onnx.defs.get_schema(op, OPSET, "")
        assert schema.domain == "" and schema.since_version <= OPSET


def _value_dependent(func: onnx.FunctionProto) -> set[str]:
    """Tensors whose values depend on input *values* (Shape only reads the shape)."""
    tainted = set(func.input)
    for node in func.node:  # nodes are topologically ordered
        if node.op_type == "Shape":
            continue
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
    return tainted


@pytest.mark.parametrize("mode", MODES)
def test_budget_makes_output_length_static(mode):
    # Structurally: the buffer shape, the slice end and the mask's Range limit are computed
    # from input shapes only when K is set (TensorRT can then fix them at build time)...
    for k, static in ((3, True), (None, False)):
        func = anchor_insert_function(mode, k)
        tainted = _value_dependent(func)
        shape_inputs = [n.input[1] for n in func.node if n.op_type in ("Expand", "Range")]
        shape_inputs += [n.input[2] for n in func.node if n.op_type == "Slice"]
        assert any(i in tainted for i in shape_inputs) != static
    # ... and at run time the length is T - 1 + M + K whatever the data.
    b, t, m, d, k = 2, 6, 4, 3, 5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    y = rng.standard_normal((b, m, d)).astype(np.float32)
    mask = np.ones((b, t), dtype=np.int64)
    mask[1, :3] = 0
    pos = np.array([1, 4])
    for thr in (-1.0, 0.2, 2.0):
        gi, om = run_onnx(mode, k, x, y, mask, pos, thr)
        assert gi.shape == om.shape == (b, t - 1 + m + k)


def test_make_anchor_node():
    node = make_anchor_node(list("abcde"), ["g", "m"], mode="i2t", max_anchors=None)
    assert (node.domain, node.op_type) == (DOMAIN, "AnchorInsert")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mode": b"i2t", "max_anchors": 0}
    with pytest.raises(ValueError):
        make_anchor_node(list("abcd"), ["g", "m"])
    with pytest.raises(ValueError):
        make_anchor_node(list("abcde"), ["g", "m"], mode="both")
    with pytest.raises(ValueError):
        make_anchor_node(list("abcde"), ["g", "m"], max_anchors=-2)


def test_ir_version_for_runtime():
    ir = ir_version_for_runtime()
    assert MIN_IR_VERSION <= ir <= onnx.IR_VERSION
    # The installed runtime really accepts it (build_anchor_model uses it by default) ...
    session("t2i", None)
    # ... and rejects nothing older; a newer IR than the table says must not be produced.
    assert ir_version_for_runtime("1.31.1") == min(13, onnx.IR_VERSION)
    assert ir_version_for_runtime("1.20.0") == 10
    assert ir_version_for_runtime("1.17.3") == 9
    assert ir_version_for_runtime("1.10.0") == MIN_IR_VERSION
    assert ir_version_for_runtime("not-a-version") == 10


def test_save_anchor_model(tmp_path):
    from attanchor_graphs import save_anchor_model

    path = tmp_path / "anchor.onnx"
    save_anchor_model(path, "i2t", 2)
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.functions[0].name == "AnchorInsert"


# ---------------------------------------------------------------------------------------------
# version 2: candidate_mask (0 = never an anchor; the embedding graph excludes special tokens)


@pytest.mark.parametrize("mode, k", COMBOS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=anchor_cases(), data=st.data())
def test_v2_onnx_matches_reference_on_grid(mode, k, case, data):
    x, y, mask, pos, thr = case
    cm = data.draw(arrays(np.int64, mask.shape, elements=st.integers(0, 1)))
    ref_gi, ref_mask = anchor_insert(x, y, mask, pos, thr, mode=mode, max_anchors=k, candidate_mask=cm)
    got_gi, got_mask = run_onnx(mode, k, x, y, mask, pos, thr, candidate_mask=cm)
    np.testing.assert_array_equal(got_gi, ref_gi)
    np.testing.assert_array_equal(got_mask, ref_mask)
    if data.draw(st.booleans()):  # TensorRT inlines the function: the inlined v2 body must agree too
        got = run_onnx(mode, k, x, y, mask, pos, thr, inlined=True, candidate_mask=cm)
        np.testing.assert_array_equal(got[0], ref_gi)


@pytest.mark.parametrize("mode, k", COMBOS)
def test_v2_model_structure(mode, k):
    model = build_anchor_model(mode, k, version=2)
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", OPSET), (DOMAIN, 2)}
    (func,) = model.functions
    assert list(func.input) == [*MODEL_INPUTS[:2], "attention_mask", *MODEL_INPUTS[3:], "candidate_mask"]
    assert {n.op_type for n in func.node} <= set(FUNCTION_OPS)
    assert [i.name for i in model.graph.input] == list(MODEL_INPUTS_V2)
    with pytest.raises(ValueError, match="version"):
        build_anchor_model(mode, k, version=3)
    with pytest.raises(ValueError, match="version 2 takes 6 inputs"):
        make_anchor_node(list("abcde"), ["g", "m"], version=2)
