"""Small ONNX helpers shared by the graph builders and graph passes (onnx + numpy only): the IR version
to write, and one set of graph indexes (producers, consumers, constant values), toposort and prune."""

from __future__ import annotations

import heapq
import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "MIN_IR_VERSION", "attribute", "constant_value", "consumers", "initializers", "ir_version_for_runtime",
    "is_constant", "name_nodes", "producers", "prune", "toposort",
]

# Model-local functions need IR >= 8 (and so does opset 17).
MIN_IR_VERSION = 8

# onnxruntime refuses models whose IR version is newer than the onnx library it was built
# with, while the installed onnx package writes its own (possibly newer) IR version: e.g.
# onnx 1.23 writes IR 14, which onnxruntime 1.31 rejects. Highest IR version each
# onnxruntime release loads, from the onnx version it bundles; versions in between use the
# nearest lower entry, which is safe because loaders accept every older IR version.
_ORT_MAX_IR = (
    ((1, 14), 8),
    ((1, 15), 9),
    ((1, 18), 10),
    ((1, 22), 11),
    ((1, 31), 13),  # verified: 1.31.1 loads IR 13, refuses IR 14
)
_FALLBACK_IR = 10


def _parse_version(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def ir_version_for_runtime(ort_version: str | None = None) -> int:
    """Highest ONNX IR version that both the installed onnx and onnxruntime handle.

    ``ort_version`` defaults to the installed onnxruntime's; without onnxruntime (or with an
    unparsable version) the answer is IR 10, which every onnxruntime since 1.18 loads.
    """
    if ort_version is None:
        try:
            import onnxruntime  # lazy: the graphs package must import without it

            ort_version = onnxruntime.__version__
        except ImportError:
            ort_version = ""
    parsed = _parse_version(ort_version)
    if parsed is None:
        ir = _FALLBACK_IR
    elif parsed < _ORT_MAX_IR[0][0]:
        ir = MIN_IR_VERSION
    else:
        ir = max(v for ver, v in _ORT_MAX_IR if ver <= parsed)
    return max(MIN_IR_VERSION, min(ir, onnx.IR_VERSION))


# ------------------------------------------------------------------------------ graph indexes and passes
# One set for every pass over a GraphProto (fp16 conversion, weight quantization, the attention rewrite,
# the TensorRT lint): who produces a tensor, who reads it, what constant it holds, a topological order.


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it (main graph only, not subgraphs)."""
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order (a missing name reads as [])."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name].append(node)
    return readers


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def is_constant(name: str, inits: dict, producer: dict) -> bool:
    """An initializer or the output of a Constant node."""
    node = producer.get(name)
    return name in inits or (node is not None and node.op_type == "Constant")


def constant_value(name: str, inits: dict, producer: dict) -> np.ndarray | None:
    """The value of an initializer or Constant output when it is stored in the .onnx itself, else None
    (external data is never read: callers often load graphs without their weights)."""
    if name in inits:
        tensor = inits[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - a malformed tensor is "not a known constant"
            return None
    node = producer.get(name)
    if node is None or node.op_type != "Constant":
        return None
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(a), np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), np.int64)
    return None


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique name (op_index): quantizers select nodes by name."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder the nodes topologically, in place; among ready nodes the original order wins, so an
    already sorted graph is unchanged and appended nodes move only as far up as they must.
    ValueError on a cycle."""
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    waiting = [0] * len(nodes)
    users: dict[str, list[int]] = defaultdict(list)
    for k, node in enumerate(nodes):
        for name in set(node.input):
            if name not in available and name in producer:
                waiting[k] += 1
                users[name].append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for out in nodes[k].output:
            for user in users.get(out, ()):
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, user)
    if len(order) != len(nodes):
        stuck = next(n for k, n in enumerate(nodes) if waiting[k])
        raise ValueError(f"graph {graph.name!r} has a cycle at node {stuck.name or stuck.op_type!r}")
    del graph.node[:]
    graph.node.extend(order)


def prune(graph: onnx.GraphProto) -> int:
    """Drop nodes whose outputs nobody reads, then initializers and value_info nobody references;
    returns the number of nodes removed. The graph must be topologically sorted (one backward pass)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs (If/Loop) read outer names
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(n for sub in a.g.node for n in sub.input)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    live_inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live_inits)
    produced = {o for n in graph.node for o in n.output}
    live_vi = [v for v in graph.value_info if v.name in produced or v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(live_vi)
    return removed
