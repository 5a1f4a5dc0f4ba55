"""A second onnxruntime decoder graph for prompts: 8-bit weights and 8-bit per-token activations.

A prefill is compute-bound (every weight meets hundreds of positions), a decode step memory-bound (one
position). MatMulNBits serves the step well: 4-bit weights, half the bytes of 8-bit. For a prompt it
runs int8 dot products on vector units at ~0.4 TFLOP/s on the project's machine, while onnxruntime's
8-bit QGEMM (MatMulInteger, uint8 x int8) runs on the CPU's matrix units where it has them (AMX-INT8;
VNNI otherwise) at ~2-3.5 TFLOP/s on one 2048 x 5632 linear at 512 rows (docs/PERFORMANCE.md, Lever 6).
So `--prefill-int8` writes decoder.prefill.onnx beside the MatMulNBits decoder: the same graph, node for
node, with each MatMulNBits replaced by

    s = max|x| over the row / 127        (one scale per position: per token)
    y = (QuantizeLinear(x, s, 128) - 128) @ W8 * s * w_scale  (+ bias)

the product and both scales as one onnxruntime MatMulIntegerToFloat (com.microsoft: the uint8 x int8
QGEMM with the scales applied as it writes its output; a per-row a_scale of shape [..., 1] is accepted),
and a merged linear's Split (q/k/v, gate/up) replaced by one such product per part,

where W8 is the MatMulNBits weight dequantized and requantized to int8, one scale per output channel
(w_scale; streamed_weights.int8_weight, the int8 QDQ writer's rule too). Per-token activation scales
matter: one scale for the whole [B, S, K] activation (onnxruntime's DynamicQuantizeMatMul) let a few
outlier positions flatten the rest, and tiny-vqa's answers fell from 0.99 to 0.915 on the gate's
questions; per token they stayed (0.995). The runtime runs prompts (calls of more than one position)
through this graph and decode steps through decoder.onnx; both read and write the same KV cache layout,
since everything but the linears is the same nodes.

Its attention joins the cache's past and new keys and values before the products (ort_fusions.
attend_over_whole_cache) instead of joining the scores after them as decoder.onnx does for steps, and
runs the new positions as PROMPT_CHUNKS query chunks, each against the keys up to its own end: the causal
mask hides the rest, so the scores, mask, softmax and probs.V of that masked future are skipped (Lever 8
of docs/PERFORMANCE.md).

Only the new int8 weights go into decoder.prefill.onnx.data; every other initializer (norms, rotary
tables, the constants of the fused nodes) is read from decoder.onnx.data where it already is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from attanchor_graphs.onnx_utils import consumers, initializers
from onnx import helper, numpy_helper

from attanchor_export.precision.graph_files import append_external, data_file, replacing
from attanchor_export.precision.ort_fusions import attend_over_whole_cache
from attanchor_export.precision.streamed_weights import int8_weight

_SHARED = "attanchor/prefill_int8/"
# Query chunks of a prompt's attention. The work left is (chunks + 1) / (2 * chunks) of the whole score
# square: 4 -> 0.625, 8 -> 0.5625, 16 -> 0.53. Measured at TinyLLaVA-1B dims (random weights, int4, 2
# threads; 593 positions): prefill 0.79x (4), 0.72x (8), 0.71x (16) of 1 chunk; at 8-128 positions 8 is
# within +-5% of 1 chunk. 8: nearly all of the gain with half of 16's extra nodes.
PROMPT_CHUNKS = 8


def prefill_name(file: str) -> str:
    """decoder.onnx -> decoder.prefill.onnx"""
    return file[: -len(".onnx")] + ".prefill.onnx" if file.endswith(".onnx") else file + ".prefill"


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                     block_size: int, k: int, n: int) -> np.ndarray:
    """A MatMulNBits weight as fp32 [N, K]: (q - zero point) * scale per block of `block_size` along K.
    4-bit values and zero points are packed two to a byte, the first in the low nibble; without zero
    points the middle of the range (8, or 128) is the zero."""
    blocks = -(-k // block_size)
    packed = packed.reshape(n, blocks, -1)
    if bits == 4:
        q = np.empty((n, blocks, block_size), np.uint8)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    elif bits == 8:
        q = packed
    else:
        raise ValueError(f"MatMulNBits with {bits} bits: only 4 and 8 are read")
    if zero_points is None:
        zero = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif bits == 4:
        zp = zero_points.reshape(n, -1)
        both = np.empty((n, zp.shape[1] * 2), np.uint8)
        both[:, 0::2], both[:, 1::2] = zp & 0x0F, zp >> 4
        zero = both[:, :blocks].astype(np.float32)
    else:
        zero = zero_points.reshape(n, blocks).astype(np.float32)
    weight = (q.astype(np.float32) - zero[..., None]) * scales.reshape(n, blocks, 1).astype(np.float32)
    return weight.reshape(n, blocks * block_size)[:, :k]


def _per_token_nodes(node: onnx.NodeProto, parts: list[tuple[str, str, str, int, str]], opset: int,
                     k: int) -> list[onnx.NodeProto]:
    """What replaces one MatMulNBits node (module doc): its input quantized per row once, then one product
    per part, each (int8 weight, its scale, bias or "", N, output). One part is the node's whole output;
    a merged linear (q/k/v, gate/up: one MatMulNBits and a Split, streamed_weights.py) gets one product
    per Split output instead, so the Split's copy of the [positions, N] result is not made.

    Two read-only passes and one write over the activation, viewed as [positions, K] (a Reshape: no copy):
    max|x| is max(max x, -min x), so no |x| tensor is written; QuantizeLinear divides by the per-row scale
    itself (per-axis, axis 0: a 1-D scale and zero point over the rows), so no x / s is written either.
    The same numbers as Abs -> ReduceMax and Div -> QuantizeLinear(., 1, 128), bit for bit."""
    x, p = node.input[0], f"{node.name or node.output[0]}/prefill_int8/"

    def reduce(op: str, name: str):  # over K; axes an input from opset 18, an attribute before
        return helper.make_node(op, [p + "rows", _SHARED + "last_axis"], [p + name], keepdims=1, name=p + name) \
            if opset >= 18 else helper.make_node(op, [p + "rows"], [p + name], keepdims=1, axes=[-1], name=p + name)

    nodes = [
        helper.make_node("Reshape", [x, f"{_SHARED}rows_{k}"], [p + "rows"], name=p + "rows"),  # [positions, K]
        reduce("ReduceMax", "max"),
        reduce("ReduceMin", "min"),
        helper.make_node("Mul", [p + "max", _SHARED + "inv127"], [p + "from_max"], name=p + "from_max"),
        helper.make_node("Mul", [p + "min", _SHARED + "minus_inv127"], [p + "from_min"], name=p + "from_min"),
        helper.make_node("Max", [p + "from_max", p + "from_min", _SHARED + "tiny"], [p + "scale"],  # no 0/0
                         name=p + "scale"),
        helper.make_node("Reshape", [p + "scale", _SHARED + "flat"], [p + "scale_1d"], name=p + "scale_1d"),
        helper.make_node("Shape", [p + "scale_1d"], [p + "positions"], name=p + "positions"),
        helper.make_node("ConstantOfShape", [p + "positions"], [p + "zero_point"], name=p + "zero_point",
                         value=numpy_helper.from_array(np.array([128], np.uint8))),
        # x / s, round half to even, + 128, saturate: the uint8 codes in one node, one scale per row
        helper.make_node("QuantizeLinear", [p + "rows", p + "scale_1d", p + "zero_point"], [p + "x_u8"], axis=0,
                         name=p + "x_u8"),
        helper.make_node("Shape", [x], [p + "leading"], end=-1, name=p + "leading"),
    ]
    for i, (weight, w_scale, bias, n, out) in enumerate(parts):
        q = f"{p}part{i}/" if len(parts) > 1 else p
        nodes += [
            # the integer product, widened and scaled per row (a_scale [positions, 1]) and per output channel
            # in one kernel: no int32 and fp32 [positions, N] intermediates between separate nodes. A bias
            # stays an Add: its own bias input did not reproduce MatMulNBits' output in a test (onnxruntime 1.32).
            helper.make_node("MatMulIntegerToFloat", [p + "x_u8", weight, p + "scale", w_scale, _SHARED + "128u8"],
                             [q + "y_rows"], domain="com.microsoft", name=q + "matmul"),
            helper.make_node("Concat", [p + "leading", f"{_SHARED}n_{n}"], [q + "y_shape"], axis=0, name=q + "y_shape"),
            helper.make_node("Reshape", [q + "y_rows", q + "y_shape"], [q + "no_bias" if bias else out], name=q + "y"),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [q + "no_bias", bias], [out], name=q + "bias"))
    return nodes


def _split_parts(node: onnx.NodeProto, readers: dict, inits: dict) -> tuple[onnx.NodeProto, list[int]] | None:
    """(the Split, its sizes) when `node`'s output is read by one Split on the last axis with constant
    sizes that add up to N (a merged linear); None otherwise."""
    split = readers.get(node.output[0], [])
    if len(split) != 1 or split[0].op_type != "Split" or len(split[0].input) < 2 or split[0].input[1] not in inits:
        return None
    split = split[0]
    axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
    sizes = [int(v) for v in numpy_helper.to_array(inits[split.input[1]])]
    n = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "N")
    return (split, sizes) if axis == -1 and sum(sizes) == n and len(sizes) == len(split.output) else None


def write_prefill_graph(decoder: Path, output: Path, causal_chunks: int = PROMPT_CHUNKS) -> dict:
    """decoder.prefill.onnx (`output`, beside `decoder`) from the MatMulNBits decoder graph `decoder`,
    with its data file, both or neither; returns its FormRecord.prefill record."""
    decoder, output = Path(decoder), Path(output)
    if decoder.parent.resolve() != output.parent.resolve():
        raise ValueError("the prefill graph is written beside its decoder: it reads the decoder's external data")
    model = onnx.load(str(decoder), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    graph = model.graph
    inits, readers = initializers(graph), consumers(graph)
    replaced, used_by_nbits, new_weights, nodes, sizes, unsplit = 0, set(), [], [], {}, set()
    with replacing(output, "prefill") as (tmp, tmp_data):
        with open(tmp_data, "wb") as f:

            def add_weight(array: np.ndarray, name: str) -> str:
                tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
                tensor.dims.extend(array.shape)
                append_external(tensor, np.ascontiguousarray(array).tobytes(), f, data_file(output).name)
                new_weights.append(tensor)
                return name

            for node in graph.node:
                if node.op_type != "MatMulNBits":
                    if node.op_type != "Split" or node.output[0] not in unsplit:  # a merged linear's Split: gone
                        nodes.append(node)
                    continue
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if len(node.input) > 4 and node.input[4]:
                    raise ValueError(f"{node.name}: MatMulNBits with g_idx (act-order) is not read")
                packed, scales, zero_points = (
                    numpy_helper.to_array(inits[name], str(decoder.parent)) if name else None
                    for name in (list(node.input[1:4]) + [""] * 3)[:3])
                weight = dequantize_nbits(packed, scales, zero_points, attrs["bits"], attrs["block_size"],
                                          attrs["K"], attrs["N"])
                q, scale = int8_weight(weight.T)  # [K, N] as MatMulInteger reads it, one scale per column
                base, bias = f"{node.input[1]}/int8", (node.input[5] if len(node.input) > 5 else "")
                split, widths = _split_parts(node, readers, inits) or (None, [attrs["N"]])
                if split is not None:
                    unsplit.add(split.output[0])
                    used_by_nbits.update(n for n in (split.input[1], bias) if n)  # dropped unless read elsewhere
                bias_array = numpy_helper.to_array(inits[bias], str(decoder.parent)) if bias and split else None
                edges, parts = np.cumsum([0, *widths]), []
                for i, (a, b, out) in enumerate(zip(edges[:-1], edges[1:], split.output if split else node.output)):
                    name, part_bias = base, bias
                    if split is not None:
                        name, part_bias = f"{base}/part{i}", (f"{bias}/part{i}" if bias else "")
                    if bias_array is not None:  # a part's slice of the bias: a small tensor, kept in the .onnx file
                        new_weights.append(numpy_helper.from_array(np.ascontiguousarray(bias_array[a:b]), part_bias))
                    parts.append((add_weight(q[:, a:b], name), add_weight(scale[a:b], name + "_scale"), part_bias,
                                  int(b - a), out))
                nodes.extend(_per_token_nodes(node, parts, opset, attrs["K"]))
                sizes[f"rows_{attrs['K']}"] = [-1, attrs["K"]]
                sizes.update({f"n_{part[3]}": [part[3]] for part in parts})
                used_by_nbits.update(n for n in node.input[1:4] if n)
                replaced += 1
        used = {i for n in nodes for i in n.input}
        # The decoder's other tensors stay where they are: their external references name decoder.onnx.data,
        # which sits in the same folder.
        kept = [t for t in graph.initializer if t.name not in used_by_nbits or t.name in used]
        shared = [numpy_helper.from_array(np.array(1 / 127, np.float32), _SHARED + "inv127"),
                  numpy_helper.from_array(np.array(-1 / 127, np.float32), _SHARED + "minus_inv127"),
                  numpy_helper.from_array(np.array(1e-12, np.float32), _SHARED + "tiny"),
                  numpy_helper.from_array(np.array(128, np.uint8), _SHARED + "128u8"),
                  numpy_helper.from_array(np.array([-1], np.int64), _SHARED + "flat"),
                  *(numpy_helper.from_array(np.array(v, np.int64), _SHARED + name) for name, v in sizes.items())]
        if opset >= 18:
            shared.append(numpy_helper.from_array(np.array([-1], np.int64), _SHARED + "last_axis"))
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend([*kept, *new_weights, *shared])
        joined = attend_over_whole_cache(model, causal_chunks)  # prompts: join K and V, not the scores (ort_fusions)
        tmp.write_bytes(model.SerializeToString())
    return {"file": output.name, "weights": "int8 symmetric, one scale per output channel (from the MatMulNBits "
            "weights)", "activations": "int8 per token, dynamic (MatMulIntegerToFloat uint8 x int8)",
            "replaced_nodes": replaced, "attention_over_whole_cache": joined, "attention_causal_chunks": causal_chunks,
            "bytes": output.stat().st_size + data_file(output).stat().st_size}
