"""The grouped-attention rewrite of decoder.onnx, a pure ONNX graph pass (onnx + numpy only).

The dynamo exporter lowers transformers' SDPA call to the reference decomposition: every layer
repeats the key/value cache for each query head (Unsqueeze -> Expand -> Reshape, `repeat_kv`),
transposes the repeated keys through a 3-D Reshape/Transpose/Reshape round trip, scales both
queries and keys by sqrt(scale), and guards the softmax with IsNaN -> Where (rows with no visible
key, i.e. left padding, would be NaN). At TinyLLaVA-1B (32 query heads over 4 KV heads) that copies
the whole cache 8x per layer per step and touches the [B, heads, S, T] score tensor several extra
times: about 7% of a 620-token prefill and 12% of a decode step on CPU.

`optimize_decoder_model` rewrites each attention block in place to the grouped form

    q_g    = Reshape(q, [0, kv_heads, -1, head_dim])          # [B, KV, G*S, Dh], free (contiguous)
    scores = MatMul(q_g * scale, Transpose(K, [0, 1, 3, 2]))   # [B, KV, G*S, T], no repeated K
    probs  = Softmax(scores + Tile(mask', [1, 1, G, 1]))       # mask tiled once, shared by all layers
    out    = Reshape(MatMul(probs, V), [0, heads, -1, head_dim])

which is the same arithmetic per head (query head h uses KV head h // G, as repeat_kv does). It
uses standard opset-17+ ops only, so the file stays what TensorRT and any ONNX runtime read; the
explicit position_ids input and the rotary subgraph are not touched. The per-layer NaN guard is
replaced, when the additive mask is transformers' `Where(cond, 0, m)` with finite m, by one fix of
the small [B, 1, S, T] mask shared by all layers: mask' = mask on rows that see at least one key,
0 on rows that see none. Real rows are unchanged bit for bit; padding rows stay finite in any
precision (an fp16 conversion turns finfo.min into -inf, which the guard existed for) and are never
read by real rows. With any other mask the guard is kept. Weights (external data) are not read or
rewritten: only the small .onnx protobuf changes. Run it on the fp32 export, before quantization.

Anything that does not match the expected pattern is left as it was and counted in the report.
The file-level step that runs this pass on the exported decoder and checks its parity in ONNX
Runtime is attanchor_export.trace.optimize.optimize_decoder.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_utils import attribute, constant_value, consumers, producers, prune, toposort

__all__ = ["OPTIMIZE_VERSION", "optimize_decoder_model"]

OPTIMIZE_VERSION = 1


class _Graph:
    """Producer/consumer maps and constant lookup over a GraphProto (built once, before the rewrite)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.value_info = {v.name: v for v in graph.value_info}
        self.producer = producers(graph)
        self.consumers = consumers(graph)

    def const(self, name: str):
        """The value of an initializer or Constant node output, or None (never loads external data)."""
        return constant_value(name, self.inits, self.producer)

    def scalar(self, name: str):
        value = self.const(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(()))

    def shape(self, name: str):
        v = self.value_info.get(name)
        if v is None or not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                for d in v.type.tensor_type.shape.dim]

    def only(self, name: str, op_type: str | None = None):
        node = self.producer.get(name)
        if node is None or (op_type is not None and node.op_type != op_type):
            return None
        return node


def _unscale(g: _Graph, name: str, used: list):
    """x * c (c a constant scalar) -> (x, c); anything else -> (name, 1.0)."""
    node = g.only(name, "Mul")
    if node is not None:
        for i in (0, 1):
            c = g.scalar(node.input[1 - i])
            if c is not None:
                used.append(node)
                return node.input[i], c
    return name, 1.0


def _unrepeat(g: _Graph, name: str, used: list) -> str | None:
    """repeat_kv(x) = Reshape(Expand(Unsqueeze(x, [2]), ...)) -> x; a tensor that is not repeated -> itself."""
    reshape = g.only(name, "Reshape")
    if reshape is None:
        return name
    expand = g.only(reshape.input[0], "Expand")
    if expand is None:
        return None
    unsq = g.only(expand.input[0], "Unsqueeze")
    if unsq is None:
        return None
    axes = g.const(unsq.input[1]) if len(unsq.input) > 1 else np.array(attribute(unsq, "axes", []))
    if axes is None or list(np.atleast_1d(axes)) != [2]:
        return None
    used += [reshape, expand, unsq]
    return unsq.input[0]


def _untranspose_keys(g: _Graph, name: str, used: list) -> str | None:
    """K^T as the exporter writes it -> K: Transpose(perm 0,1,3,2), or the 3-D round trip
    Reshape([-1, T, Dh]) -> Transpose(0, 2, 1) -> Reshape([B, H, Dh, T])."""
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Transpose" and list(attribute(node, "perm", [])) == [0, 1, 3, 2]:
        used.append(node)
        return node.input[0]
    if node.op_type == "Reshape":
        tr = g.only(node.input[0], "Transpose")
        if tr is None or list(attribute(tr, "perm", [])) != [0, 2, 1]:
            return None
        inner = g.only(tr.input[0], "Reshape")
        if inner is None:
            return None
        target = g.const(inner.input[1])
        # The inner reshape must fold the leading axes only: [-1, T, Dh] built from the source shape.
        if target is not None and (target.size != 3 or int(target[0]) != -1):
            return None
        used += [node, tr, inner]
        return inner.input[0]
    return None


def _elem_type(g: _Graph, name: str) -> int:
    v = g.value_info.get(name)
    return v.type.tensor_type.elem_type if v is not None else onnx.TensorProto.FLOAT


def _mask_condition(g: _Graph, name: str) -> str | None:
    """The boolean condition `cond` when the additive mask is Where(cond, 0, m) with finite constant m
    (what transformers builds, m = finfo.min); None for any other mask."""
    node = g.only(name, "Where")
    if node is None:
        return None
    a, b = g.const(node.input[1]), g.const(node.input[2])
    if a is None or b is None or not (np.isfinite(a).all() and np.isfinite(b).all()) or np.any(a != 0):
        return None
    return node.input[0]


def _rewrite_attention(g: _Graph, heads: int, kv_heads: int, head_dim: int, opset: int = 18) -> dict:
    group = heads // kv_heads
    graph = g.graph
    new_nodes, drop, tiles = [], set(), {}
    inits = []
    counter = [0]

    def fresh(stem):
        counter[0] += 1
        return f"attanchor_opt/{stem}_{counter[0]}"

    def const_init(stem, array):
        t = numpy_helper.from_array(np.asarray(array), fresh(stem))
        inits.append(t)
        return t.name

    shape_q = const_init("q_grouped_shape", np.array([0, kv_heads, -1, head_dim], np.int64))
    shape_o = const_init("heads_shape", np.array([0, heads, -1, head_dim], np.int64))
    repeats = const_init("mask_repeats", np.array([1, 1, group, 1], np.int64))
    last_axis = const_init("last_axis", np.array([-1], np.int64))
    mask_zero = defaultdict(lambda: None)
    for elem, dtype in ((onnx.TensorProto.FLOAT, np.float32), (onnx.TensorProto.FLOAT16, np.float16)):
        mask_zero[elem] = const_init("mask_zero", dtype(0))
    perm = [0, 1, 3, 2]
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    skipped, guards = [], 0
    for sm in softmaxes:
        used = [sm]
        if attribute(sm, "axis", -1) not in (-1, 3):
            skipped.append(sm.name)
            continue
        add = g.only(sm.input[0], "Add")
        if add is None:
            skipped.append(sm.name)
            continue
        used.append(add)
        qk, mask = None, None
        for i in (0, 1):
            cand = g.only(add.input[i], "MatMul")
            if cand is not None:
                qk, mask = cand, add.input[1 - i]
                break
        mask_shape = g.shape(mask) if mask else None
        if qk is None or mask_shape is None or len(mask_shape) != 4 or mask_shape[1] != 1:
            skipped.append(sm.name)
            continue
        used.append(qk)
        q, c1 = _unscale(g, qk.input[0], used)
        kt, c2 = _unscale(g, qk.input[1], used)
        k_rep = _untranspose_keys(g, kt, used)
        k = _unrepeat(g, k_rep, used) if k_rep is not None else None
        # Softmax consumers: optional IsNaN/Where guard, then MatMul with repeated V.
        probs, guard = sm.output[0], []
        consumers = g.consumers[probs]
        isnan = [c for c in consumers if c.op_type == "IsNaN"]
        if isnan:
            where = [c for c in g.consumers[isnan[0].output[0]] if c.op_type == "Where"]
            if len(consumers) != 2 or len(where) != 1 or where[0].input[2] != probs:
                skipped.append(sm.name)
                continue
            guard = [isnan[0], where[0]]
            probs = where[0].output[0]
        av = [c for c in g.consumers[probs] if c.op_type == "MatMul" and c.input[0] == probs]
        q_shape = g.shape(q)
        if k is None or len(av) != 1 or len(g.consumers[probs]) != 1 or (q_shape and len(q_shape) != 4):
            skipped.append(sm.name)
            continue
        av = av[0]
        v = _unrepeat(g, av.input[1], used)
        if v is None:
            skipped.append(sm.name)
            continue
        cond = _mask_condition(g, mask)
        keep_guard = bool(guard) and cond is None
        guards += int(bool(guard) and not keep_guard)
        used += guard + [av]

        scale = np.float32(np.float32(c1) * np.float32(c2))
        q_g = fresh("q_grouped")
        q_s = fresh("q_scaled")
        k_t = fresh("k_transposed")
        scores = fresh("scores")
        masked = fresh("masked_scores")
        p = fresh("probs")
        out_g = fresh("attn_grouped")
        if mask not in tiles:
            source = mask
            if cond is not None:
                # Rows with no visible key (left padding) get a zero mask instead: their softmax stays
                # finite in any precision (fp16 turns finfo.min into -inf) without the per-layer guard.
                # Rows with a visible key keep their mask unchanged, bit for bit.
                cond_f, any_f, any_b, source = fresh("mask_cond_f"), fresh("row_any_f"), fresh("row_any"), \
                    fresh("mask_safe")
                new_nodes += [
                    helper.make_node("Cast", [cond], [cond_f], to=onnx.TensorProto.FLOAT, name=fresh("Cast")),
                    helper.make_node("ReduceMax", [cond_f, last_axis], [any_f], keepdims=1, name=fresh("ReduceMax"))
                    if opset >= 18 else
                    helper.make_node("ReduceMax", [cond_f], [any_f], axes=[-1], keepdims=1, name=fresh("ReduceMax")),
                    helper.make_node("Cast", [any_f], [any_b], to=onnx.TensorProto.BOOL, name=fresh("Cast")),
                    helper.make_node("Where", [any_b, mask, mask_zero[_elem_type(g, mask)]], [source],
                                     name=fresh("Where")),
                ]
            tiles[mask] = fresh("mask_tiled")
            new_nodes.append(helper.make_node("Tile", [source, repeats], [tiles[mask]], name=fresh("Tile")))
        nodes = [
            helper.make_node("Reshape", [q, shape_q], [q_g], name=fresh("Reshape")),
            helper.make_node("Mul", [q_g, const_init("scale", scale)], [q_s], name=fresh("Mul")),
            helper.make_node("Transpose", [k], [k_t], perm=perm, name=fresh("Transpose")),
            helper.make_node("MatMul", [q_s, k_t], [scores], name=fresh("MatMul")),
            helper.make_node("Add", [scores, tiles[mask]], [masked], name=fresh("Add")),
            helper.make_node("Softmax", [masked], [p], axis=-1, name=fresh("Softmax")),
        ]
        if keep_guard:
            isnan_out, zero = fresh("isnan"), const_init("zero", np.float32(0))
            guarded = fresh("probs_guarded")
            nodes += [
                helper.make_node("IsNaN", [p], [isnan_out], name=fresh("IsNaN")),
                helper.make_node("Where", [isnan_out, zero, p], [guarded], name=fresh("Where")),
            ]
            p = guarded
        nodes += [
            helper.make_node("MatMul", [p, v], [out_g], name=fresh("MatMul")),
            helper.make_node("Reshape", [out_g, shape_o], [av.output[0]], name=fresh("Reshape")),
        ]
        new_nodes += nodes
        drop.update(n.output[0] for n in (sm, add, qk, av, *guard))  # SSA: first output names a node
    if new_nodes:
        graph.initializer.extend(inits)
        kept = [n for n in graph.node if n.output[0] not in drop]
        del graph.node[:]
        graph.node.extend(kept + new_nodes)
    return {"layers": len(softmaxes) - len(skipped), "softmax_nodes": len(softmaxes), "skipped": skipped,
            "nan_guards_removed": guards, "group": group}


def optimize_decoder_model(model: onnx.ModelProto, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Rewrite `model` (loaded without external data) in memory; returns the report."""
    before = len(model.graph.node)
    g = _Graph(model.graph)
    report = {"version": OPTIMIZE_VERSION, "nodes_before": before}
    if heads % kv_heads:
        report["attention"] = {"layers": 0, "skipped": "num_heads is not a multiple of num_kv_heads"}
    else:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        report["attention"] = _rewrite_attention(g, heads, kv_heads, head_dim, opset)
    toposort(model.graph)  # new nodes were appended: order them before pruning walks backwards
    report["nodes_pruned"] = prune(model.graph)
    report["nodes_after"] = len(model.graph.node)
    return report

