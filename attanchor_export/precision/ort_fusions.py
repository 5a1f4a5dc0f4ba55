"""onnxruntime-only fusions of the decoder's onnxruntime form (the MatMulNBits file, which TensorRT never reads).

A decode step is small matrix-vector work, so per-node overhead counts: at TinyLLaVA-1B dims the
standard-op int4 graph runs ~1,330 nodes per step, and the profiler (scripts/profile_decode.py) puts
the element-wise glue and the gaps between nodes at about a quarter of the step. Two patterns are most
of those nodes, and onnxruntime has one fused CPU/CUDA kernel for each:

- RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) -> SimplifiedLayerNormalization, found by
  onnxruntime's own fusion (onnxruntime.transformers); its residual Add is then folded in too,
  SkipSimplifiedLayerNormalization (com.microsoft), which also returns the sum the next residual needs.
- rotary embedding on the [B, heads, S, head_dim] queries and keys (Mul, Slice, Slice, Neg, Concat,
  Mul, Add) -> RotaryEmbedding (com.microsoft), fed the graph's own position_ids: AttAnchor's explicit
  positions are kept. Its cos/sin caches are the graph's own angle subgraph evaluated on positions
  0..max_position_embeddings-1, so rope scaling variants come out as the graph computes them.
- attention reads the KV cache in place: no Concat of past and new positions per step; present.{i} is
  the new positions only and the runtime appends them to its buffer (KV_APPEND; see the attention section).

Only the .onnx protobuf changes (plus the two small caches); weights in external data are not read. The
standard-op file stays what TensorRT reads. The fused file is checked like every form: the accuracy
gate compares it with the fp32 reference, and tests compare fused and unfused fp32 graphs in
onnxruntime. Anything that does not match exactly is left as it was and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from attanchor_graphs.onnx_utils import (
    attribute,
    constant_value,
    consumers,
    initializers,
    is_constant,
    producers,
    prune,
    toposort,
)
from attanchor_runtime.manifest import KV_APPEND, KV_CONCAT, NEXT_TOKEN, PRESENT_PREFIX, Dims
from onnx import helper, numpy_helper

_MS = "com.microsoft"
FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding")


def fuse_decoder_file(path: Path, dims: Dims, attention: bool = True) -> dict:
    """Fuse the decoder at `path` in place (protobuf only); returns what was fused."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    report = fuse_decoder(model, dims, path.parent, attention)
    tmp = path.with_name(path.name + ".fusing")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)
    return report


def fuse_decoder(model: onnx.ModelProto, dims: Dims, folder: Path, attention: bool = True) -> dict:
    before = len(model.graph.node)
    _fuse_rms_norms(model)
    _fold_residual_adds(model)
    _fuse_rotary(model, dims, folder)
    in_place = _attend_in_place(model, dims) if attention else 0
    next_token = _greedy_output(model)
    _import(model, _MS, 1)
    ops = op_counts(model)
    return {"fused": {op: ops[op] for op in FUSED_OPS}, "attention_in_place": in_place,
            "nodes_before": before, "nodes_after": len(model.graph.node),
            "kv_cache": KV_APPEND if in_place else KV_CONCAT, "next_token": next_token}


# ------------------------------------------------------------------------------------------ RMSNorm


def _fuse_rms_norms(model: onnx.ModelProto) -> None:
    from onnxruntime.transformers.fusion_simplified_layernorm import FusionSimplifiedLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    quiet = logging.getLogger("onnxruntime.transformers")  # its "fused N nodes" lines are not for users
    level, quiet.level = quiet.level, logging.ERROR
    try:
        wrapped = OnnxModel(model)
        FusionSimplifiedLayerNormalization(wrapped).apply()
        wrapped.prune_graph(allow_remove_graph_inputs=False)
    finally:
        quiet.setLevel(level)


def _fold_residual_adds(model: onnx.ModelProto) -> int:
    """Add(a, b) -> SimplifiedLayerNormalization  =>  SkipSimplifiedLayerNormalization(a, b), whose 4th
    output is a + b for the later consumers of the sum (the next residual)."""
    graph = model.graph
    producer, inits = producers(graph), initializers(graph)
    count, nodes = 0, list(graph.node)
    for norm in nodes:
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or any(is_constant(i, inits, producer) for i in add.input):
            continue  # a bias Add (broadcast) is not a residual
        axis = attribute(norm, "axis", -1)
        if axis != -1 or len(norm.output) > 1:
            continue
        eps = attribute(norm, "epsilon", 1e-5)
        fused = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=f"{norm.name}_skip", domain=_MS, epsilon=eps)
        graph.node.append(fused)
        graph.node.remove(norm)
        graph.node.remove(add)
        count += 1
    if count:
        toposort(graph)
    return count


# ------------------------------------------------------------------------------------------- rotary


def _fuse_rotary(model: onnx.ModelProto, dims: Dims, folder: Path) -> int:
    graph = model.graph
    producer, readers, inits = producers(graph), consumers(graph), initializers(graph)
    half = dims.head_dim // 2
    positions = next((i for i in graph.input if i.name == "position_ids"), None)
    if positions is None or len(positions.type.tensor_type.shape.dim) != 2:
        # RotaryEmbedding takes 1-D positions per row; M-RoPE's [3, B, S] positions pick a different
        # position per frequency section, which that kernel cannot express: the rotary stays as traced.
        return 0
    matches = [m for n in graph.node if n.op_type == "Neg" and (m := _rotary_match(n, producer, readers, half, inits))]
    angles = {(m["cos"], m["sin"]) for m in matches}
    if not matches or len(angles) != 1 or "position_ids" not in {i.name for i in graph.input}:
        return 0
    cos_name, sin_name = angles.pop()
    caches = _angle_caches(model, cos_name, sin_name, dims, folder, half)
    if caches is None:
        return 0
    cos_cache, sin_cache = caches
    graph.initializer.extend([numpy_helper.from_array(cos_cache, "attanchor_ort/rotary_cos_cache"),
                              numpy_helper.from_array(sin_cache, "attanchor_ort/rotary_sin_cache")])
    for m in matches:
        rotary = helper.make_node(
            "RotaryEmbedding", [m["x"], "position_ids", "attanchor_ort/rotary_cos_cache", "attanchor_ort/rotary_sin_cache"],
            [m["nodes"][-1].output[0]], name=f"{m['nodes'][-1].name}_rotary", domain=_MS, interleaved=0)
        graph.node.append(rotary)
        for node in m["nodes"]:
            graph.node.remove(node)
    toposort(graph)
    prune(graph)
    return len(matches)


def _rotary_match(neg, producer, readers, half: int, inits) -> dict | None:
    """x*cos + Concat(-x[..., half:], x[..., :half])*sin around one Neg, x a 4-D [B, heads, S, head_dim]."""
    upper = producer.get(neg.input[0])
    if upper is None or upper.op_type != "Slice":
        return None
    x = upper.input[0]
    cat = _only(readers.get(neg.output[0]), "Concat")
    if cat is None or len(cat.input) != 2 or cat.input[0] != neg.output[0]:
        return None
    lower = producer.get(cat.input[1])
    if lower is None or lower.op_type != "Slice" or lower.input[0] != x:
        return None
    if _slice(lower, inits, producer) != (0, half) or (_slice(upper, inits, producer) or (None,))[0] != half:
        return None
    mul_sin = _only(readers.get(cat.output[0]), "Mul")
    if mul_sin is None:
        return None
    sin = mul_sin.input[1] if mul_sin.input[0] == cat.output[0] else mul_sin.input[0]
    add = _only(readers.get(mul_sin.output[0]), "Add")
    if add is None:
        return None
    mul_cos = producer.get(add.input[0] if add.input[1] == mul_sin.output[0] else add.input[1])
    if mul_cos is None or mul_cos.op_type != "Mul" or x not in mul_cos.input:
        return None
    cos = mul_cos.input[1] if mul_cos.input[0] == x else mul_cos.input[0]
    transpose = producer.get(x)  # queries/keys reach the rotary as Transpose(view, [0, 2, 1, 3])
    perm = attribute(transpose, "perm") if transpose else None
    if transpose is None or transpose.op_type != "Transpose" or list(perm or []) != [0, 2, 1, 3]:
        return None
    users = {id(n) for n in readers.get(x, [])}
    if users != {id(upper), id(lower), id(mul_cos)}:
        return None
    return {"x": x, "cos": cos, "sin": sin, "nodes": [mul_cos, upper, lower, neg, cat, mul_sin, add]}


def _slice(node, inits, producer) -> tuple[int, int] | None:
    """(start, end) of a Slice on the last axis, from constant inputs; None when not that."""
    values = [constant_value(name, inits, producer) for name in node.input[1:4]]
    if any(v is None for v in values[:2]) or values[0].size != 1:
        return None
    axes = values[2] if len(values) > 2 else None
    if axes is not None and int(axes.reshape(-1)[0]) not in (-1, 3):
        return None
    return int(values[0].reshape(-1)[0]), int(values[1].reshape(-1)[0])


def _angle_caches(model, cos_name: str, sin_name: str, dims: Dims, folder: Path, half: int):
    """cos/sin [max_positions, half] from the graph's own angle subgraph on positions 0..max-1; None when
    that subgraph needs more than position_ids or its halves differ (not the rotate-half layout)."""
    import onnxruntime as ort

    graph = model.graph
    producer = producers(graph)
    needed, stack, inputs = set(), [cos_name, sin_name], set()
    graph_inputs = {i.name for i in graph.input}
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if name in graph_inputs:
            inputs.add(name)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    if inputs != {"position_ids"}:
        return None
    nodes = [n for n in graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    inits = []
    for t in graph.initializer:
        if t.name in used:
            t = onnx.TensorProto.FromString(t.SerializeToString())
            if t.data_location == onnx.TensorProto.EXTERNAL:
                onnx.external_data_helper.load_external_data_for_tensor(t, str(folder))
            inits.append(t)
    sub = helper.make_graph(nodes, "angles", [next(i for i in graph.input if i.name == "position_ids")],
                            [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in (cos_name, sin_name)],
                            initializer=inits)
    probe = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    positions = np.arange(dims.max_position_embeddings, dtype=np.int64)[None]
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        cos, sin = session.run(None, {"position_ids": positions})
    except Exception:  # noqa: BLE001 - an angle path we cannot evaluate alone: leave the rotary as it is
        return None
    cos, sin = (a.reshape(-1, a.shape[-1]) for a in (cos, sin))
    if cos.shape != (positions.shape[1], 2 * half) or not (
            np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        return None
    return np.ascontiguousarray(cos[:, :half], np.float32), np.ascontiguousarray(sin[:, :half], np.float32)


# ---------------------------------------------------------------------------------------- attention
# The grouped attention block (attanchor_graphs.attention_pass: cache Concats, Q.K^T on [B, kv, group*S,
# head_dim] queries, a Tile'd mask, Softmax, .V) reads the cache where it lies instead of copying it:
#
#   scores = Concat(Q.K_past^T, Q.K_new^T)   probs = Softmax(scores + mask)   out = probs_past.V_past + probs_new.V_new
#
# and present.{i}.key/value are the new positions only (KV_APPEND). The past may then be a preallocated
# buffer longer than the past (the runtime's KVBuffer, written after each call): its length comes from
# attention_mask (T - S), and the slots after it are masked out. onnxruntime's GroupQueryAttention also
# avoids the copy, but its CPU kernel is slower than these standard ops (this form decodes 1.11x faster
# at 512 positions, 1.39x at 1,536; TinyLLaVA-1B int4, 2 threads, docs/QUANTIZATION.md), so it is not used.


def _attend_in_place(model: onnx.ModelProto, dims: Dims) -> int:
    graph = model.graph
    producer, readers, inits = producers(graph), consumers(graph), initializers(graph)
    matches = [m for n in graph.node if n.op_type == "Softmax" and (m := _attention_match(n, producer, readers, inits, graph))]
    layers = sum(1 for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    if not matches or len(matches) != layers:  # all layers or none: the present outputs mean one thing
        return 0
    lengths = _lengths(graph)
    _past_shape_from_mask(graph, dims, lengths)  # before the Shape of the buffer below is added
    p = "attanchor_ort/"
    graph.node.append(helper.make_node("Shape", [matches[0]["past_key"]], [p + "capacity_1d"], start=2, end=3))
    masks: dict[str, str] = {}
    for i, m in enumerate(matches):
        if m["mask"] not in masks:
            masks[m["mask"]] = _buffer_mask(graph, m["mask"], lengths, f"{p}mask{len(masks)}/")
        for node in m["nodes"]:
            graph.node.remove(node)
        # the new positions are computed straight into the present outputs (no copy)
        _rename(graph, m["k_new"], m["present_key"])
        _rename(graph, m["v_new"], m["present_value"])
        q, k_new, v_new = m["q"], m["present_key"], m["present_value"]
        a = f"{p}attention{i}/"
        graph.node.extend([
            helper.make_node("Transpose", [m["past_key"]], [a + "k_past_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [q, a + "k_past_t"], [a + "scores_past"]),
            helper.make_node("Transpose", [k_new], [a + "k_new_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [q, a + "k_new_t"], [a + "scores_new"]),
            helper.make_node("Concat", [a + "scores_past", a + "scores_new"], [a + "scores"], axis=-1),
            helper.make_node("Add", [a + "scores", masks[m["mask"]]], [m["softmax"].input[0]]),
            helper.make_node("Slice", [m["softmax"].output[0], p + "zero", p + "capacity_1d", p + "last_axis"],
                             [a + "probs_past"]),
            helper.make_node("Slice", [m["softmax"].output[0], p + "capacity_1d", p + "end", p + "last_axis"],
                             [a + "probs_new"]),
            helper.make_node("MatMul", [a + "probs_past", m["past_value"]], [a + "out_past"]),
            helper.make_node("MatMul", [a + "probs_new", v_new], [a + "out_new"]),
            helper.make_node("Add", [a + "out_past", a + "out_new"], [m["out"]]),
        ])
    for node in graph.node:
        if not node.name and node.output[0].startswith(p):
            node.name = node.output[0]
    toposort(graph)
    prune(graph)
    return len(matches)


def attend_over_whole_cache(model: onnx.ModelProto, causal_chunks: int = 1) -> int:
    """The in-place blocks above with past and new positions joined before Q.K^T and probs.V, not after:

        scores = Q.Concat(K_past, K_new)^T   probs = Softmax(scores + mask)   out = probs.Concat(V_past, V_new)

    For a graph that only runs prompts (precision/prefill_int8.py). There joining K and V copies
    [B, kv, T, head_dim] (a few MB), while joining the scores and splitting the probabilities copied
    [B, kv, group*S, T] twice (~180 MB a layer for 4 prompts of 594 positions at TinyLLaVA-1B dims). A
    decode step is the other way round, which is why decoder.onnx keeps the in-place form. Inputs and
    outputs are unchanged (present: the new positions, KV_APPEND). Returns the blocks rewritten.

    causal_chunks > 1 splits the new positions into that many consecutive query chunks, each reading the
    keys up to its own last position only (_causal_chunks): of the masked future, only the part inside
    each chunk's diagonal block is still computed (1 / (chunks + 1) of the work; half without chunks)."""
    graph = model.graph
    producer, readers = producers(graph), consumers(graph)
    count, bounds, masks = 0, None, {}
    while (a := f"attanchor_ort/attention{count}/") + "scores" in producer:
        part = {name: producer[a + name] for name in ("k_past_t", "k_new_t", "scores_past", "scores_new", "scores",
                                                       "probs_past", "probs_new", "out_past", "out_new")}
        join = _only(readers.get(a + "out_past"), "Add")
        if join is None:
            raise ValueError(f"{a}: not the in-place attention block this module writes")
        q, probs = part["scores_past"].input[0], part["probs_past"].input[0]
        past_key, new_key = part["k_past_t"].input[0], part["k_new_t"].input[0]
        past_value, new_value = part["out_past"].input[1], part["out_new"].input[1]
        for node in [*part.values(), join]:
            graph.node.remove(node)
        graph.node.extend([
            helper.make_node("Concat", [past_key, new_key], [a + "k_all"], axis=2, name=a + "k_all"),
            helper.make_node("Concat", [past_value, new_value], [a + "v_all"], axis=2, name=a + "v_all"),
        ])
        if causal_chunks <= 1:
            graph.node.extend([
                helper.make_node("Transpose", [a + "k_all"], [a + "k_all_t"], perm=[0, 1, 3, 2], name=a + "k_all_t"),
                helper.make_node("MatMul", [q, a + "k_all_t"], [a + "scores"], name=a + "scores"),
                helper.make_node("MatMul", [probs, a + "v_all"], [join.output[0]], name=a + "out"),
            ])
        else:
            add, softmax = _only(readers.get(a + "scores"), "Add"), producer.get(probs)
            if add is None or softmax is None or softmax.op_type != "Softmax" or add.output[0] != softmax.input[0]:
                raise ValueError(f"{a}: not the in-place attention block this module writes")
            graph.node.remove(add)
            graph.node.remove(softmax)
            mask = add.input[1]
            bounds = bounds or _chunk_bounds(graph, q, mask, causal_chunks)
            if mask not in masks:  # one set of blocks per distinct mask, shared by the layers that read it
                masks[mask] = _chunk_masks(graph, mask, bounds, f"{_CHUNKS}mask{len(masks)}/")
            _causal_chunks(graph, a, q, bounds, masks[mask], join.output[0])
        count += 1
    toposort(graph)
    prune(graph)
    return count


_CHUNKS = "attanchor_ort/chunks/"


def _chunk_bounds(graph, q: str, mask: str, chunks: int) -> list[dict]:
    """What every layer's chunks share: chunk j's rows [start, end) of the S new positions (ceil(S / chunks)
    each; the last may be shorter, or empty when S < chunks), the keys it reads ([0, T - S + end) of the
    whole cache: the past buffer, then the new positions) and the shapes its rows are reshaped to.

    q is [B, kv, G*S, head_dim], the G query heads of each KV head stacked group-major (G blocks of S
    rows); `mask` (any layer's: all are [B, 1, G*S, T]) gives T."""
    p, o = _CHUNKS, "attanchor_ort/"
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), p + k) for k, v in (
        ("axis2", [2]), ("axis3", [3]), ("rows_keys", [3, 4]), ("spare", [chunks - 1]), ("chunks", [chunks]),
        *((f"index{j}", [j]) for j in range(chunks + 1))))
    graph.node.extend([
        helper.make_node("Shape", [q], [p + "q_lead"], start=0, end=2),         # [B, kv]
        helper.make_node("Shape", [q], [p + "q_rows"], start=2, end=3),         # G*S
        helper.make_node("Shape", [q], [p + "head_dim"], start=3, end=4),
        helper.make_node("Shape", [mask], [p + "mask_lead"], start=0, end=2),   # [B, 1]
        helper.make_node("Shape", [mask], [p + "keys"], start=3, end=4),        # T
        helper.make_node("Div", [p + "q_rows", o + "new_1d"], [p + "group"]),
        helper.make_node("Sub", [p + "keys", o + "new_1d"], [p + "past_keys"]),
        helper.make_node("Add", [o + "new_1d", p + "spare"], [p + "size_up"]),
        helper.make_node("Div", [p + "size_up", p + "chunks"], [p + "size"]),
        helper.make_node("Concat", [p + "q_lead", p + "group", o + "new_1d", p + "head_dim"], [p + "q5_shape"], axis=0),
        helper.make_node("Concat", [p + "mask_lead", p + "group", o + "new_1d", p + "keys"], [p + "mask5_shape"], axis=0),
    ])
    for j in range(chunks + 1):
        graph.node.extend([helper.make_node("Mul", [p + "size", f"{p}index{j}"], [f"{p}edge{j}_unclipped"]),
                           helper.make_node("Min", [f"{p}edge{j}_unclipped", o + "new_1d"], [f"{p}edge{j}"])])
    bounds = []
    for j in range(chunks):
        c, start, end = f"{p}{j}/", f"{p}edge{j}", f"{p}edge{j + 1}"
        graph.node.extend([
            helper.make_node("Sub", [end, start], [c + "rows"]),
            helper.make_node("Mul", [c + "rows", p + "group"], [c + "group_rows"]),
            helper.make_node("Add", [p + "past_keys", end], [c + "keys"]),
            helper.make_node("Concat", [start, o + "zero"], [c + "mask_starts"], axis=0),
            helper.make_node("Concat", [end, c + "keys"], [c + "mask_ends"], axis=0),
            helper.make_node("Concat", [p + "mask_lead", c + "group_rows", c + "keys"], [c + "mask_shape"], axis=0),
            helper.make_node("Concat", [p + "q_lead", c + "group_rows", p + "head_dim"], [c + "q_shape"], axis=0),
            helper.make_node("Concat", [p + "q_lead", p + "group", c + "rows", p + "head_dim"], [c + "out5_shape"],
                             axis=0),
        ])
        bounds.append({"start": start, "end": end, "keys": c + "keys", "mask_starts": c + "mask_starts",
                       "mask_ends": c + "mask_ends", "mask_shape": c + "mask_shape", "q_shape": c + "q_shape",
                       "out5_shape": c + "out5_shape"})
    return bounds


def _chunk_masks(graph, mask: str, bounds: list[dict], p: str) -> list[str]:
    """Each chunk's block of the additive mask [B, 1, G*S, T]: its rows of every query head group, the
    keys it reads."""
    graph.node.append(helper.make_node("Reshape", [mask, _CHUNKS + "mask5_shape"], [p + "mask5"]))
    blocks = []
    for j, b in enumerate(bounds):
        graph.node.extend([
            helper.make_node("Slice", [p + "mask5", b["mask_starts"], b["mask_ends"], _CHUNKS + "rows_keys"],
                             [f"{p}{j}/mask5"]),
            # allowzero: an empty chunk's 0 rows are 0 rows, not "copy the input's dimension"
            helper.make_node("Reshape", [f"{p}{j}/mask5", b["mask_shape"]], [f"{p}{j}/mask"], allowzero=1),
        ])
        blocks.append(f"{p}{j}/mask")
    return blocks


def _causal_chunks(graph, a: str, q: str, bounds: list[dict], masks: list[str], out: str) -> None:
    """One attention block as query chunks (attend_over_whole_cache): chunk j's queries against the keys
    [0, T - S + end_j) of k_all with its mask block, Softmax, then .V over the same positions of v_all;
    the chunks' outputs joined back on the rows. Row for row the same arithmetic as the unchunked block:
    the keys a chunk skips are the ones its mask hides from all its rows."""
    p, o = _CHUNKS, "attanchor_ort/"
    nodes = [helper.make_node("Reshape", [q, p + "q5_shape"], [a + "q5"])]
    for j, (b, mask) in enumerate(zip(bounds, masks, strict=True)):
        c = f"{a}chunk{j}/"
        nodes += [
            helper.make_node("Slice", [a + "q5", b["start"], b["end"], p + "axis3"], [c + "q5"]),
            helper.make_node("Reshape", [c + "q5", b["q_shape"]], [c + "q"], allowzero=1),
            helper.make_node("Slice", [a + "k_all", o + "zero", b["keys"], p + "axis2"], [c + "k"]),
            helper.make_node("Transpose", [c + "k"], [c + "k_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [c + "q", c + "k_t"], [c + "scores"]),
            helper.make_node("Add", [c + "scores", mask], [c + "masked"]),
            helper.make_node("Softmax", [c + "masked"], [c + "probs"], axis=-1),
            helper.make_node("Slice", [a + "v_all", o + "zero", b["keys"], p + "axis2"], [c + "v"]),
            helper.make_node("MatMul", [c + "probs", c + "v"], [c + "out"]),
            helper.make_node("Reshape", [c + "out", b["out5_shape"]], [c + "out5"], allowzero=1),
        ]
    nodes += [helper.make_node("Concat", [f"{a}chunk{j}/out5" for j in range(len(bounds))], [a + "out5"], axis=3),
              helper.make_node("Shape", [q], [a + "out_shape"]),
              helper.make_node("Reshape", [a + "out5", a + "out_shape"], [out])]
    for node in nodes:
        node.name = node.name or node.output[0]
    graph.node.extend(nodes)


def _attention_match(softmax, producer, readers, inits, graph) -> dict | None:
    def op(name, op_type):
        node = producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    add = op(softmax.input[0], "Add")
    scores = op(add.input[0], "MatMul") if add else None
    tile = op(add.input[1], "Tile") if add else None
    pv = _only(readers.get(softmax.output[0]), "MatMul")
    if None in (scores, tile, pv) or pv.input[0] != softmax.output[0]:
        return None
    k_t = op(scores.input[1], "Transpose")
    k_cat, v_cat = (op(k_t.input[0], "Concat") if k_t else None), op(pv.input[1], "Concat")
    if None in (k_cat, v_cat) or len(k_cat.input) != 2 or len(v_cat.input) != 2:
        return None
    if list(attribute(k_t, "perm") or []) != [0, 1, 3, 2] or any(attribute(c, "axis") not in (2, -2) for c in (k_cat, v_cat)):
        return None
    outputs = {o.name for o in graph.output}
    past = {i.name for i in graph.input}
    if k_cat.output[0] not in outputs or v_cat.output[0] not in outputs or not {k_cat.input[0], v_cat.input[0]} <= past:
        return None
    # the present caches feed only this block (and the graph outputs)
    if len(readers.get(k_cat.output[0], [])) != 1 or len(readers.get(v_cat.output[0], [])) != 1:
        return None
    return {"softmax": softmax, "q": scores.input[0], "mask": add.input[1], "out": pv.output[0],
            "k_new": k_cat.input[1], "v_new": v_cat.input[1], "past_key": k_cat.input[0], "past_value": v_cat.input[0],
            "present_key": k_cat.output[0], "present_value": v_cat.output[0],
            "nodes": [add, scores, pv, k_t, k_cat, v_cat]}


def _lengths(graph) -> dict[str, str]:
    """1-D int64 tensors of the batch, total (T, from attention_mask), new (S, from inputs_embeds) and past
    (T - S) lengths, and the constants the rewrites slice with."""
    p = "attanchor_ort/"
    graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), p + name) for name, v in
                              (("zero", 0), ("one", 1), ("last_axis", -1), ("end", np.iinfo(np.int64).max))])
    graph.node.extend([
        helper.make_node("Shape", ["attention_mask"], [p + "mask_shape"]),
        helper.make_node("Gather", [p + "mask_shape", p + "one"], [p + "total_1d"], axis=0),
        helper.make_node("Gather", [p + "mask_shape", p + "zero"], [p + "batch_1d"], axis=0),
        helper.make_node("Shape", ["inputs_embeds"], [p + "new_1d"], start=1, end=2),
        helper.make_node("Sub", [p + "total_1d", p + "new_1d"], [p + "past_1d"]),
    ])
    return {k: p + f"{k}_1d" for k in ("batch", "total", "new", "past")}


def _buffer_mask(graph, mask: str, lengths: dict, p: str) -> str:
    """The [.., T] additive mask widened to the buffer: [.., past | capacity - past slots masked out | S]."""
    graph.initializer.append(numpy_helper.from_array(np.array([np.finfo(np.float32).min], np.float32), p + "masked"))
    o = "attanchor_ort/"
    graph.node.extend([
        helper.make_node("Slice", [mask, o + "zero", lengths["past"], o + "last_axis"], [p + "past"]),
        helper.make_node("Slice", [mask, lengths["past"], o + "end", o + "last_axis"], [p + "new"]),
        helper.make_node("Sub", [o + "capacity_1d", lengths["past"]], [p + "unused_1d"]),
        helper.make_node("Shape", [mask], [p + "leading"], start=0, end=-1),
        helper.make_node("Concat", [p + "leading", p + "unused_1d"], [p + "unused_shape"], axis=0),
        helper.make_node("Expand", [p + "masked", p + "unused_shape"], [p + "unused"]),
        helper.make_node("Concat", [p + "past", p + "unused", p + "new"], [p + "buffer"], axis=-1),
    ])
    return p + "buffer"


def _past_shape_from_mask(graph, dims: Dims, lengths: dict) -> None:
    """Shape(past_key_values.*) -> [B, kv_heads, T - S, head_dim] from attention_mask [B, T] and
    inputs_embeds [B, S, H]. The same numbers for a past of exactly T - S positions, and the right ones
    when the past is a longer preallocated buffer (the runtime's KVBuffer): nothing but the attention
    then depends on the buffer's length."""
    p = "attanchor_ort/"
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    shapes = [n for n in graph.node if n.op_type == "Shape" and n.input[0] in past]
    if not shapes:
        return
    graph.initializer.extend([numpy_helper.from_array(np.array([dims.num_kv_heads], np.int64), p + "kv_heads"),
                              numpy_helper.from_array(np.array([dims.head_dim], np.int64), p + "head_dim")])
    graph.node.append(helper.make_node("Concat", [lengths["batch"], p + "kv_heads", lengths["past"], p + "head_dim"],
                                       [p + "past_shape"], axis=0))
    for shape in shapes:
        start, end = attribute(shape, "start", 0), attribute(shape, "end", 4)
        bounds = f"{p}past_shape_{start}_{end}"
        graph.initializer.extend([numpy_helper.from_array(np.array([start], np.int64), bounds + "_start"),
                                  numpy_helper.from_array(np.array([end], np.int64), bounds + "_end")])
        graph.node.append(helper.make_node("Slice", [p + "past_shape", bounds + "_start", bounds + "_end"],
                                           [shape.output[0]], name=f"{shape.name}_from_mask"))
        graph.node.remove(shape)


def _rename(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


# ----------------------------------------------------------------------------------- greedy choice


def _greedy_output(model: onnx.ModelProto) -> str | None:
    """A `next_token` output (int64 [B]) beside the logits: the arg-max of each row's last position (ArgMax
    keeps the first maximum, as numpy and torch do), -1 where that row's logits are not finite (their sum
    is NaN/Inf, and sum - sum NaN). A greedy step then fetches 8 bytes a row instead of the vocabulary's
    floats (the runtime's decode_next); the logits output stays for sampling and the checks. Returns the
    output's name, or None when the graph has one already, is not a decoder (no present.* outputs) or its
    first output is not [B, S, V] float."""
    graph = model.graph
    if NEXT_TOKEN in {o.name for o in graph.output} or not any(o.name.startswith(PRESENT_PREFIX) for o in graph.output):
        return None
    logits = graph.output[0]
    if logits.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(logits.type.tensor_type.shape.dim) != 3:
        return None
    p = "attanchor_ort/greedy/"
    graph.initializer.extend([numpy_helper.from_array(np.array(-1, np.int64), p + "last"),
                              numpy_helper.from_array(np.array([-1], np.int64), p + "vocab_axis")])
    graph.node.extend([
        helper.make_node("Gather", [logits.name, p + "last"], [p + "last_logits"], axis=1, name=p + "last_logits"),
        helper.make_node("ArgMax", [p + "last_logits"], [p + "argmax"], axis=-1, keepdims=0, name=p + "argmax"),
        helper.make_node("ReduceSum", [p + "last_logits", p + "vocab_axis"], [p + "sum"], keepdims=0, name=p + "sum"),
        helper.make_node("Sub", [p + "sum", p + "sum"], [p + "nan_if_not_finite"], name=p + "nan_if_not_finite"),
        helper.make_node("IsNaN", [p + "nan_if_not_finite"], [p + "not_finite"], name=p + "not_finite"),
        helper.make_node("Where", [p + "not_finite", p + "last", p + "argmax"], [NEXT_TOKEN], name=p + "next_token"),
    ])
    batch = logits.type.tensor_type.shape.dim[0]
    out = helper.make_tensor_value_info(NEXT_TOKEN, onnx.TensorProto.INT64, [batch.dim_param or batch.dim_value or None])
    graph.output.append(out)
    return NEXT_TOKEN


# ------------------------------------------------------------------------------------------ helpers


def _only(nodes, op_type: str):
    return nodes[0] if nodes and len(nodes) == 1 and nodes[0].op_type == op_type else None


def _import(model, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


__all__ = ["fuse_decoder", "fuse_decoder_file", "op_counts"]
