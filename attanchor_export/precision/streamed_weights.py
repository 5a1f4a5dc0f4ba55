"""Blockwise weight-only forms written from a graph whose weights stay on disk.

`write_nbits(src, dst, names, ...)` opens `src` with onnx-ir (external data memory-mapped, nothing
read up front), swaps each named MatMul(x, W) for its quantized form, and writes `dst`: each
quantized tensor is computed only when the writer reaches it, from one weight read out of the map,
and that weight's pages are released right after. Memory is one weight (plus its quantized copy)
whatever the model size; the old path (onnxruntime's MatMulNBitsQuantizer on a loaded ModelProto)
held the whole fp32 graph, 27 GB at 7B.

The numbers are onnxruntime's: `DefaultWeightOnlyQuantizer.qbits_block_quant` (the C++ kernels the
MatMulNBitsQuantizer calls) quantizes each weight, so both paths give the same bytes. Forms:
- MatMulNBits (com.microsoft; `qdq=False`): packed [N, k_blocks, blob] uint8, scales [N, k_blocks],
  zero points when asymmetric; attributes K, N, bits, block_size (and accuracy_level when set).
- QDQ INT4 (`qdq=True`, symmetric): DequantizeLinear(INT4 [K, N], scales [k_blocks, N], axis 0,
  block_size) feeding the original MatMul, what TensorRT reads for weight-only INT4.
- QDQ INT8 with calibrated activations (`quantize_graph_int8_qdq`; precision.quantize.write_int8_qdq
  writes the file): the TensorRT int8 form. quantize_static made it before, and held the fp32 graph three
  times over plus a calibration session with every weight repacked: a TinyLLaVA-1B `--quant int8` export
  went past 15 GiB there, a `--vision-quant int8` one to 1.66x its fp32 weights (1.26x without that
  step). Here the activation ranges come from one session over the graph as it is on disk
  (calibration.channel_absmax, no prepacking, no arena), and the weights are written one at a time like
  the forms above. The numbers are quantize_static's (MinMax calibration, symmetric int8, per-channel
  weights on axis 1): tests/test_int8_qdq.py holds the two side by side.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from attanchor_export.precision.graph_files import data_file, replacing
from attanchor_export.precision.weights import quiet_ort_quantization

_MS = "com.microsoft"


def linear_nodes(graph: ir.Graph, include_lm_head: bool, logits: str | None = "logits"):
    """(MatMul nodes with a constant 2-D float weight, in graph order; the lm_head MatMul or None)."""
    head = lm_head_node(graph, logits) if logits else None
    nodes = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        if w.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        if node is head and not include_lm_head:
            continue
        nodes.append(node)
    return nodes, head


def lm_head_node(graph: ir.Graph, logits: str = "logits"):
    """The MatMul that produces `logits`, through reshapes / casts / a bias Add."""
    value = next((o for o in graph.outputs if o.name == logits), None)
    for _ in range(16):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits"):
            return node
        if node.op_type not in ("Add", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "Slice", "Flatten"):
            return None
        value = node.inputs[0]
    return None


class _Quantized:
    """Each weight's quantized parts (`quantize(weight)`), computed once for the two or three initializers
    that hold them and dropped when the last is written (thread-safe: the writer may run tensors in parallel)."""

    def __init__(self, quantize, parts: int):
        self.quantize, self.parts = quantize, parts
        self._lock = threading.Lock()
        self._cache: dict[str, list] = {}

    def part(self, value: ir.Value, index: int):
        def compute():
            with self._lock:
                entry = self._cache.get(value.name)
                if entry is None:
                    tensor = value.const_value
                    weight = np.asarray(tensor.numpy())  # fp32 or fp16: the scales take its type
                    entry = self._cache[value.name] = [self.quantize(weight), self.parts]
                    del weight
                    if isinstance(tensor, ir.ExternalTensor):
                        tensor.release()  # unmap: touched pages would otherwise count in our RSS
                result = entry[0][index]
                entry[1] -= 1
                if entry[1] == 0:
                    del self._cache[value.name]
            return result

        return compute


def _quantizer(bits: int, block_size: int, symmetric: bool, qdq: bool, accuracy_level: int | None):
    from onnxruntime.quantization import QuantFormat

    with quiet_ort_quantization():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=bits,
            quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
        )
        return DefaultWeightOnlyQuantizer(config)


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small initializer of `graph`, its type and shape those of `array`."""
    value = ir.val(name, const_value=ir.tensor(array, name=name))
    graph.initializers.add(value)
    return value


def _lazy(compute, dtype: ir.DataType, shape, name: str, packed_as: ir.DataType | None = None):
    def tensor():
        array = compute()
        if packed_as is not None:
            return ir.PackedTensor(array, packed_as, shape=shape, name=name)
        return ir.tensor(np.ascontiguousarray(array), name=name)

    return ir.val(name, const_value=ir.LazyTensor(tensor, dtype=dtype, shape=ir.Shape(shape), name=name))


def quantize_graph(model: ir.Model, nodes, bits: int, block_size: int, symmetric: bool, qdq: bool,
                   accuracy_level: int | None = None) -> int:
    """Rewrite `nodes` (MatMuls with constant [K, N] weights) of `model` in place; returns how many."""
    if qdq and (bits != 4 or not symmetric):
        raise ValueError("the QDQ form is symmetric INT4")
    graph = model.graph
    quantized = _Quantized(_quantizer(bits, block_size, symmetric, qdq, accuracy_level).qbits_block_quant,
                           parts=2 if (qdq or symmetric) else 3)
    if qdq:
        _import(model, "", 21)
    else:
        _import(model, _MS, 1)
    count = 0
    for node in nodes:
        w = node.inputs[1]
        k, n = (int(d) for d in w.const_value.shape)
        blocks = (k + block_size - 1) // block_size
        scale_type = w.const_value.dtype  # MatMulNBits / DequantizeLinear: scales in the activations' type
        if qdq:
            q = _lazy(quantized.part(w, 0), ir.DataType.INT4, [k, n], f"{w.name}_DQ_Q4", packed_as=ir.DataType.INT4)
            s = _lazy(quantized.part(w, 1), scale_type, [blocks, n], f"{w.name}_DQ_scales")
            for v in (q, s):
                graph.initializers.add(v)
            dq = ir.node("DequantizeLinear", [q, s], attributes={"axis": 0, "block_size": block_size},
                         name=f"{node.name}_DQ_Q4")
            dq.outputs[0].name = f"{w.name}_DQ_Q4_output"
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
        else:
            per_byte = 8 // bits
            blob = (block_size + per_byte - 1) // per_byte
            inputs = [node.inputs[0],
                      _lazy(quantized.part(w, 0), ir.DataType.UINT8, [n, blocks, blob], f"{w.name}_Q{bits}"),
                      _lazy(quantized.part(w, 1), scale_type, [n, blocks], f"{w.name}_scales")]
            if not symmetric:
                inputs.append(_lazy(quantized.part(w, 2), ir.DataType.UINT8, [n, (blocks + per_byte - 1) // per_byte],
                                    f"{w.name}_zero_points"))
            for v in inputs[1:]:
                graph.initializers.add(v)
            attributes = {"K": k, "N": n, "bits": bits, "block_size": block_size}
            if accuracy_level:
                attributes["accuracy_level"] = accuracy_level
            replacement = ir.node("MatMulNBits", inputs, attributes=attributes, domain=_MS, name=f"{node.name}_Q{bits}")
            graph.insert_before(node, replacement)
            out_name = node.outputs[0].name
            # The lm_head's output may be the graph's `logits` itself, which must keep its declared type.
            replacement.outputs[0].type, replacement.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
            node.outputs[0].replace_all_uses_with(replacement.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            replacement.outputs[0].name = out_name
        if not w.uses():
            graph.initializers.pop(w.name)
        count += 1
    return count


def merge_shared_input_linears(graph: ir.Graph, nodes) -> tuple[list, list[list[str]]]:
    """Linears that read the same input (a layer's q, k and v; its gate and up) become ONE MatMul on their
    weights concatenated along N, followed by a Split that gives back each original output under its own
    name. Returns (the linears to quantize: merged ones and the rest, in graph order; the merged groups as
    lists of the original node names).

    For the onnxruntime form: one MatMulNBits reads the layer's q/k/v weights in one pass and quantizes
    its activations once instead of three times. Blockwise weight quantization works per output column
    (blocks run along K), so quantizing the concatenated weight gives exactly the concatenation of the
    separately quantized weights. The concatenated weight is computed when the writer reaches it, from
    the mapped parts (released right after): memory stays about one merged weight."""
    groups: dict[tuple, list] = {}
    for node in nodes:
        w = node.inputs[1].const_value
        key = (id(node.inputs[0]), int(w.shape[0]), w.dtype)
        groups.setdefault(key, []).append(node)
    merged_names, result = [], []
    merged_into: dict[int, ir.Node] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        weights = [m.inputs[1] for m in members]
        k, dtype = int(weights[0].const_value.shape[0]), weights[0].const_value.dtype
        widths = [int(w.const_value.shape[1]) for w in weights]
        name = "+".join(w.name for w in weights)
        shape = ir.Shape([k, sum(widths)])

        def concatenated(weights=weights, widths=widths, name=name):
            out, start = None, 0
            for w, width in zip(weights, widths):
                tensor = w.const_value
                part = tensor.numpy()
                if out is None:
                    out = np.empty((part.shape[0], sum(widths)), part.dtype)
                out[:, start : start + width] = part
                start += width
                del part  # a view of the map: gone before the map is closed
                if isinstance(tensor, ir.ExternalTensor):
                    tensor.release()
            return ir.tensor(out, name=name)

        value = ir.val(name, const_value=ir.LazyTensor(concatenated, dtype=dtype, shape=shape, name=name))
        graph.initializers.add(value)
        first = members[0]
        matmul = ir.node("MatMul", [first.inputs[0], value], name="+".join(m.name for m in members))
        matmul.outputs[0].name = matmul.name + "_output"
        matmul.outputs[0].type = first.outputs[0].type
        sizes = _constant(graph, matmul.name + "_split_sizes", np.array(widths, np.int64))
        split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(members),
                        name=matmul.name + "_split")
        graph.insert_before(first, [matmul, split])
        for member, out in zip(members, split.outputs):
            name_out = member.outputs[0].name
            out.type, out.shape = member.outputs[0].type, member.outputs[0].shape
            member.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(member, safe=True)
            out.name = name_out
        for w in weights:
            if not w.uses():
                graph.initializers.pop(w.name)
        for member in members:
            merged_into[id(member)] = matmul
        merged_names.append([m.name for m in members])
    seen = set()
    for node in nodes:
        target = merged_into.get(id(node), node)
        if id(target) not in seen:
            seen.add(id(target))
            result.append(target)
    return result, merged_names


def _import(model: ir.Model, domain: str, version: int) -> None:
    if model.opset_imports.get(domain, 0) < version:
        model.opset_imports[domain] = version
        model.graph.opset_imports[domain] = version


def save_beside(model: ir.Model, path: Path, ir_version: int) -> None:
    """Write `model` to `path` + its data file through temporary names, then replace both: `path` may be
    the file its weights are still being read from."""
    model.ir_version = ir_version
    with replacing(path) as (tmp, tmp_data):
        ir.save(model, str(tmp), external_data=tmp_data.name, max_workers=1)
        _point_external_data(tmp, data_file(Path(path)).name)


def _point_external_data(onnx_file: Path, location: str) -> None:
    """Rename the external data file every tensor of `onnx_file` refers to (protobuf only, no weights)."""
    proto = onnx.load(str(onnx_file), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx_file.write_bytes(proto.SerializeToString())


def int8_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [K, N], fp32 scale [N]) of a [K, N] weight, symmetric per output channel, as onnxruntime's
    quantize_static computes it (quant_utils.compute_scale_zp, quantize_nparray): the scale of `int8_scale`
    for each column's max |w| (its symmetric range, widened to hold 0), w / scale in float32 rounded half
    to even."""
    w = np.asarray(weight, np.float32)
    scale = int8_scale(np.abs(w).max(axis=0))
    return np.clip(np.round(w / scale), -128, 127).astype(np.int8), scale


def int8_scale(absmax) -> np.ndarray:
    """Symmetric int8 scales (zero point 0) of ranges whose largest magnitudes are `absmax` (a weight's
    per channel, or a calibrated activation's MinMax range), as quantize_static computes them: 2 absmax /
    254 in float64 from the float32 magnitude, stored as float32; 1 where it is below float32's tiny."""
    scale = 2 * np.asarray(absmax, np.float32).astype(np.float64) / 254.0
    return np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)


def quantize_graph_int8_qdq(model: ir.Model, nodes, input_absmax: dict[str, float]) -> int:
    """Rewrite `nodes` (MatMuls with constant [K, N] fp32 weights) of `model` in place into quantize_static's
    QDQ form and names: DequantizeLinear(W_quantized int8, W_scale [N], W_zero_point, axis 1) as the
    weight, and one QuantizeLinear -> DequantizeLinear pair per distinct input (shared by the linears that
    read it: q/k/v, gate/up) with the scale of `input_absmax[input name]`. Returns how many."""
    graph = model.graph
    quantized = _Quantized(int8_weight, parts=2)
    pairs: dict[str, ir.Value] = {}
    for node in nodes:
        x, w = node.inputs[0], node.inputs[1]
        if x.name not in pairs:
            scale = _constant(graph, f"{x.name}_scale", int8_scale(input_absmax[x.name]))
            zero = _constant(graph, f"{x.name}_zero_point", np.array(0, np.int8))
            q = ir.node("QuantizeLinear", [x, scale, zero], name=f"{x.name}_QuantizeLinear")
            q.outputs[0].name = f"{x.name}_QuantizeLinear_Output"
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{x.name}_DequantizeLinear")
            dq.outputs[0].name = f"{x.name}_DequantizeLinear_Output"
            graph.insert_before(node, [q, dq])
            pairs[x.name] = dq.outputs[0]
        node.replace_input_with(0, pairs[x.name])
        k, n = (int(d) for d in w.const_value.shape)
        q8 = _lazy(quantized.part(w, 0), ir.DataType.INT8, [k, n], f"{w.name}_quantized")
        s8 = _lazy(quantized.part(w, 1), ir.DataType.FLOAT, [n], f"{w.name}_scale")
        for v in (q8, s8):
            graph.initializers.add(v)
        z8 = _constant(graph, f"{w.name}_zero_point", np.zeros(n, np.int8))
        dq = ir.node("DequantizeLinear", [q8, s8, z8], attributes={"axis": 1}, name=f"{w.name}_DequantizeLinear")
        dq.outputs[0].name = f"{w.name}_DequantizeLinear_Output"
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        if not w.uses():
            graph.initializers.pop(w.name)
    return len(nodes)


__all__ = ["int8_scale", "int8_weight", "linear_nodes", "lm_head_node", "merge_shared_input_linears",
           "quantize_graph", "quantize_graph_int8_qdq", "save_beside"]
