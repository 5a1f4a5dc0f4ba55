"""TensorRT compatibility lint: exported graphs pass, crafted graphs are flagged. CPU only (onnx + numpy)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from attanchor_graphs.trt_lint import lint_model
from attanchor_graphs.trt_ops import TABLES, table
from attanchor_runtime.manifest import write_manifest
from helpers import tiny_manifest
from onnx import TensorProto, helper, numpy_helper

from attanchor_export.errors import ExportError
from attanchor_export.trt.lint import lint_artifact

TARGETS = ("10.3", "10.x-latest", "11.4", "latest")
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def model(nodes, inputs, outputs, opset=17, initializers=(), functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    m = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    m.ir_version = 10
    return m


def vi(name, dtype=F, shape=("n",)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def codes(report, severity=None):
    return {f.code for f in report.findings if severity is None or f.severity == severity}


# ---- exported artifacts -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["clip-t2i", "siglip-t2i-k4"])
def test_exported_artifacts_pass(artifact, name, target):
    report = lint_artifact(artifact(name), target=target)
    assert report.ok, report.format_table()
    assert set(report) == {"vision", "embedding", "decoder"}
    for graph in ("vision", "decoder"):
        assert not report[graph].data_dependent
        assert "data-dependent-shape" not in codes(report[graph])
    emb = report["embedding"]
    assert emb.local_functions == ["ai.attanchor::AnchorInsert"]
    assert "local-function" in codes(emb, "note") and "AnchorInsert" in emb.format_table()
    if name == "clip-t2i":  # no budget: data-dependent length, noted in the manifest -> notes only
        assert emb.data_dependent and emb.allow_data_dependent
        dd = [f for f in emb.findings if f.code == "data-dependent-shape"]
        assert dd and {f.severity for f in dd} == {"note"}
        assert all(f.where == "inlined function ai.attanchor::AnchorInsert" for f in dd)
    else:  # budget K: static output length
        assert not emb.data_dependent
    json.dumps(report.to_json())
    assert report["decoder"].op_counts["MatMul"] > 0


def test_embedding_without_budget_is_an_error_unless_allowed(artifact):
    path = artifact("clip-t2i") / "embedding.onnx"
    strict = lint_model(path, "10.3")
    assert not strict.ok
    assert {f.op for f in strict.errors if f.code == "data-dependent-shape"} >= {"Range"}
    assert lint_model(path, "10.3", allow_data_dependent=True).ok


def test_lint_artifact_reads_the_trt_decoder_form(tmp_path):
    ok = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")])
    bad = model([helper.make_node("Unique", ["x"], ["y"])], [vi("x")], [vi("y")])
    for name in ("vision.onnx", "embedding.onnx", "decoder.onnx"):
        onnx.save(ok, tmp_path / name)
    onnx.save(bad, tmp_path / "decoder.trt.onnx")
    write_manifest(tiny_manifest(tmp_path, precision={"backends": {"trt": {"decoder": "decoder.trt.onnx"}}}))
    report = lint_artifact(tmp_path)
    assert report["decoder"].name == "decoder.trt.onnx" and not report.ok
    # No TensorRT form (MatMulNBits only): the onnxruntime file is linted, which shows why.
    write_manifest(tiny_manifest(tmp_path, precision={"backends": {"trt": {"decoder": None}}}))
    report = lint_artifact(tmp_path)
    assert report["decoder"].name == "decoder.onnx" and report.ok
    with pytest.raises(ExportError, match="unknown TensorRT target '9.0'"):
        lint_artifact(tmp_path, target="9.0")


# ---- crafted graphs -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_unsupported_op(target):
    report = lint_model(model([helper.make_node("Unique", ["x"], ["y"])], [vi("x")], [vi("y")]), target)
    assert not report.ok
    (error,) = [f for f in report.errors if f.code == "unsupported-op"]
    assert error.op == "Unique" and error.nodes == ["Unique->y"]


def test_op_newer_than_the_target():
    m = model([helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=-1)],
              [vi("x", shape=(2, 4)), vi("s", shape=(4,))], [vi("y", shape=(2, 4))], opset=23)
    old = lint_model(m, "10.3")
    assert {"unknown-op", "opset"} <= codes(old, "error")
    for target in ("10.x-latest", "11.4", "latest"):
        assert lint_model(m, target).ok


def test_custom_op_needs_a_plugin():
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=8, N=8, bits=4,
                            block_size=32)
    m = model([node], [vi("x"), vi("w", TensorProto.UINT8), vi("s")], [vi("y")],
              extra_opsets=[("com.microsoft", 1)])
    report = lint_model(m)
    assert "custom-op" in codes(report, "error") and "com.microsoft::MatMulNBits" in report.op_counts


def test_float64_is_an_error():
    m = model([helper.make_node("Add", ["x", "x"], ["y"])], [vi("x", TensorProto.DOUBLE)],
              [vi("y", TensorProto.DOUBLE)])
    report = lint_model(m)
    assert "dtype" in codes(report, "error")
    assert any("float64" in f.message and "x" in f.nodes for f in report.errors)
    cast = model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT16)], [vi("x")],
                 [vi("y", TensorProto.UINT16)])
    assert any("uint16" in f.message for f in lint_model(cast).errors)


@pytest.mark.parametrize(("target", "newest"), [("10.3", 20), ("10.15", 24), ("11.4", 24), ("11.5", 25)])
def test_opset_range(target, newest):
    def relu(opset):
        return model([helper.make_node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")], opset=opset)

    assert lint_model(relu(newest), target).ok
    assert lint_model(relu(9), target).ok
    too_new = lint_model(relu(newest + 1), target)
    assert "opset" in codes(too_new, "error") and f"(9-{newest})" in too_new.format_table()
    assert "opset" in codes(lint_model(relu(8), target), "error")


def int4_matmul(opset=21, zero_point=False):
    w = helper.make_tensor("w", TensorProto.INT4, [8, 4], np.ones(32, np.int8).tolist())
    scale = numpy_helper.from_array(np.full((2, 4), 0.1, np.float32), "scale")
    inputs = ["w", "scale"]
    inits = [w, scale]
    if zero_point:
        inits.append(helper.make_tensor("zp", TensorProto.INT4, [2, 4], [1] * 8))
        inputs.append("zp")
    nodes = [helper.make_node("DequantizeLinear", inputs, ["wf"], axis=0, block_size=4),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    return model(nodes, [vi("x", shape=(1, 8))], [vi("y", shape=(1, 4))], opset=opset, initializers=inits)


def test_int4_blocked_dequantize_needs_opset_21():
    onnx.checker.check_model(int4_matmul())
    jetson = lint_model(int4_matmul(), "10.3")
    assert jetson.ok, jetson.format_table()
    (warning,) = [f for f in jetson.warnings if f.code == "opset"]
    assert "blocked INT4 DequantizeLinear" in warning.message
    for target in ("10.x-latest", "11.4", "latest"):  # opset 21 is inside their documented range
        report = lint_model(int4_matmul(), target)
        assert report.ok and not report.warnings, report.format_table()
    assert not lint_model(int4_matmul(opset=22), "10.3").ok
    assert "restriction" in codes(lint_model(int4_matmul(zero_point=True), "10.x-latest"), "error")


@pytest.mark.parametrize("target", TARGETS)
def test_nonzero_is_data_dependent(target):
    m = model([helper.make_node("NonZero", ["x"], ["y"])], [vi("x")], [vi("y", I64, (1, "k"))])
    strict = lint_model(m, target)
    assert "data-dependent-shape" in codes(strict, "error")
    allowed = lint_model(m, target, allow_data_dependent=True)
    assert allowed.ok and "data-dependent-shape" in codes(allowed, "note")


def test_shape_operands_from_values_vs_from_shapes():
    from_values = model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                        [vi("x"), vi("shape", I64, (1,))], [vi("y")])
    assert "data-dependent-shape" in codes(lint_model(from_values), "error")
    from_shapes = model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                        [vi("x")], [vi("y")])
    assert lint_model(from_shapes).ok
    # A shape computed from a ReduceMax over data (the unbudgeted AnchorInsert pattern).
    reduce_len = model([
        helper.make_node("ReduceMax", ["lens"], ["n"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Range", ["zero", "n", "one"], ["y"]),
    ], [vi("lens", I64)], [vi("y", I64)])
    report = lint_model(reduce_len)
    assert {f.op for f in report.errors} == {"Range"}


def test_build_time_constant_operands():
    computed_axes = [
        helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Identity", ["a"], ["axes"]),
        helper.make_node("Unsqueeze", ["x", "axes"], ["y"]),
    ]
    m = model(computed_axes, [vi("x")], [vi("y", shape=(1, "n"))], opset=17)
    assert "const-input" in codes(lint_model(m, "10.3"), "error")  # 10.3: an initializer or Constant
    assert lint_model(m, "10.x-latest").ok  # 10.7+: resolvable to a constant
    from_input = model([helper.make_node("ReduceSum", ["x", "axes"], ["y"])], [vi("x"), vi("axes", I64, (1,))],
                       [vi("y")], opset=17)
    assert "const-input" in codes(lint_model(from_input, "10.x-latest"), "error")


def test_type_support_warning():
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    m = model([helper.make_node("CumSum", ["mask", "axis"], ["y"])], [vi("mask", I64, (1, "n"))],
              [vi("y", I64, (1, "n"))], initializers=[axis])
    report = lint_model(m)
    assert report.ok and "type-support" in codes(report, "warning")
    assert "CumSum on INT64" in report.format_table()


def test_restrictions():
    k = numpy_helper.from_array(np.array([4000], np.int64), "k")
    topk = model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [vi("x", shape=(1, 5000))],
                 [vi("v", shape=(1, 4000)), vi("i", I64, (1, 4000))], initializers=[k])
    assert any("3840" in f.message for f in lint_model(topk).errors)
    cubic = model([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")],
                  [vi("x", shape=(1, 1, 4, 4))], [vi("y", shape=(1, 1, 8, 8))],
                  initializers=[numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    assert "restriction" in codes(lint_model(cubic), "error")


def test_subgraphs_and_local_functions_are_checked():
    then = helper.make_graph([helper.make_node("NonZero", ["x"], ["t"])], "then", [], [vi("t", I64, (1, "k"))])
    other = helper.make_graph([helper.make_node("Shape", ["x"], ["e"]), helper.make_node("Unsqueeze", ["e", "z"],
                                                                                        ["e2"])],
                              "else", [], [vi("e2", I64, (1, "k"))])
    m = model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
              [vi("c", TensorProto.BOOL, ()), vi("x")], [vi("y", I64, (1, "k"))],
              initializers=[numpy_helper.from_array(np.array([0], np.int64), "z")])
    report = lint_model(m)
    (dd,) = [f for f in report.errors if f.code == "data-dependent-shape"]
    assert dd.where.startswith("subgraph 'then_branch' of If")

    body = [helper.make_node("Unique", ["a"], ["b"])]
    fn = helper.make_function("custom", "F", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    m = model([helper.make_node("F", ["x"], ["y"], domain="custom")], [vi("x")], [vi("y")], functions=[fn],
              extra_opsets=[("custom", 1)])
    report = lint_model(m)
    assert report.local_functions == ["custom::F"]
    (error,) = [f for f in report.errors if f.code == "unsupported-op"]
    assert error.where == "inlined function custom::F"
    assert "local-function" in codes(report, "note")


def test_tables():
    assert table("10.x-latest") is TABLES["10.15"] and table("jetpack6") is TABLES["10.3"]
    # "latest" is the newest table the lint has, whatever its version.
    newest = max(TABLES, key=lambda k: tuple(int(x) for x in k.split(".")))
    assert table("latest") is TABLES[newest] is TABLES["11.5"] and table("11.x-latest") is TABLES["11.5"]
    # Full version strings (tensorrt.__version__) pick their major.minor table.
    assert table("10.3.0.30") is TABLES["10.3"] and table("11.4.1") is TABLES["11.4"]
    assert (TABLES["10.3"]["opset_min"], TABLES["10.3"]["opset_max"]) == (9, 20)
    assert (TABLES["10.15"]["opset_min"], TABLES["10.15"]["opset_max"]) == (9, 24)
    assert (TABLES["11.4"]["opset_max"], TABLES["11.5"]["opset_max"]) == (24, 25)
    for t in ("11.4", "11.5"):  # 11.x removed builder APIs, not importers: at least what 10.15 parses
        assert set(TABLES["10.15"]["ops"]) <= set(TABLES[t]["ops"])
        assert set(TABLES["10.15"]["dtypes"]) <= set(TABLES[t]["dtypes"])
    with pytest.raises(ValueError, match="unknown TensorRT target"):
        table("10.7")  # no table for it: refused rather than guessed
    for op in ("RMSNormalization", "RotaryEmbedding", "Attention", "TensorScatter"):
        assert op not in TABLES["10.3"]["ops"] and TABLES["10.15"]["ops"][op][0]
    assert TABLES["10.3"]["ops"]["NonZero"][0] and TABLES["10.3"]["ops"]["Unique"][0] is None
    with pytest.raises(ValueError, match="unknown TensorRT target"):
        table("8.6")
    # Every op AnchorInsert's body may use is supported by both targets.
    from attanchor_graphs.function import FUNCTION_OPS

    for t in TABLES.values():
        assert all(t["ops"][op][0] for op in FUNCTION_OPS)


def test_activation_quantize_needs_a_per_tensor_scale():
    """TensorRT quantizes activations per tensor; per-channel scales are for weights (constant inputs)."""

    def qdq(scale, x_is_weight):
        inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
                 numpy_helper.from_array(np.zeros(np.shape(scale), np.int8), "zp")]
        if x_is_weight:
            inits.append(numpy_helper.from_array(np.ones((2, 4), np.float32), "x"))
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=1),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1)]
        return model(nodes, [] if x_is_weight else [vi("x", shape=(2, 4))], [vi("y", shape=(2, 4))],
                     opset=18, initializers=inits)

    per_channel = [0.1, 0.2, 0.3, 0.4]
    assert lint_model(qdq(0.1, False)).ok and lint_model(qdq(per_channel, True)).ok
    report = lint_model(qdq(per_channel, False))
    assert not report.ok and any("per-tensor (scalar) scale for activations" in f.message for f in report.errors)
