"""A second onnxruntime decoder graph for prompts: 8-bit weights and 8-bit per-token activations.

A prefill is compute-bound (every weight meets hundreds of positions), a decode step memory-bound (one
position). MatMulNBits serves the step well: 4-bit weights, half the bytes of 8-bit. For a prompt it
runs int8 dot products on vector units at ~0.4 TFLOP/s on the project's machine, while onnxruntime's
8-bit QGEMM (MatMulInteger, uint8 x int8) runs on the CPU's matrix units where it has them (AMX-INT8;
VNNI otherwise) at ~2-3.5 TFLOP/s on one 2048 x 5632 linear at 512 rows (docs/PERFORMANCE.md, Lever 6).
So `--prefill-int8` writes decoder.prefill.onnx beside the MatMulNBits decoder: the same graph, node for
node, with each MatMulNBits replaced by

    s = max|x| over the row / 127        (one scale per position: per token)
    y = (QuantizeLinear(x / s, 1, 128) - 128) @ W8 * s * w_scale  (+ bias)

the product and both scales as one onnxruntime MatMulIntegerToFloat (com.microsoft: the uint8 x int8
QGEMM with the scales applied as it writes its output; a per-row a_scale of shape [..., 1] is accepted),

where W8 is the MatMulNBits weight dequantized and requantized to int8, one scale per output channel
(w_scale). Per-token activation scales matter: one scale for the whole [B, S, K] activation (onnxruntime's
DynamicQuantizeMatMul) let a few outlier positions flatten the rest, and tiny-vqa's answers fell from
0.99 to 0.915 on the gate's questions; per token they stayed (0.995). The runtime runs prompts (calls of
more than one position) through this graph and decode steps through decoder.onnx; both read and write
the same KV cache layout, since everything but the linears is the same nodes.

Its attention joins the cache's past and new keys and values before the products (ort_fusions.
attend_over_whole_cache) instead of joining the scores after them as decoder.onnx does for steps.

Only the new int8 weights go into decoder.prefill.onnx.data; every other initializer (norms, rotary
tables, the constants of the fused nodes) is read from decoder.onnx.data where it already is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attanchor_export.precision.graph_files import append_external, data_file, replacing
from attanchor_export.precision.ort_fusions import attend_over_whole_cache

_SHARED = "attanchor/prefill_int8/"


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


def int8_per_channel(weight_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [K, N] as MatMulInteger reads it, fp32 scale [N]): symmetric, one scale per output channel."""
    scale = np.maximum(np.abs(weight_nk).max(axis=1), np.float32(1e-12)) / np.float32(127)
    q = np.clip(np.rint(weight_nk / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale.astype(np.float32)


def _per_token_nodes(node: onnx.NodeProto, weight: str, scale: str, opset: int) -> list[onnx.NodeProto]:
    """What replaces one MatMulNBits node (module doc): seven nodes (eight with a bias), three passes over the
    activation."""
    x, p = node.input[0], f"{node.name or node.output[0]}/prefill_int8/"
    bias = node.input[5] if len(node.input) > 5 and node.input[5] else ""
    # ReduceMax takes its axes as an input from opset 18, as an attribute before
    row_max = helper.make_node("ReduceMax", [p + "abs", _SHARED + "last_axis"], [p + "max"], keepdims=1,
                               name=p + "max") if opset >= 18 else \
        helper.make_node("ReduceMax", [p + "abs"], [p + "max"], keepdims=1, axes=[-1], name=p + "max")
    nodes = [
        helper.make_node("Abs", [x], [p + "abs"], name=p + "abs"),
        row_max,
        helper.make_node("Mul", [p + "max", _SHARED + "inv127"], [p + "scale0"], name=p + "scale0"),
        helper.make_node("Max", [p + "scale0", _SHARED + "tiny"], [p + "scale"], name=p + "scale"),  # no 0/0
        helper.make_node("Div", [x, p + "scale"], [p + "scaled"], name=p + "scaled"),
        # round half to even, + 128, saturate: the uint8 codes in one node (scale 1: already divided)
        helper.make_node("QuantizeLinear", [p + "scaled", _SHARED + "one", _SHARED + "128u8"], [p + "x_u8"],
                         name=p + "x_u8"),
        # the integer product, widened and scaled per token (a_scale [..., 1]) and per output channel in one
        # kernel: no int32 and fp32 [positions, N] intermediates between separate nodes. A bias stays an Add:
        # its own bias input did not reproduce MatMulNBits' output in a test (onnxruntime 1.32).
        helper.make_node("MatMulIntegerToFloat", [p + "x_u8", weight, p + "scale", scale, _SHARED + "128u8"],
                         [p + "no_bias" if bias else node.output[0]], domain="com.microsoft", name=p + "matmul"),
    ]
    if bias:
        nodes.append(helper.make_node("Add", [p + "no_bias", bias], [node.output[0]], name=p + "bias"))
    return nodes


def write_prefill_graph(decoder: Path, output: Path) -> dict:
    """decoder.prefill.onnx (`output`, beside `decoder`) from the MatMulNBits decoder graph `decoder`,
    with its data file, both or neither; returns its FormRecord.prefill record."""
    decoder, output = Path(decoder), Path(output)
    if decoder.parent.resolve() != output.parent.resolve():
        raise ValueError("the prefill graph is written beside its decoder: it reads the decoder's external data")
    model = onnx.load(str(decoder), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    replaced, used_by_nbits, new_weights, nodes = 0, set(), [], []
    with replacing(output, "prefill") as (tmp, tmp_data):
        with open(tmp_data, "wb") as f:
            for node in graph.node:
                if node.op_type != "MatMulNBits":
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
                q, scale = int8_per_channel(weight)
                base = f"{node.input[1]}/int8"
                for array, name in ((q, base), (scale, base + "_scale")):
                    tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
                    tensor.dims.extend(array.shape)
                    append_external(tensor, np.ascontiguousarray(array).tobytes(), f, data_file(output).name)
                    new_weights.append(tensor)
                nodes.extend(_per_token_nodes(node, base, base + "_scale", opset))
                used_by_nbits.update(n for n in node.input[1:4] if n)
                replaced += 1
        used = {i for n in nodes for i in n.input}
        # The decoder's other tensors stay where they are: their external references name decoder.onnx.data,
        # which sits in the same folder.
        kept = [t for t in graph.initializer if t.name not in used_by_nbits or t.name in used]
        shared = [numpy_helper.from_array(np.array(1 / 127, np.float32), _SHARED + "inv127"),
                  numpy_helper.from_array(np.array(1e-12, np.float32), _SHARED + "tiny"),
                  numpy_helper.from_array(np.array(1, np.float32), _SHARED + "one"),
                  numpy_helper.from_array(np.array(128, np.uint8), _SHARED + "128u8")]
        if opset >= 18:
            shared.append(numpy_helper.from_array(np.array([-1], np.int64), _SHARED + "last_axis"))
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend([*kept, *new_weights, *shared])
        joined = attend_over_whole_cache(model)  # prompts: join K and V, not the scores (ort_fusions)
        tmp.write_bytes(model.SerializeToString())
    return {"file": output.name, "weights": "int8 symmetric, one scale per output channel (from the MatMulNBits "
            "weights)", "activations": "int8 per token, dynamic (MatMulIntegerToFloat uint8 x int8)",
            "replaced_nodes": replaced, "attention_over_whole_cache": joined,
            "bytes": output.stat().st_size + data_file(output).stat().st_size}
