"""``ai.attanchor::AnchorInsert`` as an ONNX function whose body uses standard opset-17 ops only.

The body is specialised to (mode, K) at build time instead of branching on attributes inside
the graph: TensorRT's parser handles If/Loop poorly and a specialised body lets a budgeted
graph have an output length computed from input shapes alone (static engines).

Design rules the body follows, and why:

* No ArgMax/TopK/NonZero/Unique: their tie and NaN behaviour differs between ONNX Runtime
  and TensorRT (and across versions). First-argmax is ``ReduceMin(Where(s == max, arange,
  BIG))`` and the top-K budget is a rank computed from an [N, N] comparison matrix, both
  fully determined by IEEE comparisons.
* NaN is removed with ``IsNaN`` before any reduction, because ReduceMax's NaN propagation is
  not specified the same way everywhere.
* CumSum runs on float32: TensorRT implements it for floating types only. Counts stay far
  below 2**24, so the float prefix sums are exact.
* No ConstantOfShape (TensorRT 9 accepts only float32 there): the int64 output buffer is
  ``Expand`` of a scalar zero.
* Every ``axes``/``axis`` operand is a Constant node or, for ReduceMax/ReduceMin (whose axes
  are still an attribute in opset 17), an attribute: TensorRT requires build-time axes.
* The only floating-point arithmetic is the cosine (MatMul, Mul, ReduceSum, Sqrt, Div);
  everything after it is comparisons and integer counting, so backends can differ only
  through the accumulation order of those few ops (and TensorRT must not be allowed TF32
  for this MatMul if indices are to match the reference).
* Items are placed with ScatterElements into a buffer one column wider than the output;
  items that are absent (padding, the image placeholder, non-anchors) all go to that extra
  "dump" column, which is sliced off. Several updates may hit the dump column; whichever
  wins is irrelevant.

The numpy specification (:mod:`attanchor_graphs.specification`) is what it is held to; property tests
hold this body to it bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .specification import check_budget, check_mode

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "FUNCTION_INPUTS",
    "FUNCTION_INPUTS_V2",
    "OP_VERSIONS",
    "FUNCTION_OPS",
    "FUNCTION_OUTPUTS",
    "OPNAME",
    "OPSET",
    "anchor_insert_function",
    "function_inputs",
    "make_anchor_node",
]

DOMAIN = "ai.attanchor"
# Version 2 adds a sixth input, candidate_mask [B, T] (0 = never an anchor: the tokenizer's special
# tokens). Version 1 (five inputs, every token after the image a candidate) is still built on request.
DOMAIN_VERSION = 2
OP_VERSIONS = (1, 2)
OPNAME = "AnchorInsert"
OPSET = 17

FUNCTION_INPUTS = ("text_embeds", "image_features", "attention_mask", "image_position", "threshold")
FUNCTION_INPUTS_V2 = (*FUNCTION_INPUTS, "candidate_mask")
FUNCTION_OUTPUTS = ("gather_index", "out_mask")

# Every op type the body may use (the union over all (mode, K) specialisations).
FUNCTION_OPS = (
    "Add",
    "And",
    "Cast",
    "Concat",
    "Constant",
    "CumSum",
    "Div",
    "Equal",
    "Expand",
    "Gather",
    "Greater",
    "GreaterOrEqual",
    "IsNaN",
    "Less",
    "LessOrEqual",
    "MatMul",
    "Mul",
    "Not",
    "Or",
    "Range",
    "ReduceMax",
    "ReduceMin",
    "ReduceSum",
    "ScatterElements",
    "Shape",
    "Slice",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
    "Where",
)

_F = TensorProto.FLOAT
_I = TensorProto.INT64


class _Body:
    """Tiny SSA emitter: each call appends one node and returns its (unique) output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, name: str | None = None, out: str | None = None, **attrs) -> str:
        if op_type not in FUNCTION_OPS:  # keeps FUNCTION_OPS honest
            raise AssertionError(f"{op_type} is not declared in FUNCTION_OPS")
        self._count += 1
        out = out or f"{name or op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype) -> str:
        """A Constant node (functions cannot hold initializers); deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.op("Constant", name="const", value=numpy_helper.from_array(arr))
        return self._consts[key]

    # shorthands ---------------------------------------------------------------------------
    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def f32(self, value) -> str:
        return self.const(value, np.float32)

    def axes(self, *axes: int) -> str:
        return self.i64(list(axes))

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def count(self, cond: str, axis: int, keepdims: int = 0) -> str:
        """Number of true entries of a bool tensor along ``axis`` (int64)."""
        return self.op("ReduceSum", self.cast(cond, _I), self.axes(axis), keepdims=keepdims)

    def exclusive_prefix_count(self, cond: str, axis: int) -> str:
        """#true entries strictly before each position along ``axis`` (int64).

        Inclusive CumSum minus self rather than ``exclusive=1``: fewer attribute paths for
        backends to get right; float32 because TensorRT's CumSum is float only.
        """
        as_f = self.cast(cond, _F)
        incl = self.op("CumSum", as_f, self.i64(axis))
        return self.cast(self.op("Sub", incl, as_f), _I)

    def dim(self, x: str, axis: int) -> str:
        """Scalar int64 size of ``x`` along ``axis``."""
        return self.op("Gather", self.op("Shape", x), self.i64(axis), axis=0)

    def arange(self, n: str) -> str:
        return self.op("Range", self.i64(0), n, self.i64(1))

    def unsq(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.axes(*axes))

    def lex_before(self, key_j: str, key_n: str, j_lt_n: str, strict_greater: bool) -> str:
        """(key_j > key_n  or  key_j == key_n and j < n)  if strict_greater else with '<'."""
        first = self.op("Greater" if strict_greater else "Less", key_j, key_n)
        tie = self.op("And", self.op("Equal", key_j, key_n), j_lt_n)
        return self.op("Or", first, tie)


def _budget(b: _Body, anchor: str, score: str, k: int, axis_len: str) -> str:
    """Keep the k anchors of highest score; ties to the lower index. ``anchor``/``score``: [B, N].

    rank[n] = #{j anchor: s_j > s_n or (s_j == s_n and j < n)}, keep iff anchor and rank < k.
    Scores of anchors are finite, so the comparisons are a strict total order.
    """
    if k == 0:
        return anchor
    idx = b.arange(axis_len)
    j_lt_n = b.op("Less", idx, b.unsq(idx, 1))  # [N(n), N(j)]
    better = b.lex_before(b.unsq(score, 1), b.unsq(score, 2), j_lt_n, strict_greater=True)
    counted = b.op("And", better, b.unsq(anchor, 1))  # [B, n, j]
    rank = b.count(counted, axis=2)
    return b.op("And", anchor, b.op("Less", rank, b.i64(k)))


def _is_anchor(b: _Body, score: str, threshold: str) -> str:
    # -inf only comes from NaN; excluding it keeps NaN out even when threshold is -inf.
    ge = b.op("GreaterOrEqual", score, threshold)
    finite = b.op("Greater", score, b.f32(-np.inf))
    return b.op("And", ge, finite)


def _check_version(version: object) -> int:
    if version not in OP_VERSIONS:
        raise ValueError(f"AnchorInsert version must be one of {OP_VERSIONS}, got {version!r}")
    return int(version)  # type: ignore[arg-type]


def function_inputs(version: int = 1) -> tuple[str, ...]:
    return FUNCTION_INPUTS_V2 if _check_version(version) == 2 else FUNCTION_INPUTS


def anchor_insert_function(mode: str = "t2i", max_anchors: int | None = None, version: int = 1) -> onnx.FunctionProto:
    """The ``ai.attanchor::AnchorInsert`` function (version 1 or 2) specialised to (mode, K).

    A model holding it must import the ``ai.attanchor`` domain at the same version."""
    mode = check_mode(mode)
    k = check_budget(max_anchors)
    inputs = function_inputs(version)
    b = _Body()
    x, y, mask, img_pos, thr = FUNCTION_INPUTS

    t_len = b.dim(x, 1)
    m_len = b.dim(y, 1)
    b_len = b.dim(x, 0)
    ar_t = b.arange(t_len)
    ar_m = b.arange(m_len)

    # --- cosine similarity, in the reference's exact operation order ----------------------
    dot = b.op("MatMul", x, b.op("Transpose", y, perm=[0, 2, 1]))  # [B, T, M]
    x_norm = b.op("Sqrt", b.op("ReduceSum", b.op("Mul", x, x), b.axes(2), keepdims=1))
    y_norm = b.op("Sqrt", b.op("ReduceSum", b.op("Mul", y, y), b.axes(2), keepdims=1))
    denom = b.op("Mul", x_norm, b.op("Transpose", y_norm, perm=[0, 2, 1]))  # [B, T, M]
    quot = b.op("Div", dot, denom)
    # "== 0", not "> 0": a NaN product must stay NaN so it becomes -inf below.
    s0 = b.op("Where", b.op("Equal", denom, b.f32(0.0)), b.f32(0.0), quot)
    neg_inf = b.f32(-np.inf)
    s = b.op("Where", b.op("IsNaN", s0), neg_inf, s0)

    # --- which text tokens are what -------------------------------------------------------
    valid = b.op("Not", b.op("Equal", mask, b.i64(0)))  # [B, T]
    p = b.unsq(img_pos, 1)  # [B, 1]
    pre = b.op("And", valid, b.op("Less", ar_t, p))  # text before the image
    cand = b.op("And", valid, b.op("Greater", ar_t, p))  # text after: placed after the image block
    eligible = cand  # the anchor candidates: version 2 leaves out what candidate_mask excludes
    if len(inputs) == len(FUNCTION_INPUTS_V2):
        eligible = b.op("And", cand, b.op("Not", b.op("Equal", inputs[5], b.i64(0))))
    pre_slot = b.exclusive_prefix_count(pre, axis=1)
    post_rank = b.exclusive_prefix_count(cand, axis=1)
    n_pre = b.count(pre, axis=1, keepdims=1)  # [B, 1]
    n_post = b.count(cand, axis=1, keepdims=1)

    if mode == "t2i":
        best_max = b.op("ReduceMax", s, axes=[2], keepdims=1)  # [B, T, 1]
        first = b.op("Where", b.op("Equal", s, best_max), ar_m, m_len)
        best = b.op("ReduceMin", first, axes=[2], keepdims=0)  # [B, T]
        score = b.op("Squeeze", best_max, b.axes(2))
        anchor = b.op("And", eligible, _is_anchor(b, score, thr))
        keep = _budget(b, anchor, score, k, t_len)
        n_kept = b.count(keep, axis=1, keepdims=1)

        # Anchor n sits after image best[n], behind kept anchors ordered before it by
        # (best, n): the group order of the layout.
        j_lt_n = b.op("Less", ar_t, b.unsq(ar_t, 1))
        before = b.lex_before(b.unsq(best, 1), b.unsq(best, 2), j_lt_n, strict_greater=False)
        ahead = b.count(b.op("And", before, b.unsq(keep, 1)), axis=2)  # [B, T]
        anchor_slot = b.op("Add", b.op("Add", n_pre, b.op("Add", best, b.i64(1))), ahead)
        # Image m is preceded by the kept anchors of images < m.
        below = b.op("Less", b.unsq(best, 1), b.unsq(ar_m, 1))  # [B, M, T]
        img_shift = b.count(b.op("And", below, b.unsq(keep, 1)), axis=2)  # [B, M]
        image_slot = b.op("Add", b.op("Add", n_pre, ar_m), img_shift)
        post_slot = b.op("Add", b.op("Add", b.op("Add", n_pre, m_len), n_kept), post_rank)
        anchor_value = ar_t  # an anchor is a copy of its text row
        anchor_present = keep
    else:
        # Per image, the best candidate text token: non-candidates are pushed to -inf and
        # also excluded from the first-index search.
        cand3 = b.unsq(eligible, 2)  # [B, T, 1]
        s_c = b.op("Where", cand3, s, neg_inf)
        best_max = b.op("ReduceMax", s_c, axes=[1], keepdims=1)  # [B, 1, M]
        hit = b.op("And", b.op("Equal", s_c, best_max), cand3)
        first = b.op("Where", hit, b.unsq(ar_t, 1), t_len)
        best = b.op("ReduceMin", first, axes=[1], keepdims=0)  # [B, M]
        score = b.op("Squeeze", best_max, b.axes(1))
        # No candidates -> score is -inf -> never an anchor; no separate "any" test needed.
        anchor = _is_anchor(b, score, thr)
        keep = _budget(b, anchor, score, k, m_len)
        n_kept = b.count(keep, axis=1, keepdims=1)

        image_slot = b.op("Add", n_pre, ar_m)
        # Text n after the image is preceded by the copies attached to earlier text tokens.
        below = b.op("Less", b.unsq(best, 1), b.unsq(ar_t, 1))  # [B, T, M]
        copies_before = b.count(b.op("And", below, b.unsq(keep, 1)), axis=2)  # [B, T]
        post_slot = b.op("Add", b.op("Add", b.op("Add", n_pre, m_len), post_rank), copies_before)
        # Copy m goes right after text best[m]: past #candidates <= best[m] text tokens and
        # past the kept copies ordered before it by (best, m).
        upto = b.op("LessOrEqual", b.unsq(ar_t, 0, 1), b.unsq(best, 2))  # [B, M, T]
        text_upto = b.count(b.op("And", upto, b.unsq(cand, 1)), axis=2)  # [B, M]
        j_lt_n = b.op("Less", ar_m, b.unsq(ar_m, 1))
        before = b.lex_before(b.unsq(best, 1), b.unsq(best, 2), j_lt_n, strict_greater=False)
        ahead = b.count(b.op("And", before, b.unsq(keep, 1)), axis=2)  # [B, M]
        anchor_slot = b.op("Add", b.op("Add", b.op("Add", n_pre, m_len), text_upto), ahead)
        anchor_value = b.op("Add", ar_m, t_len)
        anchor_present = keep

    row_len = b.op("Add", b.op("Add", b.op("Add", n_pre, m_len), n_kept), n_post)  # [B, 1]
    if k:
        # Static: from input shapes only, so TensorRT sees a build-time output shape.
        out_len = b.op("Add", b.op("Add", t_len, m_len), b.i64(k - 1))
    else:
        out_len = b.op("ReduceMax", row_len, axes=[0, 1], keepdims=0)
    offset = b.op("Sub", out_len, row_len)  # left padding of each row

    def place(slot: str, present: str) -> str:
        return b.op("Where", present, b.op("Add", slot, offset), out_len)

    text_slot = b.op("Where", pre, pre_slot, post_slot)
    text_present = b.op("Or", pre, cand)
    slots = b.op(
        "Concat",
        place(text_slot, text_present),
        b.op("Add", image_slot, offset),  # every image token is always present
        place(anchor_slot, anchor_present),
        axis=1,
    )
    values = b.op("Concat", ar_t, b.op("Add", ar_m, t_len), anchor_value, axis=0)
    values = b.op("Expand", values, b.op("Shape", slots))

    buf_shape = b.op("Concat", b.unsq(b_len, 0), b.unsq(b.op("Add", out_len, b.i64(1)), 0), axis=0)
    buf = b.op("Expand", b.i64(0), buf_shape)
    scattered = b.op("ScatterElements", buf, slots, values, axis=1)
    b.op("Slice", scattered, b.i64([0]), b.unsq(out_len, 0), b.axes(1), out=FUNCTION_OUTPUTS[0])
    # A row occupies the last row_len slots, so the mask is just "slot >= offset".
    b.op("Cast", b.op("GreaterOrEqual", b.arange(out_len), offset), to=_I, out=FUNCTION_OUTPUTS[1])

    return helper.make_function(
        DOMAIN,
        OPNAME,
        inputs=list(inputs),
        outputs=list(FUNCTION_OUTPUTS),
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        # Declared so nodes may carry them; the body is already specialised and ignores them.
        attributes=["mode", "max_anchors"],
        doc_string=(
            f"AttAnchor anchor insertion (version {version}), specialised to mode={mode!r}, max_anchors={k} "
            "(0 = no budget). Outputs gather_index into concat(text, image) and the "
            "attention mask of the new, left-padded sequence. See attanchor_graphs.specification."
        ),
    )


def make_anchor_node(
    inputs,
    outputs,
    mode: str = "t2i",
    max_anchors: int | None = None,
    name: str = "AnchorInsert",
    version: int = 1,
) -> onnx.NodeProto:
    """An ``ai.attanchor::AnchorInsert`` node; pair it with ``anchor_insert_function(mode, K, version)``."""
    mode = check_mode(mode)
    k = check_budget(max_anchors)
    expected = function_inputs(version)
    if len(inputs) != len(expected):
        raise ValueError(f"AnchorInsert version {version} takes {len(expected)} inputs {expected}")
    if len(outputs) != len(FUNCTION_OUTPUTS):
        raise ValueError("AnchorInsert has 2 outputs (gather_index, attention mask)")
    return helper.make_node(
        OPNAME, list(inputs), list(outputs), name=name, domain=DOMAIN, mode=mode, max_anchors=k
    )
