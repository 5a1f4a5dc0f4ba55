"""fp16 / int8 / int4 artifacts on tiny checkpoints of both families: they run on onnxruntime CPU, their
quantized node counts match the model's linear layers, they pass their accuracy gates, and a broken
quantization or an impossible floor fails the gate with a one-line AccuracyGateFailed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from attanchor_runtime.manifest import Manifest, Precision
from helpers import read_manifest
from onnx import TensorProto, helper, numpy_helper

from attanchor_export.errors import ExportError
from attanchor_export.export_cost import graph_bytes
from attanchor_export.load.datasets import builtin_samples, gate_samples, load_calibration_set
from attanchor_export.load.tiny_random import RANDOM_CHECKPOINT_FLOORS as GATE_FLOORS
from attanchor_export.precision.calibration import DecoderCalibrationReader
from attanchor_export.precision.fp16 import convert_fp16, fp32_islands
from attanchor_export.precision.gate import AccuracyGateFailed, evaluate, fp32_baseline, gate_pipeline
from attanchor_export.precision.quantize import quantize_artifact as _quantize_artifact
from attanchor_export.precision.streamed_weights import linear_nodes
from attanchor_export.precision.weights import count_quantized, normalize_linears


def quantize_artifact(folder, data, **kwargs) -> Precision:
    """The floors the tiny random checkpoints declare (the exporter applies them from attanchor_config.json;
    these tests call the quantizer directly) on the artifact's own manifest (`data`: its JSON, for dims)."""
    kwargs.setdefault("floors", GATE_FLOORS)
    return _quantize_artifact(Manifest.load(folder, verify="none"), **kwargs)

FAMILY_ARTIFACTS = ["clip-t2i", "siglip-t2i-k4"]  # clip-llama (no budget), siglip-qwen2 (budget K=4)


@pytest.fixture
def fresh(artifact, tmp_path):
    """A private copy of a shared fp32 artifact (quantize_artifact rewrites graphs in place)."""

    def get(name):
        dst = tmp_path / name
        shutil.copytree(artifact(name), dst)
        return dst, read_manifest(dst)

    return get


def _initializer_types(model) -> dict[str, int]:
    return {i.name: i.data_type for i in model.graph.initializer}


def _io_types(path) -> set[int]:
    m = onnx.load(str(path), load_external_data=False)
    return {v.type.tensor_type.elem_type for v in (*m.graph.input, *m.graph.output)}


def _results(precision) -> dict:
    return {r.decoder: r for r in precision.gate.results}


@pytest.mark.parametrize("name", FAMILY_ARTIFACTS)
def test_fp16_keeps_norms_softmax_rope_and_logits_fp32(fresh, name):
    folder, data = fresh(name)
    precision = quantize_artifact(folder, data, dtype="fp16")
    assert precision.dtype == "fp16" and precision.gate.passed
    assert precision.backends["ort"] == precision.backends["trt"]  # one fp16 file for both
    for file in ("decoder.onnx", "vision.onnx"):
        assert _io_types(folder / file) <= {TensorProto.FLOAT, TensorProto.INT64}  # IO stays float32
    model = onnx.load(str(folder / "decoder.onnx"))
    types = _initializer_types(model)
    assert TensorProto.FLOAT16 in types.values()
    kept = precision.graphs["decoder.onnx"].fp16["kept_fp32_nodes"]
    dims = data["dims"]
    assert kept["norm"] >= 7 * (2 * dims["num_layers"] + 1)  # decomposed RMSNorm: 7 nodes per norm
    assert kept["softmax"] == dims["num_layers"] and kept["rope"] >= 2 and kept["logits"] == 1
    # The islands really compute in fp32: their float inputs are float32 tensors, not casts to fp16.
    # (Shape inference first: graph rewrites such as optimize.py add nodes without value_info.)
    model = onnx.shape_inference.infer_shapes(model)
    value_types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    value_types.update(types)
    for node in model.graph.node:
        if node.op_type in ("Pow", "ReduceMean", "Softmax", "Cos", "Sin"):
            float_inputs = [value_types.get(x) for x in node.input if value_types.get(x) in
                            (TensorProto.FLOAT, TensorProto.FLOAT16)]
            assert float_inputs and set(float_inputs) == {TensorProto.FLOAT}, node.name
    head = [n for n in model.graph.node if "logits" in n.output][0]
    assert head.op_type == "Identity"  # lm_head result goes out in fp32, no fp16 round trip
    (result,) = precision.gate.results
    assert result.cos_mean >= GATE_FLOORS["fp16"]["cos_mean"] and result.vision_cos_mean >= 0.999


@pytest.mark.parametrize("name", FAMILY_ARTIFACTS)
def test_int4_writes_matmulnbits_for_ort_and_qdq_for_trt(fresh, name, artifact):
    folder, data = fresh(name)
    precision = quantize_artifact(folder, data, quant="int4")
    assert precision.backends["ort"]["decoder"] == "decoder.onnx"
    assert precision.backends["trt"]["decoder"] == "decoder.trt.onnx"
    graphs = precision.graphs

    ort_model = onnx.load(str(folder / "decoder.onnx"))
    nbits = [n for n in ort_model.graph.node if n.op_type == "MatMulNBits"]
    layers = graphs["decoder.onnx"].linear_layers
    # every decoder linear (q, k, v, o, gate, up, down per layer) and, by int4's default, the lm_head;
    # onnxruntime's form reads q/k/v as one MatMulNBits and gate/up as one (merged_linears)
    n_layers = data["dims"]["num_layers"]
    assert layers == 7 * n_layers + 1 and graphs["decoder.onnx"].lm_head
    assert len(nbits) == graphs["decoder.onnx"].quantized_nodes == 4 * n_layers + 1
    assert graphs["decoder.onnx"].ort_fusions["merged_linears"] == {"groups": 2 * n_layers, "linears": 5 * n_layers}
    assert graphs["decoder.onnx"].ort_fusions["next_token"] == "next_token"
    assert precision.lm_head_quantized is True
    # onnxruntime's form only: RMSNorm and rotary fused (the TensorRT form below stays standard ops)
    fused = graphs["decoder.onnx"].ort_fusions["fused"]
    assert fused["RotaryEmbedding"] == fused["SkipSimplifiedLayerNormalization"] == 2 * data["dims"]["num_layers"]
    assert graphs["decoder.onnx"].ort_fusions["attention_in_place"] == data["dims"]["num_layers"]
    assert graphs["decoder.onnx"].ort_fusions["kv_cache"] == "append"
    assert graphs["decoder.trt.onnx"].ort_fusions is None
    attrs = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 128
    assert graphs["decoder.onnx"].opset.get("com.microsoft") == 1

    trt_model = onnx.load(str(folder / "decoder.trt.onnx"))
    assert not {n.domain for n in trt_model.graph.node} - {"", "ai.onnx"}
    assert {o.domain or "ai.onnx": o.version for o in trt_model.opset_import}["ai.onnx"] == 21
    dqs = [n for n in trt_model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == count_quantized(trt_model)["QDQ_int4"] == layers
    inits = _initializer_types(trt_model)
    for dq in dqs:  # TensorRT: signed INT4, no zero point, block 64 or 128
        assert inits[dq.input[0]] == TensorProto.INT4 and len(dq.input) == 2
        assert {a.name: helper.get_attribute_value(a) for a in dq.attribute}["block_size"] in (64, 128)
    assert graphs["decoder.trt.onnx"].tensorrt_compatible

    fp32 = graph_bytes(artifact(name) / "decoder.onnx")
    assert graph_bytes(folder / "decoder.onnx") < fp32 and graph_bytes(folder / "decoder.trt.onnx") < fp32
    assert precision.gate.passed and set(_results(precision)) == {"decoder.onnx", "decoder.trt.onnx"}


@pytest.mark.parametrize("name", FAMILY_ARTIFACTS)
def test_int8_weight_only_for_ort_and_calibrated_qdq_for_trt(fresh, name):
    folder, data = fresh(name)
    precision = quantize_artifact(folder, data, quant="int8")
    graphs = precision.graphs
    ort_model = onnx.load(str(folder / "decoder.onnx"))
    nbits = [n for n in ort_model.graph.node if n.op_type == "MatMulNBits"]
    assert graphs["decoder.onnx"].linear_layers == 7 * data["dims"]["num_layers"]  # lm_head fp32 in int8
    assert len(nbits) == graphs["decoder.onnx"].quantized_nodes == 4 * data["dims"]["num_layers"]  # merged
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"] == 8 for n in nbits)
    assert not any(n.op_type == "QuantizeLinear" for n in ort_model.graph.node)  # weight-only

    trt_model = onnx.load(str(folder / "decoder.trt.onnx"))
    assert count_quantized(trt_model)["QDQ_int8"] == graphs["decoder.trt.onnx"].quantized_nodes > 0
    quants = [n for n in trt_model.graph.node if n.op_type == "QuantizeLinear"]
    assert quants  # calibrated activations
    inits = {i.name: i for i in trt_model.graph.initializer}
    for q in quants:  # symmetric: zero points 0 (TensorRT), int8
        zp = numpy_helper.to_array(inits[q.input[2]])
        assert zp.dtype == np.int8 and not zp.any()
    smoothing = graphs["decoder.trt.onnx"].smoothing  # SmoothQuant folded in before calibration
    assert smoothing.smoothed_linears == graphs["decoder.trt.onnx"].quantized_nodes - len(smoothing.not_smoothed)
    assert smoothing.outlier_ratio_max.after < smoothing.outlier_ratio_max.before
    assert graphs["decoder.onnx"].smoothing is None  # weight-only: nothing to smooth
    assert precision.calibration["source"] == "builtin" and precision.calibration["samples"] >= 4
    assert precision.calibration["prompts"] == "tokenizer"
    assert precision.gate.passed
    for result in precision.gate.results:
        assert result.cos_mean >= GATE_FLOORS["int8"]["cos_mean"]
        assert 0 <= result.greedy_match <= 1 and result.greedy_tokens == 32


def test_fp16_int4_with_lm_head_vision_and_small_blocks(fresh):
    folder, data = fresh("clip-t2i")
    precision = quantize_artifact(folder, data, dtype="fp16", quant="int4", block_size=32,
                                  quantize_lm_head=True, quantize_vision=True)
    graphs = precision.graphs
    assert graphs["decoder.onnx"].lm_head and graphs["decoder.onnx"].linear_layers == 7 * 2 + 1
    assert graphs["vision.onnx"].format == "MatMulNBits" and graphs["vision.onnx"].quantized_nodes > 0
    assert precision.backends["trt"]["vision"] == "vision.trt.onnx"
    # TensorRT takes INT4 blocks of 64/128 only: the TensorRT form records what it used
    assert graphs["decoder.trt.onnx"].block_size in (64, 128)
    assert graphs["decoder.onnx"].block_size == 32
    assert precision.gate.passed
    assert all(r.vision_cos_mean is not None for r in precision.gate.results)


def test_block_256_for_onnxruntime_with_a_tensorrt_block_beside_it(fresh):
    """--block-size 256 (onnxruntime's MatMulNBits takes it; TensorRT's INT4 does not): the onnxruntime form
    is written with 256-blocks and gated, the TensorRT form falls back to a block it takes and says so."""
    folder, data = fresh("clip-t2i")
    precision = quantize_artifact(folder, data, quant="int4", block_size=256)
    graphs = precision.graphs
    assert precision.block_size == 256 and graphs["decoder.onnx"].block_size == 256
    nbits = [n for n in onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: helper.get_attribute_value(a) for a in n.attribute}["block_size"] == 256
                         for n in nbits)
    assert graphs["decoder.trt.onnx"].block_size in (64, 128) and "64/128" in graphs["decoder.trt.onnx"].note
    assert precision.gate.passed
    assert _results(precision)["decoder.onnx"].cos_mean >= GATE_FLOORS["int4"]["cos_mean"]


def test_only_one_form_can_be_asked_for_and_the_lm_head_kept(fresh):
    folder, data = fresh("clip-t2i")
    precision = quantize_artifact(folder, data, quant="int4", forms=("QDQ",), quantize_lm_head=False)
    assert precision.lm_head_quantized is False and precision.graphs["decoder.onnx"].lm_head is None
    assert precision.graphs["decoder.onnx"].linear_layers == 7 * data["dims"]["num_layers"]
    assert not (folder / "decoder.trt.onnx").exists()
    assert precision.backends["ort"]["decoder"] == precision.backends["trt"]["decoder"] == "decoder.onnx"
    assert count_quantized(onnx.load(str(folder / "decoder.onnx")))["QDQ_int4"] > 0  # ORT runs QDQ too


def test_impossible_floor_fails_with_one_line(fresh):
    folder, data = fresh("clip-t2i")
    with pytest.raises(AccuracyGateFailed) as info:
        quantize_artifact(folder, data, quant="int8", floors={"cos_mean": 1.01})
    error = info.value
    assert "\n" not in str(error) and "int8 accuracy gate failed" in str(error) and "1.01" in str(error)
    assert error.results and not any(r.passed for r in error.results)
    assert error.precision.gate.passed is False and error.precision.quant == "int8"


def test_broken_quantization_fails_the_default_gate(fresh, monkeypatch):
    """Scales off by 4x (a packing/scale bug) must not pass the int4 floor."""
    from attanchor_export.precision import streamed_weights

    original = streamed_weights._Quantized.part

    def broken(self, value, index):
        compute = original(self, value, index)
        return (lambda: compute() * 4) if index == 1 else compute  # index 1: the scales

    monkeypatch.setattr(streamed_weights._Quantized, "part", broken)
    folder, data = fresh("siglip-t2i-k4")
    with pytest.raises(AccuracyGateFailed) as info:
        quantize_artifact(folder, data, quant="int4")
    assert "logits cosine mean" in str(info.value) and "\n" not in str(info.value)
    assert all(r.cos_mean < GATE_FLOORS["int4"]["cos_mean"] for r in info.value.results)


def test_gate_of_fp32_against_itself_is_exact(artifact):
    folder = artifact("clip-t2i")
    pipe = gate_pipeline(Manifest.load(folder))
    baseline = fp32_baseline(pipe, gate_samples(2), new_tokens=8)
    result = evaluate(baseline, pipe, vision_changed=True)
    assert result["cos_mean"] == pytest.approx(1.0) and result["top1"] == 1.0
    assert result["greedy_match"] == 1.0 and result["greedy_prefix"] == 8
    # prompt positions (images included) + the 7 teacher-forced decode steps, batched with left padding
    assert result["positions"] == int(baseline.front.attention_mask.sum()) + 2 * 7


def test_gate_compares_logits_a_few_rows_at_a_time(artifact, monkeypatch):
    """The gate's metrics, computed run by run and CHUNK_BYTES of rows at a time (at Qwen's vocabulary the
    whole gate set in float64 was ~10 GB), are the whole-array float64 comparison's; row by row too."""
    from attanchor_export.checks.compare import cosine_rows
    from attanchor_export.precision import gate

    pipe = gate_pipeline(Manifest.load(artifact("clip-t2i")))
    baseline = fp32_baseline(pipe, gate_samples(2), new_tokens=4)
    own = baseline.logits.copy()
    rng = np.random.default_rng(0)
    baseline.logits = own + rng.standard_normal(own.shape).astype(np.float32) * own.std()
    monkeypatch.setattr(gate, "CHUNK_BYTES", 3 * 8 * own.shape[1])  # 3 rows at a time
    result = evaluate(baseline, pipe)
    cos = cosine_rows(own, baseline.logits)
    top1 = own.argmax(-1) == baseline.logits.argmax(-1)
    assert result["positions"] == len(own) > 3 and 0.2 < result["cos_mean"] < 0.95
    assert result["cos_mean"] == pytest.approx(cos.mean(), abs=1e-12) and result["cos_min"] == pytest.approx(cos.min())
    assert result["top1"] == top1.mean() and 0 < result["top1"] < 1
    assert result["max_abs_diff"] == float(np.abs(own.astype(np.float64) - baseline.logits).max())
    by_row = evaluate(baseline, pipe, rows_per_run=1)
    assert by_row["positions"] == result["positions"] and by_row["top1"] == result["top1"]
    assert by_row["cos_mean"] == pytest.approx(result["cos_mean"], abs=1e-6)


def test_options_are_checked(fresh):
    folder, data = fresh("clip-t2i")
    for kwargs in ({"dtype": "bf16"}, {"quant": "int2"}, {"quant": "int4", "block_size": 48},
                   {"dtype": "fp16", "quant": "int8"}, {"quant": "int4", "forms": ("GGUF",)},
                   {"quant": "int8", "smooth_alpha": 0.0}, {"quant": "int8", "smooth_alpha": 1.5}):
        with pytest.raises(ExportError) as info:
            quantize_artifact(folder, data, **kwargs)
        assert "\n" not in str(info.value)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert quantize_artifact(folder, data) == Precision(dtype="fp32", quant="none")
    assert before == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_calibration_sets(tmp_path, artifact):
    from PIL import Image

    a, b = builtin_samples(3), builtin_samples(3)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))  # deterministic, no network
    assert {s.prompt for s in gate_samples()}.isdisjoint(s.prompt for s in builtin_samples())
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(builtin_samples(1, seed=50 + i)[0].image).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    assert [s.label for s in load_calibration_set(images)] == ["0.png", "1.png", "2.png"]
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text(json.dumps({"image": "images/1.png", "prompt": "What is this?"}) + "\n\n")
    (sample,) = load_calibration_set(jsonl)
    assert sample.prompt == "What is this?" and sample.image == str(images / "1.png")
    for bad, message in (('{"image": "images/9.png", "prompt": "x"}', "does not exist"),
                         ('{"prompt": "x"}', "expected a JSON object")):
        jsonl.write_text(bad + "\n")
        with pytest.raises(ExportError, match=message):
            load_calibration_set(jsonl)
    with pytest.raises(ExportError, match="no such folder"):
        load_calibration_set(tmp_path / "missing")

    folder = artifact("siglip-t2i-k4")
    reader = DecoderCalibrationReader.from_samples(gate_pipeline(Manifest.load(folder)),
                                                   load_calibration_set(images))
    feeds = [reader.get_next() for _ in range(len(reader))]
    assert reader.get_next() is None
    assert feeds[0]["inputs_embeds"].shape[0] == 1 and feeds[0]["past_key_values.0.key"].shape[2] == 0


def _norm_graph():
    """x -> LayerNorm (decomposed) -> Gemm(transB) -> RMSNorm (decomposed) -> MatMul -> logits."""
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mu"], name="ln_mean"),
        helper.make_node("Sub", ["x", "mu"], ["xc"], name="ln_sub"),
        helper.make_node("Pow", ["xc", "two"], ["sq"], name="ln_pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="ln_var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="ln_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="ln_sqrt"),
        helper.make_node("Div", ["xc", "sd"], ["xn"], name="ln_div"),
        helper.make_node("Mul", ["xn", "gamma"], ["xg"], name="ln_gain"),
        helper.make_node("Add", ["xg", "beta"], ["h"], name="ln_bias"),
        helper.make_node("Gemm", ["h", "w1", "b1"], ["h1"], name="fc", transB=1),
        helper.make_node("Mul", ["h1", "h1"], ["s2"], name="rms_sq"),
        helper.make_node("ReduceMean", ["s2", "axes"], ["ms"], name="rms_mean"),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="rms_eps"),
        helper.make_node("Sqrt", ["mse"], ["rt"], name="rms_sqrt"),
        helper.make_node("Reciprocal", ["rt"], ["inv"], name="rms_inv"),
        helper.make_node("Mul", ["h1", "inv"], ["hn"], name="rms_mul"),
        helper.make_node("Mul", ["gamma2", "hn"], ["hg"], name="rms_gain"),
        helper.make_node("MatMul", ["hg", "w2"], ["logits"], name="lm_head"),
    ]
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(v, k) for k, v in {
        "axes": np.array([-1], np.int64), "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
        "gamma": rng.standard_normal(8).astype(np.float32), "beta": rng.standard_normal(8).astype(np.float32),
        "w1": rng.standard_normal((16, 8)).astype(np.float32), "b1": rng.standard_normal(16).astype(np.float32),
        "gamma2": rng.standard_normal(16).astype(np.float32), "w2": rng.standard_normal((16, 32)).astype(np.float32),
    }.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 32])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def test_fp32_islands_and_linear_normalization_on_a_hand_written_graph():
    import onnxruntime as ort

    model = _norm_graph()
    islands = fp32_islands(model.graph)
    assert islands["norm"] == {n.name for n in model.graph.node if n.name.startswith(("ln_", "rms_"))}
    assert islands["logits"] == {"lm_head"}
    normalize_linears(model.graph)  # Gemm(transB) -> MatMul + Add: the quantizer sees it
    import onnx_ir as ir

    nodes, head = linear_nodes(ir.from_proto(model).graph, include_lm_head=False)
    assert [n.name for n in nodes] == ["fc"] and head.name == "lm_head"
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    ref = ort.InferenceSession(_norm_graph().SerializeToString()).run(None, {"x": x})[0]
    normalized = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(normalized, ref, rtol=1e-5, atol=1e-5)
    half, _ = convert_fp16(model)
    out = ort.InferenceSession(half.SerializeToString()).run(None, {"x": x})[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_int4_keeps_the_named_linears_at_8_bits(fresh):
    """--int4-8bit: q_proj and down_proj become 8-bit MatMulNBits in the onnxruntime form (q apart from the
    still-merged int4 k/v) and stay unquantized in the TensorRT form; both forms run through the gate."""
    folder, data = fresh("clip-t2i")
    layers = data["dims"]["num_layers"]
    precision = quantize_artifact(folder, data, quant="int4", int4_8bit=("q_proj", "down_proj"))
    assert precision.int4_8bit == ("q_proj", "down_proj") and precision.gate.passed
    ort = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    bits = [helper.get_attribute_value(a) for n in ort.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"]
    assert bits.count(8) == 2 * layers and bits.count(4) > 0
    graphs = precision.graphs
    assert graphs["decoder.onnx"].kept_8bit["linears"] == 2 * layers
    trt = onnx.load(str(folder / "decoder.trt.onnx"), load_external_data=False)
    floats = {i.name for i in trt.graph.initializer if i.data_type == TensorProto.FLOAT}
    plain = [n for n in trt.graph.node if n.op_type == "MatMul" and n.input[1] in floats
             and any(p in n.input[1] for p in ("q_proj", "down_proj"))]
    assert len(plain) == 2 * layers
    record = graphs["decoder.trt.onnx"]
    assert record.kept_8bit["linears"] == 2 * layers
    assert record.quantized_nodes == record.linear_layers - 2 * layers


def test_int4_8bit_names_that_match_nothing_or_everything_are_refused(fresh):
    folder, data = fresh("clip-t2i")
    for names, message in ((("q_proj", "qq_proj"), "qq_proj"), (("proj", "lm_head"), "--quant int8")):
        with pytest.raises(ExportError) as info:
            quantize_artifact(folder, data, quant="int4", int4_8bit=names)
        assert message in str(info.value) and "\n" not in str(info.value)
    assert not (folder / "decoder.trt.onnx").exists()
