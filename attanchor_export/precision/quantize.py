"""fp16 / int8 / int4 artifacts: rewrite the fp32 graphs of a staging folder in place, gate them.

The exporter writes fp32 graphs, then calls `quantize_artifact(folder, manifest_data, ...)`; this module
rewrites decoder.onnx (and vision.onnx when asked), writes the TensorRT form beside it where that differs
(decoder.trt.onnx), runs the accuracy gate against the fp32 graphs and returns the manifest's precision
section. docs/QUANTIZATION.md explains every choice; the short version:

- fp16 (`dtype="fp16"`): onnxruntime.transformers.float16.convert_float_to_float16 with keep_io_types
  (graph inputs/outputs stay float32) and a node block list found by pattern: normalisations (LayerNorm
  ops and decomposed RMSNorm/LayerNorm: Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul chains), Softmax, the RoPE
  angle path (everything feeding Cos/Sin that is not activation-dependent) and the lm_head MatMul stay
  fp32. Two fix-ups run after the converter: duplicate Cast nodes it emits for a node reading one tensor
  twice are merged, and fp32 -> fp16 -> fp32 Cast round trips between consecutive fp32 nodes are removed
  (the converter casts every blocked node's output to fp16 and back, which would overflow x**2 in RMSNorm,
  the very thing the block list is for).
- int4 (`quant="int4"`): weight-only, blockwise, with onnxruntime.quantization.MatMulNBitsQuantizer, on the
  decoder's linear MatMuls (lm_head and vision optional). Two forms:
    "MatMulNBits" (com.microsoft, asymmetric uint4 + zero points, any block size 16..): decoder.onnx, read
        by onnxruntime CPU/CUDA, where MatMulNBits is the native fused int4 GEMM/GEMV kernel.
    "QDQ" (opset 21 blocked DequantizeLinear of symmetric INT4 weights + MatMul): decoder.trt.onnx, what
        TensorRT reads for weight-only INT4 (signed INT4, zero points must be 0, block size 64 or 128).
  Both are written by default (`forms`); precision["backends"] says which file each backend opens.
- int8 (`quant="int8"`): the onnxruntime form is weight-only MatMulNBits with bits=8 (blockwise,
  asymmetric); the TensorRT form is QDQ int8 from quantize_static: per-channel symmetric weights and
  per-tensor symmetric activations calibrated over real decoder inputs (images + prompts through the
  artifact's vision and embedding graphs, `calib`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from attanchor_export.errors import ExportError
from attanchor_export.precision.calibration import (
    ArtifactFrontEnd,
    DecoderCalibrationReader,
    VisionCalibrationReader,
    _as_reader,
    gate_samples,
    load_calibration_set,
)
from attanchor_export.precision.gate import (
    GATE_FLOORS,
    TARGET_COS,
    TASK_FLOORS,
    TASK_GATE_QUESTIONS,
    AccuracyGateFailed,
    compute_reference,
    evaluate,
    floors_for,
    judge,
)

DTYPES = ("fp32", "fp16")
QUANTS = ("none", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)
FORMS = ("MatMulNBits", "QDQ")
TRT_INT4_BLOCK_SIZES = (128, 64)  # TensorRT INT4 block quantization accepts these only
QDQ_INT4_OPSET = 21  # INT4 tensors and DequantizeLinear's block_size attribute are opset 21
IR_VERSION = 10  # as the exporter writes (ARTIFACT_IR_VERSION): onnxruntime >= 1.18 and TensorRT 10 load it
TRT_SUFFIX = ".trt.onnx"
# MatMulNBits accuracy_level when the caller leaves it to us: 4 (int8 compute on CPU) for int4, measured
# at TinyLLaVA-1B dimensions on 2 threads as 3.7x the fp32 decode speed vs 1.8x with the fp32-compute
# default, with no measurable change in the gate (int4 cos mean 0.790-0.812 vs 0.790-0.813); int8 keeps
# the default (its gate drops from 0.998 to 0.996 at level 4 and its speed was not measured). CUDA ignores it.
DEFAULT_ACCURACY_LEVEL = {"int4": 4, "int8": 0}

NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
            "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNormalization",
            "InstanceNormalization", "BatchNormalization")
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
_SHAPE_OPS = ("Shape", "Size")
_PASS_THROUGH = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Slice", "Gather", "Flatten")


def _no_steps(name):
    return contextlib.nullcontext()


@contextlib.contextmanager
def _quiet_ort_quantization():
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


# ----------------------------------------------------------------------------------------- graph helpers


def _graph_maps(graph):
    producers = {out: n for n in graph.node for out in n.output if out}
    consumers = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            if name:
                consumers[name].append(n)
    return producers, consumers


def _constants(graph) -> dict[str, np.ndarray | None]:
    """Initializer and Constant-node outputs (value loaded lazily: None until asked)."""
    consts: dict[str, object] = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            consts[n.output[0]] = n
    return consts


def _const_value(consts, name):
    item = consts.get(name)
    if item is None:
        return None
    if isinstance(item, TensorProto):
        if item.data_location == TensorProto.EXTERNAL and not item.raw_data:
            return None
        return numpy_helper.to_array(item)
    for a in item.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
    return None


def _name_nodes(graph) -> None:
    used = {n.name for n in graph.node if n.name}
    for i, n in enumerate(graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


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


def logits_nodes(graph, output: str = "logits") -> list:
    """The lm_head MatMul/Gemm and any pass-through / bias nodes between it and the `logits` output."""
    producers, _ = _graph_maps(graph)
    if output not in {o.name for o in graph.output}:
        return []
    chain, name = [], output
    for _ in range(16):
        node = producers.get(name)
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
    producers, consumers = _graph_maps(graph)
    consts = _constants(graph)
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
        sq = producers.get(n.input[0])
        if sq is None:
            continue
        if sq.op_type == "Pow":
            exponent = _const_value(consts, sq.input[1])
            if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
                continue
            x = sq.input[0]
        elif sq.op_type == "Mul" and sq.input[0] == sq.input[1]:
            x = sq.input[0]
        else:
            continue
        chain, cur, found = [sq, n], n, None
        for _ in range(6):
            nexts = consumers.get(cur.output[0], [])
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
            nexts = consumers.get(tail.output[0], [])
            if len(nexts) == 1 and nexts[0].op_type == op and any(i in consts for i in nexts[0].input):
                tail = nexts[0]
                chain.append(tail)
            else:
                break
        px = producers.get(x)
        if px is not None and px.op_type == "Sub":
            mean = producers.get(px.input[1])
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
            p = producers.get(name)
            if p is None or p.op_type in _SHAPE_OPS or name in live:
                continue
            stack.append(p)

    if output_logits:
        keep["logits"].update(n.name for n in logits_nodes(graph, output_logits))
    return keep


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


def _toposort(graph) -> None:
    """Stable topological order (the fp16 converter appends its Cast nodes at the end)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(x in available for x in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(f"graph {graph.name!r} has a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


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
    producers = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in graph.output}
    rename = {}
    for n in nodes:
        if n.op_type != "Cast" or _cast_to(n) != TensorProto.FLOAT:
            continue
        p = producers.get(n.input[0])
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
    _toposort(graph)


def convert_fp16(model, output_logits: str | None = "logits") -> tuple[onnx.ModelProto, dict]:
    """fp16 graph with fp32 islands (see fp32_islands) and float32 inputs/outputs. Returns (model, counts)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    _name_nodes(model.graph)
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


def _complete_value_info(model) -> None:
    """Types for tensors that have none (nodes added by graph rewrites such as optimize.py): the
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


def _normalize_linears(graph) -> None:
    """Make every constant-weight linear a MatMul(x, W[K, N]) the quantizer recognises:
    MatMul(x, Transpose(W)) with a constant W gets the transposed weight folded in, and Gemm(x, W, b)
    with a constant W becomes MatMul (+ Add for the bias). The dynamo exporter mostly emits the plain
    form already; these cover older exporters and hand-written graphs."""
    producers, consumers = _graph_maps(graph)
    inits = {i.name: i for i in graph.initializer}
    new_nodes = []
    for n in graph.node:
        if n.op_type == "MatMul":
            t = producers.get(n.input[1])
            if t is not None and t.op_type == "Transpose" and t.input[0] in inits \
                    and len(inits[t.input[0]].dims) == 2 and len(consumers[t.output[0]]) == 1:
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


def linear_matmuls(graph, include_lm_head: bool, output_logits: str | None = "logits") -> tuple[list[str], str | None]:
    """Names of the MatMuls with a constant 2-D weight (the model's linear layers), and the lm_head's."""
    inits = {i.name: i for i in graph.initializer}
    head = next((n.name for n in logits_nodes(graph, output_logits) if n.op_type == "MatMul"), None) \
        if output_logits else None
    names = []
    for n in graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2:
            continue
        w = inits.get(n.input[1])
        if w is None or len(w.dims) != 2 or w.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        if n.name == head and not include_lm_head:
            continue
        names.append(n.name)
    return names, head


def _k_dims(graph, names) -> list[int]:
    inits = {i.name: i for i in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    return [int(inits[by_name[x].input[1]].dims[0]) for x in names]


def quantize_weights_nbits(model, names: list[str], bits: int, block_size: int, symmetric: bool,
                           qdq: bool, accuracy_level: int | None = None) -> onnx.ModelProto:
    """MatMulNBitsQuantizer on exactly `names` (other MatMuls excluded)."""
    from onnxruntime.quantization import QuantFormat

    with _quiet_ort_quantization():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        targets = set(names)
        exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in targets]
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
            nodes_to_exclude=exclude, quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    return quantizer.model.model


def count_quantized(model) -> dict[str, int]:
    """Quantized linear layers in a graph, by kind."""
    graph = model.graph
    producers, _ = _graph_maps(graph)
    counts = {"MatMulNBits": 0, "QDQ_int4": 0, "QDQ_int8": 0}
    inits = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            counts["MatMulNBits"] += 1
        elif n.op_type == "MatMul" and len(n.input) > 1:
            dq = producers.get(n.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            dtype = inits[dq.input[0]].data_type
            if dtype in (TensorProto.INT4, TensorProto.UINT4):
                counts["QDQ_int4"] += 1
            elif dtype in (TensorProto.INT8, TensorProto.UINT8):
                counts["QDQ_int8"] += 1
    return counts


def _opsets(model) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}


def save_model(model, path: Path) -> None:
    """Write `model` to `path` + `path.data` (external data), replacing both, IR pinned, checked."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    onnx.checker.check_model(str(path))


def remove_model(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def trt_name(file: str) -> str:
    return file[: -len(".onnx")] + TRT_SUFFIX if file.endswith(".onnx") else file + TRT_SUFFIX


def _trt_int4_block(block_size: int, ks: list[int]) -> int | None:
    """TensorRT's INT4 block size for these K dims: the requested one if TensorRT takes it and it divides
    every K, else the other of {128, 64} that does; None when neither fits."""
    for b in (block_size, *TRT_INT4_BLOCK_SIZES):
        if b in TRT_INT4_BLOCK_SIZES and all(k % b == 0 for k in ks):
            return b
    return None


def _int8_static_qdq(src: Path, dst: Path, names: list[str], reader, method: str) -> onnx.ModelProto:
    """quantize_static, QDQ, for TensorRT: int8 symmetric per-channel weights, int8 symmetric per-tensor
    activations on the inputs of `names` only (no Q/DQ on MatMul outputs, attention untouched)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet_ort_quantization(), tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_static(
            str(src), str(out), _as_reader(reader), quant_format=QuantFormat.QDQ,
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


# ------------------------------------------------------------------------------------------ entry point


def _check_options(dtype, quant, block_size, forms):
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quant not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    if quant != "none" and block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {block_size} is not supported: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if dtype == "fp16" and quant == "int8":
        raise ExportError(
            "--dtype fp16 with --quant int8 is not supported: use --quant int8 (fp32 activations, int8 weights "
            "for onnxruntime, calibrated int8 QDQ for TensorRT) or --dtype fp16 --quant int4"
        )
    forms = tuple(forms)
    if not forms or any(f not in FORMS for f in forms):
        raise ExportError(f"forms must be a non-empty subset of {', '.join(FORMS)}, got {forms!r}")
    return forms


def quantize_artifact(
    folder: Path,
    manifest_data: dict,
    dtype: str = "fp32",
    quant: str = "none",
    block_size: int = 128,
    calib: str | None = None,
    quantize_lm_head: bool = False,
    quantize_vision: bool = False,
    steps=_no_steps,
    *,
    forms: tuple[str, ...] = FORMS,
    gate: bool = True,
    floors: dict | None = None,
    gate_tokens: int = 32,
    calibrate_method: str = "MinMax",
    accuracy_level: int | None = None,
    task: str | None = None,
) -> dict:
    """Rewrite the fp32 graphs in `folder` to `dtype`/`quant` in place and gate them against fp32.

    Call after the fp32 graphs, embed table and tokenizer files are in `folder` (without tokenizer.json
    the gate and calibration fall back to synthetic prompt ids). `manifest_data` is the manifest dict
    being built (dims, graphs, anchor, embed_table, image_preprocessing, text); it is not modified.

    Returns {"precision": {...}}, the manifest updates: dtype, quant, block_size, per-file records
    ("graphs": format, bits, block size, symmetric, opsets, quantized node count, bytes, TensorRT
    compatibility), "backends" (which file each backend opens), calibration and "gate" (floors, target,
    per-form metrics, passed). Raises AccuracyGateFailed (results and precision attached) when a form is
    below its floor, ExportError on bad options. fp32/none returns the plain precision section untouched.
    """
    folder = Path(folder)
    forms = _check_options(dtype, quant, block_size, forms)
    if dtype == "fp32" and quant == "none":
        return {"precision": {"dtype": "fp32", "quant": "none"}}
    graphs = manifest_data["graphs"]
    files = {g: graphs[g]["file"] for g in ("vision", "embedding", "decoder")}
    fmt = quant if quant != "none" else dtype
    level = accuracy_level if accuracy_level is not None else DEFAULT_ACCURACY_LEVEL.get(quant, 0)
    precision: dict = {"dtype": dtype, "quant": quant}
    if quant != "none":
        precision.update(block_size=block_size, lm_head_quantized=bool(quantize_lm_head),
                         vision_quantized=bool(quantize_vision), forms=list(forms))

    reference = None
    with steps("fp32 reference for the accuracy gate"):
        from attanchor_runtime.sessions import ort_session

        front = ArtifactFrontEnd(folder, manifest_data)
        if gate:
            decoder32 = ort_session(folder / files["decoder"])
            reference = compute_reference(front, decoder32, gate_samples(), new_tokens=gate_tokens)
            del decoder32
            if task:
                reference.task = fp32_task_answers(folder, manifest_data, files, task)
    dec_reader = vis_reader = None
    if quant == "int8" and "QDQ" in forms:
        with steps("calibration inputs (images + prompts through vision and embedding)"):
            samples = load_calibration_set(calib)
            dec_reader = DecoderCalibrationReader.from_samples(front, samples)
            if quantize_vision:
                vis_reader = VisionCalibrationReader.from_samples(front, samples)
            precision["calibration"] = {
                "source": str(calib) if calib else "builtin", "samples": len(samples), "method": calibrate_method,
                "prompts": front.encoder.source,
                "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel",
            }
    elif calib is not None:
        precision["calibration"] = {"source": str(calib), "used": False,
                                    "note": "weight-only formats need no calibration"}
    del front

    records: dict[str, dict] = {}
    backends = {b: dict(files) for b in ("ort", "trt")}
    changed = {"vision": False, "decoder": False}
    targets = ["decoder"] + (["vision"] if (dtype == "fp16" or quantize_vision) else [])
    for graph in targets:
        file = files[graph]
        path = folder / file
        logits = "logits" if graph == "decoder" else None
        base_record = {"graph": graph, "dtype": dtype}
        if dtype == "fp16":
            with steps(f"fp16 {file}"):
                model, kept = convert_fp16(onnx.load(str(path)), logits)
                save_model(model, path)
                base_record["fp16"] = {"converter": "onnxruntime.transformers.float16", "kept_fp32_nodes": kept}
                changed[graph] = True
                del model
        if quant == "none" or (graph == "vision" and not quantize_vision):
            records[file] = {**base_record, "format": "fp16", "backend": ["ort", "trt"],
                             "opset": _opsets(onnx.load(str(path), load_external_data=False)),
                             "bytes": graph_bytes(path)}
            continue
        bits = 4 if quant == "int4" else 8
        model = onnx.load(str(path))
        _name_nodes(model.graph)
        _normalize_linears(model.graph)
        names, head = linear_matmuls(model.graph, quantize_lm_head, logits)
        if not names:
            raise ExportError(f"{file}: found no MatMul with a constant weight to quantize")
        ks = _k_dims(model.graph, names)
        normalized = folder / f".{file}.normalized.onnx"
        save_model(model, normalized)
        del model
        try:
            trt_file = trt_name(file) if "MatMulNBits" in forms else file
            if "QDQ" in forms:
                with steps(f"{quant} QDQ {trt_file} (TensorRT)"):
                    record = {**base_record, "format": "QDQ", "bits": bits, "backend": ["trt"]}
                    if quant == "int4":
                        trt_block = _trt_int4_block(block_size, ks)
                        record.update(block_size=trt_block or block_size, symmetric=True,
                                      weights="INT4 blocked DequantizeLinear (axis 0)")
                        record["tensorrt_compatible"] = trt_block is not None
                        if trt_block is None:
                            record["note"] = f"K dims {sorted(set(ks))} are not multiples of 64: TensorRT INT4 needs blocks of 64 or 128"
                        elif trt_block != block_size:
                            record["note"] = f"TensorRT INT4 takes blocks of 64/128 dividing K: block {trt_block} used"
                        qmodel = quantize_weights_nbits(onnx.load(str(normalized)), names, 4, trt_block or block_size,
                                                        symmetric=True, qdq=True)
                    else:
                        reader = dec_reader if graph == "decoder" else vis_reader
                        qmodel = _int8_static_qdq(normalized, folder / trt_file, names, reader, calibrate_method)
                        record.update(symmetric=True, weights="int8 per-channel", activations="int8 per-tensor (calibrated)",
                                      tensorrt_compatible=True)
                    counts = count_quantized(qmodel)
                    record["quantized_nodes"] = counts["QDQ_int4" if quant == "int4" else "QDQ_int8"]
                    record["opset"] = _opsets(qmodel)
                    if "MatMulNBits" not in forms:
                        remove_model(path)
                        record["backend"] = ["ort", "trt"]
                    save_model(qmodel, folder / trt_file)
                    record["bytes"] = graph_bytes(folder / trt_file)
                    records[trt_file] = record
                    backends["trt"][graph] = trt_file
                    del qmodel
            if "MatMulNBits" in forms:
                with steps(f"{quant} MatMulNBits {file} (onnxruntime)"):
                    qmodel = quantize_weights_nbits(onnx.load(str(normalized)), names, bits, block_size,
                                                    symmetric=False, qdq=False, accuracy_level=level or None)
                    record = {**base_record, "format": "MatMulNBits", "bits": bits, "block_size": block_size,
                              "symmetric": False, "backend": ["ort"],
                              "quantized_nodes": count_quantized(qmodel)["MatMulNBits"], "opset": _opsets(qmodel),
                              "tensorrt_compatible": False}
                    record["accuracy_level"] = level
                    save_model(qmodel, path)
                    record["bytes"] = graph_bytes(path)
                    records[file] = record
                    if "QDQ" not in forms:
                        backends["trt"][graph] = None
                    del qmodel
        finally:
            remove_model(normalized)
        for rec in records.values():
            if rec["graph"] == graph and rec.get("format") != "fp16":
                rec["linear_layers"] = len(names)
                rec["lm_head"] = head if quantize_lm_head else None
                if rec["quantized_nodes"] != len(names):
                    raise ExportError(
                        f"{graph}: quantized {rec['quantized_nodes']} of {len(names)} linear layers; "
                        "the graph has a linear form the quantizer does not catch"
                    )
        changed[graph] = True

    precision["graphs"] = records
    precision["backends"] = backends
    # The shape attanchor_runtime.ort_backend reads (precision.decoder_files.ort) and trt_plan falls back to.
    precision["decoder_files"] = {b: files_["decoder"] for b, files_ in backends.items()}

    if not gate:
        precision["gate"] = {"format": fmt, "skipped": True, "passed": None}
    else:
        with steps(f"accuracy gate ({fmt})"):
            precision["gate"] = run_gate(folder, manifest_data, reference, fmt, backends, changed, floors)
        if not precision["gate"]["passed"]:
            failed = [r for r in precision["gate"]["results"] if not r["passed"]]
            first = failed[0]
            raise AccuracyGateFailed(
                f"{fmt} accuracy gate failed for {first['decoder']}"
                f"{' + ' + first['vision'] if first.get('vision_changed') else ''}: {'; '.join(first['failures'])}",
                results=precision["gate"]["results"], precision=precision,
            )
    return {"precision": precision}


def run_gate(folder: Path, manifest_data: dict, reference, fmt: str, backends: dict, changed: dict,
             floors: dict | None = None) -> dict:
    """Evaluate every distinct (decoder, vision) pair the backends open; JSON-ready results."""
    from attanchor_runtime.sessions import ort_session

    limits = floors_for(fmt, floors)
    results, done = [], set()
    for backend, files in backends.items():
        decoder, vision = files["decoder"], files["vision"]
        if decoder is None:
            continue
        key = (decoder, vision)
        if key in done:
            next(r for r in results if (r["decoder"], r["vision"]) == key)["backends"].append(backend)
            continue
        done.add(key)
        front = ArtifactFrontEnd(folder, manifest_data, vision_file=vision)
        metrics = evaluate(reference, ort_session(folder / decoder), front, vision_changed=changed["vision"])
        failures = judge(metrics, limits)
        if reference.task is not None:
            metrics["task"] = task_metrics(folder, manifest_data, files, reference.task, fmt)
            failures += metrics["task"]["failures"]
        results.append({"backends": [backend], "decoder": decoder, "vision": vision,
                        "vision_changed": changed["vision"], **metrics,
                        "passed": not failures, "failures": failures})
    return {
        "format": fmt,
        "floors": limits,
        "target_cos": TARGET_COS,
        "set": {"samples": len(reference.labels), "images": "synthetic (calibration.gate_samples)",
                "prompts": reference.prompt_source, "new_tokens": reference.new_tokens,
                "positions": results[0]["positions"] if results else 0},
        "task": None if reference.task is None else {
            "data": reference.task["task"], "questions": len(reference.task["items"]),
            "fp32_accuracy": reference.task["accuracy"], "max_drop": TASK_FLOORS[fmt],
        },
        "evaluated_on": "onnxruntime CPU (TensorRT forms are checked again after each engine build)",
        "passed": all(r["passed"] for r in results),
        "results": results,
    }


def _task_pipeline(folder: Path, manifest_data: dict, files: dict):
    """A runtime Pipeline over the staging folder that opens `files` (one precision form) on onnxruntime."""
    from attanchor_runtime import Pipeline
    from attanchor_runtime.manifest import Manifest
    from attanchor_runtime.ort_backend import OrtBackend

    precision = {**manifest_data.get("precision", {}), "backends": {"ort": dict(files)}}
    manifest = Manifest(Path(folder), {**manifest_data, "precision": precision})
    return Pipeline(manifest, OrtBackend(manifest))


def fp32_task_answers(folder: Path, manifest_data: dict, files: dict, task: str) -> dict:
    """The fp32 artifact's answers on the task's gate subset (before any graph is rewritten)."""
    from attanchor_export.checks.task_accuracy import evaluate_artifact, load_task

    items = load_task(task, limit=TASK_GATE_QUESTIONS)
    result = evaluate_artifact(_task_pipeline(folder, manifest_data, files), items)
    return {"task": task, "items": items, "accuracy": result["accuracy"], "by_kind": result["by_kind"],
            "answers": [r["answer"] for r in result["records"]]}


def task_metrics(folder: Path, manifest_data: dict, files: dict, fp32: dict, fmt: str) -> dict:
    """Task accuracy of one form vs fp32 on the same questions; failures if it lost more than the floor."""
    from attanchor_export.checks.task_accuracy import evaluate_artifact

    result = evaluate_artifact(_task_pipeline(folder, manifest_data, files), fp32["items"])
    floor = fp32["accuracy"] - TASK_FLOORS[fmt]
    same = sum(r["answer"] == a for r, a in zip(result["records"], fp32["answers"], strict=True))
    failures = []
    if not result["accuracy"] >= floor - 1e-9:
        failures.append(f"task accuracy {result['accuracy']:.4f} < fp32 {fp32['accuracy']:.4f} - {TASK_FLOORS[fmt]}")
    return {"task": fp32["task"], "questions": len(fp32["items"]), "accuracy": result["accuracy"],
            "fp32_accuracy": fp32["accuracy"], "max_drop": TASK_FLOORS[fmt], "by_kind": result["by_kind"],
            "fp32_by_kind": fp32["by_kind"], "same_answers": same / len(fp32["items"]), "failures": failures}


__all__ = [
    "BLOCK_SIZES", "DTYPES", "FORMS", "GATE_FLOORS", "QUANTS", "AccuracyGateFailed", "convert_fp16",
    "count_quantized", "fp32_islands", "linear_matmuls", "quantize_artifact",
    "quantize_weights_nbits", "save_model",
]
