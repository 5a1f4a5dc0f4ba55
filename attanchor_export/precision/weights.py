"""Weight quantization of linear layers: which MatMuls are linears, and the three quantized forms.

- MatMulNBits (com.microsoft; precision.streamed_weights, `qdq=False`): weight-only, blockwise,
  asymmetric 4 or 8 bits with zero points, any block size; onnxruntime's native fused GEMM/GEMV kernel.
- QDQ INT4 (precision.streamed_weights, `qdq=True, symmetric=True`): opset 21 blocked DequantizeLinear of
  signed INT4 weights + MatMul, what TensorRT reads for weight-only INT4 (zero points 0, blocks of 64
  or 128: `trt_int4_block`).
- QDQ INT8: per-channel symmetric weights and per-tensor symmetric activations calibrated over real
  decoder (or vision) inputs (the readers of precision.calibration), run by precision.quantize on the
  graph precision.smoothing has smoothed (the decoder's; not the vision's). MinMax calibration, the
  default, is written streamed (precision.quantize.write_int8_qdq, quantize_static's numbers);
  `int8_static_qdq` (quantize_static itself) serves the histogram methods, which hold every calibrated
  activation in memory anyway (scripts/measure_int8.py).
- MatMulInteger INT8 (`int8_dynamic`): quantize_dynamic, per-channel int8 weights, activations quantized
  per call at run time (DynamicQuantizeLinear); the int8 vision tower's onnxruntime form, which onnxruntime
  fuses into DynamicQuantizeMatMul (scripts/measure_vision_int8.py: faster on the CPU than the QDQ form,
  which it runs no faster than fp32).

Before any of them, `normalize_linears` brings every constant-weight linear to MatMul(x, W[K, N]) and
precision.streamed_weights.linear_nodes finds them; `count_quantized` counts what a quantized graph holds.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import onnx
from attanchor_graphs.onnx_utils import consumers, initializers, producers
from onnx import TensorProto, numpy_helper

from attanchor_export.precision.graph_files import save_model

TRT_INT4_BLOCK_SIZES = (128, 64)  # TensorRT INT4 block quantization accepts these only
# MatMulNBits accuracy_level when the caller leaves it to us: 4 (activations quantized to int8 per block,
# int8 dot products on CPU) for both. int4: 3.7x the fp32 decode speed at TinyLLaVA-1B dims on 2 threads
# vs 1.8x at level 0, no measurable change in the gate (cos mean 0.790-0.812 vs 0.790-0.813). int8: at
# level 0 onnxruntime 1.32's 8-bit CPU kernel reads 0.3-0.5 GB/s, 30x slower than the fp32 graph it
# replaces; at level 4 it reads 45 GB/s, 4x faster than fp32 (8 Llama-1B layers of linears, M=1, 2
# threads), for a gate cos of 0.996 instead of 0.998 on the test models. CUDA ignores the attribute.
DEFAULT_ACCURACY_LEVEL = {"int4": 4, "int8": 4}


@contextlib.contextmanager
def quiet_ort_quantization():
    """onnxruntime.quantization logs one INFO line per node, and matmul_nbits_quantizer calls
    logging.basicConfig(level=INFO) at import (configuring the root logger). Import it here, undo the
    root-logger change, and silence the package while it works."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    pkg = logging.getLogger("onnxruntime.quantization")
    # quantize_static also warns through the root logger ("consider pre-processing"): we skip
    # quant_pre_process on purpose, it fuses ops into com.microsoft kernels TensorRT cannot read.
    loggers = [root, pkg, logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def normalize_linears(graph) -> None:
    """Make every constant-weight linear a MatMul(x, W[K, N]) the quantizer recognises:
    MatMul(x, Transpose(W)) with a constant W gets the transposed weight folded in, and Gemm(x, W, b)
    with a constant W becomes MatMul (+ Add for the bias). The dynamo exporter mostly emits the plain
    form already; these cover older exporters and hand-written graphs."""
    producer, readers, inits = producers(graph), consumers(graph), initializers(graph)
    new_nodes = []
    for n in graph.node:
        if n.op_type == "MatMul":
            t = producer.get(n.input[1])
            if t is not None and t.op_type == "Transpose" and t.input[0] in inits \
                    and len(inits[t.input[0]].dims) == 2 and len(readers[t.output[0]]) == 1:
                w = numpy_helper.to_array(inits[t.input[0]]).T.copy()
                name = t.input[0] + "_T"
                graph.initializer.append(numpy_helper.from_array(w, name))
                inits[name] = graph.initializer[-1]
                n.input[1] = name
        if n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in inits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0):
                w = numpy_helper.to_array(inits[n.input[1]])
                if attrs.get("transB", 0):
                    w = w.T.copy()
                name = n.input[1] + ("_T" if attrs.get("transB", 0) else "_mm")
                graph.initializer.append(numpy_helper.from_array(w, name))
                inits[name] = graph.initializer[-1]
                has_bias = len(n.input) > 2 and n.input[2]
                mm_out = n.output[0] + "_mm" if has_bias else n.output[0]
                new_nodes.append(onnx.helper.make_node("MatMul", [n.input[0], name], [mm_out], name=n.name))
                if has_bias:
                    new_nodes.append(onnx.helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]],
                                                           name=n.name + "_bias"))
                continue
        new_nodes.append(n)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {x for n in graph.node for x in n.input}
    dead = [i for i in graph.initializer if i.name not in used]
    for i in dead:
        graph.initializer.remove(i)


def count_quantized(model) -> dict[str, int]:
    """Quantized linear layers in a graph, by kind."""
    graph = model.graph
    producer, inits = producers(graph), initializers(graph)
    counts = {"MatMulNBits": 0, "QDQ_int4": 0, "QDQ_int8": 0, "MatMulInteger": 0}
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            counts["MatMulNBits"] += 1
        elif n.op_type == "MatMulInteger" and len(n.input) > 1 and n.input[1] in inits:
            counts["MatMulInteger"] += 1
        elif n.op_type == "MatMul" and len(n.input) > 1:
            dq = producer.get(n.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            dtype = inits[dq.input[0]].data_type
            if dtype in (TensorProto.INT4, TensorProto.UINT4):
                counts["QDQ_int4"] += 1
            elif dtype in (TensorProto.INT8, TensorProto.UINT8):
                counts["QDQ_int8"] += 1
    return counts


def trt_int4_block(block_size: int, ks: list[int]) -> int | None:
    """TensorRT's INT4 block size for these K dims: the requested one if TensorRT takes it and it divides
    every K, else the other of {128, 64} that does; None when neither fits."""
    for b in (block_size, *TRT_INT4_BLOCK_SIZES):
        if b in TRT_INT4_BLOCK_SIZES and all(k % b == 0 for k in ks):
            return b
    return None


def int8_static_qdq(src: Path, dst: Path, names: list[str], reader, method: str) -> onnx.ModelProto:
    """quantize_static, QDQ, for TensorRT: int8 symmetric per-channel weights, int8 symmetric per-tensor
    activations on the inputs of `names` only (no Q/DQ on MatMul outputs, attention untouched)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with quiet_ort_quantization(), tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_static(
            str(src), str(out), _ort_reader(reader), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=names, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={
                "ActivationSymmetric": True,  # TensorRT: zero points must be 0
                "WeightSymmetric": True,
                "MatMulConstBOnly": True,
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
                # Not CalibMaxIntermediateOutputs: onnxruntime 1.31 drops the collected batches instead of
                # folding them into the ranges. Memory is ~ samples x sum of the linear inputs' sizes.
            },
        )
        return onnx.load(str(out))


def int8_dynamic(src: Path, dst: Path, names: list[str]) -> onnx.ModelProto:
    """quantize_dynamic, for onnxruntime: int8 per-channel weights of `names`, their input activations
    quantized per call (uint8, the range of that call: nothing to calibrate). Written to `dst` (+ .data);
    returns it without its weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_ort_quantization(), tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul"], nodes_to_quantize=names,
                         per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        model = onnx.load(str(out))
    save_model(model, dst)
    return onnx.load(str(dst), load_external_data=False)


def _ort_reader(reader):
    """One of precision.calibration's readers as a real onnxruntime CalibrationDataReader subclass."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def rewind(self):
            reader.rewind()

    return Reader()


__all__ = [
    "DEFAULT_ACCURACY_LEVEL", "TRT_INT4_BLOCK_SIZES", "count_quantized", "int8_dynamic", "int8_static_qdq",
    "normalize_linears",
    "quiet_ort_quantization", "trt_int4_block",
]
