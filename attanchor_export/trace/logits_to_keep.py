"""An optional decoder input that says how many last positions get logits.

A prefill computes the lm_head over every prompt position, yet a generating caller reads only the last
one: at tiny-vqa's vocabulary (49,216 x 576) that head is a fifth of the prefill's arithmetic, and at
Qwen's (151,936) its output alone is 0.6 MB per position. onnxruntime runs every node of a graph whatever
outputs are fetched, so the saving has to be in the graph: the lm_head reads
`hidden[:, -logits_to_keep:]` (transformers' `logits_to_keep` argument, as a graph input).

The input is an int64 scalar that is also an initializer holding 0, so it is optional: a caller that does
not feed it gets every position's logits, as before (0 means all: the Slice starts at 0 - 0).
onnxruntime lets a feed override such an initializer; the TensorRT ONNX parser takes an initializer
listed as an input for a weight, so an engine built from the same file keeps the constant 0 and its IO
is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attanchor_export.errors import ExportError

_SCOPE = "attanchor/logits_to_keep/"


def add_logits_to_keep(path: Path, name: str, logits: str = "logits") -> None:
    """Rewrite the decoder graph at `path` (the .onnx only; its external data is not read) so the node
    that makes `logits` reads the last `name` positions of its first input (all of them while `name` is 0)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    head = next((n for n in graph.node if logits in n.output), None)
    if head is None or not head.input:
        raise ExportError(f"decoder graph: no node makes {logits!r}; cannot add {name!r}")
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), name))
    graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, []))
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0], np.int64), _SCOPE + "axis0"),  # also the 0 in start = 0 - k
        numpy_helper.from_array(np.array([1], np.int64), _SCOPE + "seq_axis"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), _SCOPE + "end"),
    ])
    hidden = head.input[0]
    sliced = _SCOPE + "hidden"
    at = list(graph.node).index(head)  # before the head: the graph stays topologically sorted
    for offset, node in enumerate([
        helper.make_node("Unsqueeze", [name, _SCOPE + "axis0"], [_SCOPE + "count"], name=_SCOPE + "count"),
        helper.make_node("Sub", [_SCOPE + "axis0", _SCOPE + "count"], [_SCOPE + "start"], name=_SCOPE + "start"),
        helper.make_node("Slice", [hidden, _SCOPE + "start", _SCOPE + "end", _SCOPE + "seq_axis"], [sliced],
                         name=_SCOPE + "hidden"),
    ]):
        graph.node.insert(at + offset, node)
    head.input[0] = sliced
    for out in graph.output:  # the position axis is no longer always seq_len
        if out.name == logits and len(out.type.tensor_type.shape.dim) == 3:
            dim = out.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_param = "logits_len"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)
