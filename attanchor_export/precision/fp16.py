"""fp16 conversion: onnxruntime's converter with a block list found by pattern, then Cast clean-up.

`convert_fp16(model)`: onnxruntime.transformers.float16.convert_float_to_float16 with keep_io_types
(graph inputs/outputs stay float32) and a node block list (`fp32_islands`): normalisations (LayerNorm
ops and decomposed RMSNorm/LayerNorm: Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul chains), Softmax, the RoPE
angle path (everything feeding Cos/Sin that is not activation-dependent) and the lm_head MatMul stay
fp32. Two fix-ups run after the converter: duplicate Cast nodes it emits for a node reading one tensor
twice are merged, and fp32 -> fp16 -> fp32 Cast round trips between consecutive fp32 nodes are removed
(the converter casts every blocked node's output to fp16 and back, which would overflow x**2 in RMSNorm,
the very thing the block list is for). docs/QUANTIZATION.md explains the choices.
"""

from __future__ import annotations

import contextlib

import onnx
from attanchor_graphs.onnx_utils import (
    constant_value,
    consumers,
    initializers,
    is_constant,
    name_nodes,
    producers,
    toposort,
)
from onnx import TensorProto

from attanchor_export.errors import ExportError
from attanchor_export.options import ARTIFACT_IR_VERSION
from attanchor_export.precision.graph_files import append_external, data_file, replacing

NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
            "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNormalization",
            "InstanceNormalization", "BatchNormalization")
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
_SHAPE_OPS = ("Shape", "Size")
_PASS_THROUGH = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Slice", "Gather", "Flatten")


def logits_nodes(graph, output: str = "logits") -> list:
    """The lm_head MatMul/Gemm and any pass-through / bias nodes between it and the `logits` output."""
    producer = producers(graph)
    if output not in {o.name for o in graph.output}:
        return []
    chain, name = [], output
    for _ in range(16):
        node = producer.get(name)
        if node is None:
            break
        chain.append(node)
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            return chain
        if node.op_type == "Add" or node.op_type in _PASS_THROUGH:
            name = node.input[0]
            continue
        break
    return []


def fp32_islands(graph, output_logits: str | None = "logits") -> dict[str, set[str]]:
    """Node names to keep in fp32 for an fp16 graph, by category (norm, softmax, rope, logits)."""
    producer, readers, inits = producers(graph), consumers(graph), initializers(graph)
    keep: dict[str, set[str]] = {"norm": set(), "softmax": set(), "rope": set(), "logits": set()}
    for n in graph.node:
        if n.op_type in NORM_OPS:
            keep["norm"].add(n.name)
        elif n.op_type in SOFTMAX_OPS:
            keep["softmax"].add(n.name)

    # Decomposed norms: [ReduceMean(a) -> Sub(a, .) ->] Pow(x, 2) | Mul(x, x) -> ReduceMean -> Add(eps)
    # -> Sqrt -> Reciprocal | Div -> Mul(x, .) | Div(x, .) [-> Mul(gain) [-> Add(bias)]].
    for n in graph.node:
        if n.op_type != "ReduceMean":
            continue
        sq = producer.get(n.input[0])
        if sq is None:
            continue
        if sq.op_type == "Pow":
            exponent = constant_value(sq.input[1], inits, producer)
            if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
                continue
            x = sq.input[0]
        elif sq.op_type == "Mul" and sq.input[0] == sq.input[1]:
            x = sq.input[0]
        else:
            continue
        chain, cur, found = [sq, n], n, None
        for _ in range(6):
            nexts = readers.get(cur.output[0], [])
            if len(nexts) != 1:
                break
            nxt = nexts[0]
            chain.append(nxt)
            if nxt.op_type in ("Mul", "Div") and x in nxt.input:
                found = nxt
                break
            if nxt.op_type not in ("Add", "Sqrt", "Reciprocal", "Div"):
                break
            cur = nxt
        if found is None:
            continue
        tail = found
        for op in ("Mul", "Add"):  # gain, then bias (LayerNorm)
            nexts = readers.get(tail.output[0], [])
            if len(nexts) == 1 and nexts[0].op_type == op and any(is_constant(i, inits, producer) for i in nexts[0].input):
                tail = nexts[0]
                chain.append(tail)
            else:
                break
        px = producer.get(x)
        if px is not None and px.op_type == "Sub":
            mean = producer.get(px.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == px.input[0]:
                chain += [px, mean]
        keep["norm"].update(c.name for c in chain)

    # RoPE: the angle path (position ids * inv_freq, Cos, Sin, cached tables gathered by position),
    # i.e. every ancestor of a Cos/Sin that does not depend on activations. In fp16, positions past
    # 2048 are not even representable exactly, and angle errors grow with the position.
    live = _activation_dependent(graph)
    stack = [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    seen = set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        keep["rope"].add(n.name)
        for name in n.input:
            p = producer.get(name)
            if p is None or p.op_type in _SHAPE_OPS or name in live:
                continue
            stack.append(p)

    if output_logits:
        keep["logits"].update(n.name for n in logits_nodes(graph, output_logits))
    return keep


def _activation_dependent(graph) -> set[str]:
    """Tensors that depend on a float graph input (activations), by forward propagation."""
    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    live = {i.name for i in graph.input if i.type.tensor_type.elem_type in float_types}
    for n in graph.node:  # nodes are topologically sorted in a valid model
        if n.op_type in _SHAPE_OPS:
            continue
        if any(x in live for x in n.input):
            live.update(o for o in n.output if o)
    return live


def _cast_to(node) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return None


def _tensor_types(graph) -> dict[str, int]:
    types = {i.name: i.data_type for i in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _cleanup_casts(model) -> None:
    """Fix what convert_float_to_float16 leaves: duplicate nodes (same outputs, e.g. two Casts for a node
    reading one tensor twice), fp32 -> fp16 -> fp32 Cast round trips between fp32 islands, dead Casts."""
    graph = model.graph
    seen, nodes = set(), []
    for n in graph.node:
        key = tuple(n.output)
        if key in seen:
            continue
        seen.add(key)
        nodes.append(n)
    types = _tensor_types(graph)
    made_by = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in graph.output}
    rename = {}
    for n in nodes:
        if n.op_type != "Cast" or _cast_to(n) != TensorProto.FLOAT:
            continue
        p = made_by.get(n.input[0])
        if p is not None and p.op_type == "Cast" and _cast_to(p) == TensorProto.FLOAT16 \
                and types.get(p.input[0]) == TensorProto.FLOAT:
            if n.output[0] in outputs:  # e.g. logits: the fp32 lm_head result goes out as is
                n.op_type, n.input[0] = "Identity", p.input[0]
                del n.attribute[:]
            else:
                rename[n.output[0]] = p.input[0]
    kept = []
    for n in nodes:
        if n.op_type == "Cast" and n.output[0] in rename:
            continue
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
        kept.append(n)
    while True:  # drop Casts nobody reads
        used = {x for n in kept for x in n.input} | outputs
        alive = [n for n in kept if n.op_type != "Cast" or n.output[0] in used]
        if len(alive) == len(kept):
            break
        kept = alive
    del graph.node[:]
    graph.node.extend(kept)
    produced = {o for n in kept for o in n.output}
    infos, names = [], set()
    for vi in graph.value_info:
        if vi.name in produced and vi.name not in names:
            names.add(vi.name)
            infos.append(vi)
    del graph.value_info[:]
    graph.value_info.extend(infos)
    try:
        toposort(graph)  # the converter appends its Cast nodes at the end
    except ValueError as e:
        raise ExportError(str(e)) from None


def convert_fp16(model, output_logits: str | None = "logits") -> tuple[onnx.ModelProto, dict]:
    """fp16 graph with fp32 islands (see fp32_islands) and float32 inputs/outputs. Returns (model, counts)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    name_nodes(model.graph)
    # The dynamo exporter lists initializers in value_info too; the converter would then mark them fp16
    # while keeping the fp32 data and add no-op Casts in front of every fp32 island that reads them.
    inits = {i.name for i in model.graph.initializer}
    infos = [vi for vi in model.graph.value_info if vi.name not in inits]
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)
    _complete_value_info(model)
    islands = fp32_islands(model.graph, output_logits)
    block = set().union(*islands.values())
    model = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,  # the dynamo exporter writes value_info for every tensor; >2 GB safe
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *NORM_OPS, *SOFTMAX_OPS],
        node_block_list=sorted(block),
    )
    _cleanup_casts(model)
    return model, {k: len(v) for k, v in islands.items()}


def convert_fp16_file(path, output_logits: str | None = "logits") -> dict:
    """convert_fp16 on `path` without loading its weights: the converter runs on the graph alone (it only
    retypes the external initializers it converts), then the external data file is rewritten one tensor
    at a time, the converted ones through the converter's own fp32 -> fp16 function. Memory is one
    tensor, where loading the graph would hold all of them (27 GB of fp32 at 7B). Returns the counts."""
    from pathlib import Path

    path = Path(path)
    skeleton = onnx.load(str(path), load_external_data=False)
    before = {i.name: i.data_type for i in skeleton.graph.initializer}
    with _shapes_from_dims():
        model, kept = convert_fp16(skeleton, output_logits)
    _rewrite_external_data(model, path, before)
    return kept


@contextlib.contextmanager
def _shapes_from_dims():
    """The converter reads an initializer's shape through numpy_helper.to_array, i.e. its data; the dims
    say the same without reading (and without the data, which the skeleton does not hold)."""
    import onnxruntime.transformers.float16 as converter
    from onnx import helper

    original = converter.make_value_info_from_tensor
    converter.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        converter.make_value_info_from_tensor = original


def _rewrite_external_data(model, path, before: dict) -> None:
    """Write `model` over `path`, its external tensors copied from the old data file, fp32 -> fp16 where
    the converter retyped them; through temporary names, replaced at the end."""
    import numpy as np
    from onnxruntime.transformers.float16 import convert_np_to_float16

    data = data_file(path)
    with replacing(path, "fp16") as (tmp, tmp_data):
        with open(data, "rb") as src, open(tmp_data, "wb") as dst:
            for tensor in model.graph.initializer:
                if tensor.data_location != TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                src.seek(int(info.get("offset", 0)))
                raw = src.read(int(info["length"]))
                if before.get(tensor.name) == TensorProto.FLOAT and tensor.data_type == TensorProto.FLOAT16:
                    raw = convert_np_to_float16(np.frombuffer(raw, np.float32)).tobytes()
                append_external(tensor, raw, dst, data.name)
                del raw
        model.ir_version = ARTIFACT_IR_VERSION
        tmp.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


def _complete_value_info(model) -> None:
    """Types for tensors that have none (nodes added by graph rewrites such as the attention pass): the
    converter runs without shape inference and decides where Casts go from value_info. Inferred on a
    weightless skeleton, so a >2 GB model never has to be serialised."""
    from onnx import helper

    graph = model.graph
    known = {v.name for v in (*graph.value_info, *graph.input, *graph.output)}
    produced = {o for n in graph.node for o in n.output if o}
    if produced <= known:
        return
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    skeleton = helper.make_model(
        helper.make_graph(list(graph.node), "skeleton", [*graph.input, *weights], list(graph.output),
                          value_info=list(graph.value_info)),
        opset_imports=list(model.opset_import), functions=list(model.functions),
    )
    skeleton.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known and v.name in produced)


__all__ = ["NORM_OPS", "SOFTMAX_OPS", "convert_fp16", "convert_fp16_file", "fp32_islands", "logits_nodes"]
