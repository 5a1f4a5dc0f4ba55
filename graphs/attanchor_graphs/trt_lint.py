"""TensorRT compatibility lint for ONNX graphs: runs on a CPU, needs onnx + numpy only.

    report = lint_model("decoder.onnx", target="10.3")        # or "11.4", "latest", ...
    report.ok, report.errors, report.warnings, report.notes
    print(report.format_table()); json.dumps(report.to_json())

The report types (`Finding`, `LintReport`) live in :mod:`.trt_lint_report`. One ONNX model at a
time: which files of an artifact TensorRT gets is the exporter's business
(``attanchor_export.trt.lint``).

What is checked, for every node of the main graph, of If/Loop/Scan subgraphs and of model-local
functions (TensorRT >= 9 inlines those; their nodes are reported as "inlined function D::N"):

* the op against TensorRT's ONNX-parser operator table for the target (:mod:`.trt_ops`):
  listed as unsupported or absent from the table -> error; custom-domain ops that are not local
  functions (e.g. com.microsoft::MatMulNBits) -> error, TensorRT would need a plugin;
* the model's opset against the documented range (10.3: 9-20, 10.15 and 11.4: 9-24, 11.5: 9-25).
  One exception, a warning instead of an error: opset 21 on 10.3 when the graph holds blocked/INT4
  DequantizeLinear (weight-only int4 needs opset 21). TensorRT 10.x's DequantizeLinear importer
  infers the block from the scale's rank and reads INT4 weights since 10.0, and every other op
  revised at opset 21 only gained int4/uint4 types, except GroupNormalization (still an error);
* operands the parser needs at build time (Reduce* axes, CumSum axis, Squeeze/Unsqueeze axes
  and Pad axes on 10.3, OneHot depth, Dropout training_mode) and attribute restrictions
  (TopK sorted, Resize modes, ScatterND reduction, LayerNormalization/MaxPool extra outputs,
  LSTM layout, symmetric Q/DQ zero points, per-tensor scales on activation QuantizeLinear, Einsum ellipsis on 10.3, string Constants);
* data types: float64, int16, uint16/32/64, uint4, strings, complex, FP8 variants other than
  E4M3FN (and FP4 before 10.8) -> error; uint8 away from the graph IO -> warning; int64 -> a note
  (TensorRT >= 9 keeps INT64 natively, no cast to INT32, bindings are int64); an op fed a type its
  "Supported Types" column does not list (e.g. CumSum on int64) -> warning;
* data-dependent shapes: NonZero, NonMaxSuppression, Unique, Compress, and every shape operand
  (Reshape/Expand shape, Range bounds, Slice starts/ends, Tile repeats, TopK K, ...) whose value is
  computed from graph-input *values* rather than from shapes and constants. Those are errors
  unless the caller passes ``allow_data_dependent=True`` (the manifest notes
  ``data_dependent_shapes`` for the embedding graph without an anchor budget K), then notes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .onnx_utils import constant_value, is_constant
from .trt_lint_report import SEVERITIES, Finding, LintReport
from .trt_ops import ONNX_TO_TRT_TYPE, table

__all__ = ["Finding", "LintReport", "lint_model"]

_TAG = "attanchor-lint-function:"
_STANDARD_DOMAINS = ("", "ai.onnx")

# Value lattice for the data-dependence analysis.
_CONST, _SHAPE, _DATA = 0, 1, 2

# Inputs whose *values* decide an output's shape.
_SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "Range": (0, 1, 2), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,),
    "Tile": (1,), "Pad": (1, 3), "Upsample": (1,), "OneHot": (1,), "TopK": (1,), "Split": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "CenterCropPad": (1,), "BlackmanWindow": (0,),
    "HammingWindow": (0,), "HannWindow": (0,), "STFT": (1, 3),
    **{f"Reduce{k}": (1,) for k in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum",
                                    "SumSquare")},
}
_INHERENTLY_DATA_DEPENDENT = ("NonZero", "NonMaxSuppression", "Unique", "Compress")
_RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial")
_CONTROL_FLOW = ("If", "Loop", "Scan")
_REDUCE = tuple(f"Reduce{k}" for k in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum",
                                      "SumSquare"))
# Ops revised at opset 21 for more than the new int4/uint4 types.
_OPSET21_SEMANTIC = ("GroupNormalization",)

# Data types TensorRT cannot hold at all (anything not in the target's list and not DOUBLE).
_DTYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


def _const_inputs(target_key: str) -> dict[str, tuple[tuple[int, str, str], ...]]:
    """op -> ((input index, "initializer" | "constant", operand name), ...) for the target."""
    common = {
        **{op: ((1, "initializer", "axes"),) for op in _REDUCE},
        "Dropout": ((2, "initializer", "training_mode"),),
        "OneHot": ((1, "constant", "depth"),),
        "STFT": ((1, "initializer", "frame_step"), (2, "initializer", "window")),
    }
    if target_key == "10.3":
        return {
            **common,
            "CumSum": ((1, "initializer", "axis"),),
            "Squeeze": ((1, "initializer", "axes"),),
            "Unsqueeze": ((1, "initializer", "axes"),),
            "Pad": ((3, "initializer", "axes"),),
        }
    return {
        **common,
        "CumSum": ((1, "constant", "axis"),),
        "Squeeze": ((1, "constant", "axes"),),
        "Unsqueeze": ((1, "constant", "axes"),),
    }


# ----------------------------------------------------------------------------------------------
class _Linter:
    def __init__(self, model: onnx.ModelProto, target: str, allow_data_dependent: bool, name: str):
        self.tbl = table(target)
        self.target_key = self.tbl["trt_version"]
        self.target, self.name = target, name
        self.allow_dd = allow_data_dependent
        self.const_inputs = _const_inputs(self.target_key)
        self.raw: dict[tuple, Finding] = {}  # grouped findings, insertion ordered
        self.op_counts: Counter = Counter()
        self.data_dependent = False
        self.has_int4_dq = False
        self.ops_seen: set[str] = set()
        self.model = model

    # -- findings ------------------------------------------------------------------------------
    def add(self, severity, code, message, op=None, where="graph", node=None):
        key = (severity, code, op, where, message)
        finding = self.raw.get(key)
        if finding is None:
            finding = self.raw[key] = Finding(severity, code, message, op, where)
        if node:
            finding.nodes.append(node)

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> LintReport:
        model = self.model
        opsets = {(o.domain or ""): o.version for o in model.opset_import}
        opset = opsets.get("", opsets.get("ai.onnx"))
        functions = {(f.domain, f.name): f for f in model.functions}
        fnames = [f"{d}::{n}" for d, n in functions]
        for f in model.functions:
            calls = _count_calls(model.graph, f.domain, f.name)
            self.add("note", "local-function",
                     f"model-local function {f.domain}::{f.name} ({len(f.node)} nodes, {calls} call(s)) is "
                     "inlined by the TensorRT >= 9 parser; its nodes are checked below")
            fopset = {(o.domain or ""): o.version for o in f.opset_import}.get("")
            if fopset is not None and fopset != opset:
                self._check_opset(fopset, f"function {f.domain}::{f.name}")
        inlined = self._inline(model)
        self.dtypes = self._infer_dtypes(inlined)
        self.producers: dict[str, onnx.NodeProto] = {}
        self.initializers: dict[str, TensorProto] = {}
        self.used: set[str] = set()
        self._index(inlined.graph)
        self._walk(inlined.graph, "graph", {i.name: _DATA for i in inlined.graph.input}, opset, opsets)
        self._check_dtypes(inlined.graph)
        if opset is not None:
            self._check_opset(opset, "model")
        if model.ir_version > self.tbl["onnx_ir_max"]:
            self.add("warning", "ir-version",
                     f"IR version {model.ir_version} is newer than the ONNX library TensorRT {self.target_key} "
                     f"bundles reads (IR <= {self.tbl['onnx_ir_max']}); pin the IR version when exporting")
        order = {s: i for i, s in enumerate(SEVERITIES)}
        findings = sorted(self.raw.values(), key=lambda f: order[f.severity])
        return LintReport(
            name=self.name, target=self.target, trt_version=self.target_key, opset=opset,
            opset_range=(self.tbl["opset_min"], self.tbl["opset_max"]), ir_version=model.ir_version,
            local_functions=fnames, op_counts=dict(self.op_counts), findings=findings,
            allow_data_dependent=self.allow_dd, data_dependent=self.data_dependent,
        )

    def _inline(self, model):
        if not model.functions:
            return model
        tagged = onnx.ModelProto()
        tagged.CopyFrom(model)
        for f in tagged.functions:
            for n in f.node:
                n.doc_string = f"{_TAG}{f.domain}::{f.name}"
        try:
            from onnx import inliner

            return inliner.inline_local_functions(tagged)
        except Exception as e:  # noqa: BLE001 - onnx raises several types; the lint must not crash
            self.add("warning", "inline", f"could not inline local functions ({str(e).splitlines()[0][:120]}); "
                     "their bodies are checked without type information")
            return _manual_expand(tagged)

    def _infer_dtypes(self, model) -> dict[str, int]:
        dtypes: dict[str, int] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 - fall back to declared types
            inferred = model

        def collect(graph):
            for vi in [*graph.input, *graph.output, *graph.value_info]:
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    dtypes[vi.name] = vi.type.tensor_type.elem_type
            for init in graph.initializer:
                dtypes[init.name] = init.data_type
            for node in graph.node:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        collect(attr.g)
                    elif attr.type == onnx.AttributeProto.GRAPHS:
                        for g in attr.graphs:
                            collect(g)

        collect(inferred.graph)
        return dtypes

    def _index(self, graph):
        for init in graph.initializer:
            self.initializers[init.name] = init
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producers[out] = node
            self.used.update(i for i in node.input if i)
            for attr in node.attribute:
                for g in _subgraphs(attr):
                    self._index(g)
                    self.used.update(o.name for o in g.output)
        self.used.update(o.name for o in graph.output)

    # -- per node ------------------------------------------------------------------------------
    def _walk(self, graph, where_default, env, opset, opsets):
        for init in graph.initializer:
            env[init.name] = _CONST
        for vi in graph.input:
            env.setdefault(vi.name, _DATA)
        for node in graph.node:
            tag = node.doc_string[len(_TAG):] if node.doc_string.startswith(_TAG) else None
            where = f"inlined function {tag}" if tag else where_default
            domain = node.domain or ""
            self.op_counts[node.op_type if domain in _STANDARD_DOMAINS else f"{domain}::{node.op_type}"] += 1
            label = node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"
            if domain in _STANDARD_DOMAINS:
                self._check_op(node, label, where, opset)
            else:
                self.add("error", "custom-op",
                         f"custom op {domain}::{node.op_type} is not a model-local function and TensorRT has no "
                         "built-in importer for it (it would need a plugin)", f"{domain}::{node.op_type}", where, label)
            self._propagate(node, label, where, env)
            for attr in node.attribute:
                for g in _subgraphs(attr):
                    sub_where = f"subgraph '{attr.name}' of {node.op_type} '{label}'"
                    self._walk(g, sub_where, dict(env), opset, opsets)

    def _check_op(self, node, label, where, opset):
        op = node.op_type
        ops = self.tbl["ops"]
        self.ops_seen.add(op)
        if op not in ops:
            self.add("error", "unknown-op", f"{op} is not in TensorRT {self.target_key}'s ONNX operator list", op,
                     where, label)
            return
        types, restriction = ops[op]
        if types is None:
            self.add("error", "unsupported-op", f"TensorRT {self.target_key}'s ONNX parser does not support {op}", op,
                     where, label)
            return
        for index, level, operand in self.const_inputs.get(op, ()):
            if len(node.input) > index and node.input[index]:
                name = node.input[index]
                if level == "initializer" and not self._is_direct_constant(name):
                    self.add("error", "const-input",
                             f"{op} input '{operand}' must be an initializer or Constant on TensorRT {self.target_key} "
                             f"({restriction or 'build-time value'})", op, where, label)
                elif level == "constant" and self._class(name) != _CONST:
                    self.add("error", "const-input",
                             f"{op} input '{operand}' must be a build-time constant on TensorRT {self.target_key}",
                             op, where, label)
        self._check_restrictions(node, op, label, where)
        self._check_types(node, op, types, restriction, label, where)

    def _check_restrictions(self, node, op, label, where):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bad = None
        if op == "TopK":
            if attrs.get("sorted", 1) != 1:
                bad = "TopK needs sorted=1"
            k = self._value(node.input[1]) if len(node.input) > 1 else None
            if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= 3840:
                bad = "TopK's K must be < 3840"
        elif op == "Resize":
            if _s(attrs.get("mode", "nearest")) not in ("nearest", "linear"):
                bad = f"Resize mode {_s(attrs.get('mode'))!r} is unsupported (nearest, linear only)"
            elif attrs.get("antialias", 0):
                bad = "Resize antialias is unsupported"
            elif _s(attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
                bad = "Resize keep_aspect_ratio_policy must be stretch"
        elif op == "ScatterND" and _s(attrs.get("reduction", "none")) != "none":
            bad = "ScatterND reduction is unsupported"
        elif op in ("LayerNormalization", "MaxPool") and any(o and o in self.used for o in node.output[1:]):
            bad = f"{op}: only the first output is supported"
        elif op == "LSTM" and (attrs.get("input_forget", 0) or attrs.get("layout", 0)):
            bad = "LSTM input_forget and layout must be 0"
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            if len(node.input) > 2 and node.input[2]:
                zp = self._value(node.input[2])
                if zp is not None and np.any(zp.astype(np.float64) != 0):
                    bad = f"{op}: TensorRT quantization is symmetric only (zero point must be 0)"
            scale = self._value(node.input[1]) if len(node.input) > 1 else None
            if op == "QuantizeLinear" and not bad and scale is not None and scale.size > 1 \
                    and not self._is_direct_constant(node.input[0]):
                # Per-channel (or blocked) scales are for weights: an activation takes one scale
                bad = "QuantizeLinear of an activation: TensorRT takes a per-tensor (scalar) scale for activations"
            if op == "DequantizeLinear":
                dtype = self.dtypes.get(node.input[0])
                if dtype == TensorProto.INT4 or attrs.get("block_size", 0):
                    self.has_int4_dq = True
        elif op == "Einsum" and self.target_key == "10.3" and "..." in _s(attrs.get("equation", "")):
            bad = "Einsum ellipsis is unsupported before TensorRT 10.12"
        elif op == "Constant" and any(k in attrs for k in ("sparse_value", "value_string", "value_strings")):
            bad = "Constant with sparse_value or string values is unsupported"
        elif op == "Dropout" and len(node.input) > 2 and node.input[2]:
            value = self._value(node.input[2])
            if value is not None and bool(np.any(value)):
                bad = "Dropout training_mode must be False"
        if bad:
            self.add("error", "restriction", bad, op, where, label)

    def _check_types(self, node, op, types, restriction, label, where):
        if op == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            dtypes = [attr.t.data_type] if attr is not None else []
        elif op in ("Shape", "Size"):
            return  # reads the shape only
        else:
            index = 1 if op == "Where" else 0
            name = node.input[index] if len(node.input) > index else ""
            dtypes = [self.dtypes[name]] if name in self.dtypes else []
        if op in ("Cast", "CastLike"):
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                dtypes.append(to)
        for dtype in dtypes:
            trt_type = ONNX_TO_TRT_TYPE.get(_DTYPE_NAMES.get(dtype, ""))
            if trt_type and trt_type not in types:
                self.add("warning", "type-support",
                         f"{op} on {trt_type}: TensorRT {self.target_key} lists {', '.join(types)}"
                         + (f" ({restriction})" if restriction else ""), op, where, label)

    # -- data dependence -------------------------------------------------------------------------
    def _class(self, name):
        return self._env.get(name, _DATA)

    def _propagate(self, node, label, where, env):
        self._env = env
        op = node.op_type
        inputs = [i for i in node.input if i]
        if op == "Constant":
            cls = _CONST
        elif op in ("Shape", "Size"):
            cls = _SHAPE
        elif op in _RANDOM or op in _CONTROL_FLOW or (node.domain or "") not in _STANDARD_DOMAINS:
            cls = _DATA
        else:
            cls = max((env.get(i, _DATA) for i in inputs), default=_CONST)
        origin = None
        if op in _INHERENTLY_DATA_DEPENDENT:
            origin = f"{op} has a data-dependent output shape"
        else:
            for index in _SHAPE_OPERANDS.get(op, ()):
                if len(node.input) > index and node.input[index] and env.get(node.input[index], _DATA) == _DATA:
                    origin = (f"{op}'s output shape depends on tensor values: its input {index} is computed from "
                              "graph-input data, not from shapes or constants")
                    break
        if origin:
            self.data_dependent = True
            if self.allow_dd:
                self.add("note", "data-dependent-shape",
                         origin + " (allowed for this graph: data_dependent_shapes is noted in the manifest; it runs "
                         "on onnxruntime, or on TensorRT only with an output allocator)", op, where, label)
            else:
                self.add("error", "data-dependent-shape",
                         origin + " (TensorRT profiles need shapes computable from input shapes)", op, where, label)
        for out in node.output:
            if out:
                env[out] = cls

    # -- helpers -------------------------------------------------------------------------------
    def _is_direct_constant(self, name) -> bool:
        return is_constant(name, self.initializers, self.producers)

    def _value(self, name):
        """The numpy value of an initializer / Constant output when it is stored inline, else None."""
        return constant_value(name, self.initializers, self.producers)

    def _check_dtypes(self, graph):
        io_names = {v.name for v in [*graph.input, *graph.output]}
        allowed = set(self.tbl["dtypes"])
        found: dict[str, list[str]] = {}
        for name, dtype in self.dtypes.items():
            found.setdefault(_DTYPE_NAMES.get(dtype, str(dtype)), []).append(name)
        for node in _all_nodes(graph):
            label = node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"
            for a in node.attribute:
                if node.op_type in ("Cast", "CastLike") and a.name == "to":
                    found.setdefault(_DTYPE_NAMES.get(a.i, str(a.i)), []).append(f"{label} (Cast to)")
                elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    found.setdefault(_DTYPE_NAMES.get(a.t.data_type, ""), []).append(f"{label} (value)")
        for dtype, names in found.items():
            names = sorted(set(names))
            if dtype == "DOUBLE":
                self._add_many("error", "dtype", "float64 tensors: TensorRT has no FP64 (the parser clamps DOUBLE to "
                               "FP32 at best); export in float32", names)
            elif dtype == "UINT8":
                inner = [n for n in names if n not in io_names]
                if inner:
                    self._add_many("warning", "dtype", "uint8 tensors away from the graph IO: TensorRT supports UINT8 "
                                   "only as a network input or output", inner)
            elif dtype == "INT64":
                self._add_many("note", "int64", f"{len(names)} int64 tensors: TensorRT >= 9 keeps INT64 natively (no "
                               "cast to INT32; bind int64 buffers); ops without INT64 kernels are flagged as "
                               "type-support warnings", names)
            elif dtype and dtype not in allowed and dtype != "UNDEFINED":
                self._add_many("error", "dtype", f"{dtype.lower()} tensors: TensorRT {self.target_key} has no "
                               f"{dtype} type", names)

    def _add_many(self, severity, code, message, names):
        for n in names:
            self.add(severity, code, message, None, "graph", n)

    def _check_opset(self, opset: int, what: str):
        lo, hi = self.tbl["opset_min"], self.tbl["opset_max"]
        if lo <= opset <= hi:
            return
        if opset < lo:
            self.add("error", "opset", f"{what} opset {opset} is older than TensorRT {self.target_key} "
                     f"documents ({lo}-{hi}): re-export with opset {max(lo, 17)}")
            return
        semantic = [op for op in _OPSET21_SEMANTIC if op in self.ops_seen]
        if self.target_key == "10.3" and opset == 21 and self.has_int4_dq and not semantic:
            self.add("warning", "opset",
                     f"{what} opset 21 is outside TensorRT 10.3's documented {lo}-{hi}; it is needed for blocked INT4 "
                     "DequantizeLinear, which 10.x imports (block inferred from the scale shape, INT4 weights since "
                     "10.0), and the other opset-21 revisions only add int4/uint4 types: the build gate verifies it")
            return
        self.add("error", "opset", f"{what} opset {opset} is newer than TensorRT {self.target_key} documents "
                 f"({lo}-{hi}): re-export with opset <= {hi} or target a newer TensorRT")


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _subgraphs(attr):
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in _subgraphs(attr):
                yield from _all_nodes(g)


def _count_calls(graph, domain, name) -> int:
    return sum(1 for n in _all_nodes(graph) if n.domain == domain and n.op_type == name)


def _manual_expand(model):
    """Fallback when onnx.inliner fails: append every function body to the graph (order kept) so
    the op checks still see the body nodes. Values are not renamed, so types are not inferred."""
    expanded = onnx.ModelProto()
    expanded.CopyFrom(model)
    for f in model.functions:
        expanded.graph.node.extend(f.node)
    del expanded.functions[:]
    return expanded


def _load(model_or_path) -> tuple[onnx.ModelProto, str]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "model"
    path = Path(model_or_path)
    return onnx.load(str(path), load_external_data=False), path.name


def lint_model(model_or_path, target: str = "10.3", allow_data_dependent: bool = False,
               name: str | None = None) -> LintReport:
    """Lint one ONNX model (a ModelProto or a path; external data is not read) for a TensorRT target."""
    model, default_name = _load(model_or_path)
    return _Linter(model, target, allow_data_dependent, name or default_name).run()
