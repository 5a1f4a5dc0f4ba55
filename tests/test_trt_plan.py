"""The TensorRT build plan as plain data: profiles, consistency, graph precision, option errors. CPU only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TINY_DIMS, tiny_manifest

from attanchor_export.trt.build import compare
from attanchor_export.trt.plan import (
    BuildOptions,
    BuildPlan,
    Gate,
    PlanError,
    make_plan,
    profile_problems,
)

M, HIDDEN, HEADS, HEAD_DIM, LAYERS = (TINY_DIMS[k] for k in ("image_tokens", "hidden_size", "num_kv_heads", "head_dim",
                                                            "num_layers"))


def manifest(max_anchors=None, precision=None, max_positions=512, **extra):
    """A tiny artifact's manifest (helpers.TINY_DIMS: image tokens M, hidden HIDDEN, ...) with no files."""
    return tiny_manifest("/nonexistent-artifact", max_anchors, dims={"max_position_embeddings": max_positions},
                         precision=precision or {"dtype": "fp32", "quant": "none"}, **extra)


def plan_for(options=None, **kwargs) -> BuildPlan:
    return make_plan(manifest(**kwargs), options or BuildOptions(max_batch=4, max_input_len=96, max_seq_len=256),
                     inspect_onnx=False)


KV = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]


def test_decoder_has_prefill_and_decode_profiles():
    plan = plan_for()
    decoder = plan.engines["decoder"]
    assert decoder.backend == "tensorrt" and decoder.engine == "decoder.plan"
    assert [p.name for p in decoder.profiles] == ["prefill", "decode"]
    prefill, decode = decoder.profiles
    # Prefill: an empty past (zero-size dimension), seq 1..max_input_len.
    assert prefill.dims["past_len"] == [0, 0, 0]
    assert prefill.dims["seq_len"][0::2] == [1, 96]
    assert prefill.shapes["inputs_embeds"]["max"] == [4, 96, HIDDEN]
    assert prefill.shapes[KV[0]] == {"min": [1, HEADS, 0, HEAD_DIM], "opt": [1, HEADS, 0, HEAD_DIM],
                                     "max": [4, HEADS, 0, HEAD_DIM]}
    assert prefill.shapes["attention_mask"]["max"] == [4, 96]
    # Decode: one token against 1..max_seq_len-1 cached positions.
    assert decode.dims["seq_len"] == [1, 1, 1]
    assert decode.dims["past_len"][0::2] == [1, 255]
    assert decode.shapes["attention_mask"]["min"] == [1, 2] and decode.shapes["attention_mask"]["max"] == [4, 256]
    assert decode.shapes["position_ids"]["max"] == [4, 1]


@pytest.mark.parametrize("empty_past", ["zero", "masked-slot"])
def test_kv_and_mask_ranges_are_consistent(empty_past):
    plan = plan_for(BuildOptions(max_batch=2, max_input_len=64, max_seq_len=128, empty_past=empty_past))
    decoder = plan.engines["decoder"]
    assert profile_problems(decoder) == []
    for profile in decoder.profiles:
        kv = [profile.shapes[name] for name in KV]
        assert all(r == kv[0] for r in kv), "every KV input shares one range"
        for key in ("min", "opt", "max"):
            mask, embeds = profile.shapes["attention_mask"][key], profile.shapes["inputs_embeds"][key]
            assert mask[1] == kv[0][key][2] + embeds[1], "total_len = past_len + seq_len"
            assert {mask[0], embeds[0], kv[0][key][0], profile.shapes["position_ids"][key][0]} == \
                {profile.dims["batch"][["min", "opt", "max"].index(key)]}
    slot = 1 if empty_past == "masked-slot" else 0
    assert decoder.profile("prefill").dims["past_len"] == [slot] * 3
    assert decoder.profile("decode").dims["total_len"][2] == 128 + slot


def test_profile_problems_catches_inconsistent_edits():
    decoder = plan_for().engines["decoder"]
    decode = decoder.profile("decode")
    decode.shapes[KV[3]]["max"][2] += 1  # one KV input longer than the others (TensorRT #1808)
    decode.shapes["attention_mask"]["opt"][1] += 1
    problems = profile_problems(decoder)
    assert any(KV[3] in p for p in problems)
    assert any("attention_mask opt" in p for p in problems)


def test_plan_json_round_trip():
    plan = plan_for(max_anchors=4)
    text = json.dumps(plan.to_json())
    again = BuildPlan.from_json(json.loads(text))
    assert again == plan
    table = plan.format_table()
    assert "profile prefill" in table and "profile decode" in table and "fp32, strongly typed, TF32 off" in table
    with pytest.raises(PlanError, match="build plan version 1"):  # version 1 had builder flags
        BuildPlan.from_json({**json.loads(text), "version": 1})


def test_vision_profile_over_batch_at_fixed_size():
    vision = plan_for(BuildOptions(max_batch=3, max_input_len=64, max_seq_len=128)).engines["vision"]
    (profile,) = vision.profiles
    assert profile.shapes["pixel_values"] == {"min": [1, 3, 30, 30], "opt": [1, 3, 30, 30], "max": [3, 3, 30, 30]}


def test_embedding_engine_only_with_a_budget():
    no_k = plan_for().engines["embedding"]
    assert no_k.backend == "onnxruntime" and no_k.engine is None
    assert "max-anchors" in no_k.reason and "onnxruntime" in no_k.reason
    with_k = plan_for(max_anchors=4).engines["embedding"]
    assert with_k.backend == "tensorrt" and with_k.engine == "embedding.plan"
    (profile,) = with_k.profiles
    max_text = 96 - M - 4 + 1  # T - 1 + M + K <= max_input_len
    assert profile.dims["text_len"][2] == max_text
    assert profile.shapes["input_ids"]["max"] == [4, max_text]
    assert "threshold" in profile.shapes and profile.shapes["threshold"]["max"] == []
    assert {g.metric for g in with_k.gates} >= {"exact"}
    disabled = plan_for(BuildOptions(max_input_len=96, max_seq_len=256, embedding_engine=False), max_anchors=4)
    assert disabled.engines["embedding"].backend == "onnxruntime"


def test_precision_is_what_the_graphs_hold():
    """No builder flags: each spec records the graph's types, and only all-fp32 graphs get the fp32 tolerance."""
    fp32 = plan_for(max_anchors=4)
    assert {g: e.precision for g, e in fp32.engines.items()} == {"vision": "fp32", "embedding": "fp32",
                                                                 "decoder": "fp32"}
    assert [g.metric for g in fp32.engines["decoder"].gates] == ["max_abs_diff"]
    fp16 = plan_for(precision={"dtype": "fp16", "quant": "none"})
    assert fp16.engines["decoder"].precision == fp16.engines["vision"].precision == "fp16"
    assert [g.metric for g in fp16.engines["decoder"].gates] == ["cosine"]
    int4 = plan_for(precision={"dtype": "fp16", "quant": "int4",
                               "backends": {"trt": {"vision": "vision.onnx", "decoder": "decoder.trt.onnx"}}},
                    max_anchors=4)
    decoder = int4.engines["decoder"]
    assert decoder.precision == "fp16 + int4 QDQ" and decoder.onnx == "decoder.trt.onnx"
    # The anchor graph always builds as fp32 (its scores pick discrete indices).
    assert int4.engines["embedding"].precision == "fp32" and int4.engines["vision"].precision == "fp16"
    int8 = plan_for(precision={"dtype": "fp32", "quant": "int8", "vision_quantized": True})
    assert int8.engines["vision"].precision == int8.engines["decoder"].precision == "fp32 + int8 QDQ"
    assert [g.metric for g in int8.engines["vision"].gates] == ["cosine"]
    # --vision-quant int8: the vision tower's own precision, whatever the decoder's
    mixed = plan_for(precision={"dtype": "fp32", "quant": "int4", "vision_quant": "int8", "vision_quantized": True})
    assert (mixed.engines["vision"].precision, mixed.engines["decoder"].precision) == ("fp32 + int8 QDQ",
                                                                                       "fp32 + int4 QDQ")
    alone = plan_for(precision={"dtype": "fp32", "quant": "none", "vision_quant": "int8", "vision_quantized": True})
    assert (alone.engines["vision"].precision, alone.engines["decoder"].precision) == ("fp32 + int8 QDQ", "fp32")
    for removed in ("flags", "clear_flags", "pin_fp32_layers", "strongly_typed"):
        assert removed not in int4.to_json()["engines"]["decoder"]


def test_qdq_bits_come_from_the_graph(tmp_path):
    from onnx import TensorProto, helper, numpy_helper, save

    from attanchor_export.trt.plan import _graph_qdq_bits

    def graph(weight_type):
        w = helper.make_tensor("w", weight_type, [4, 2], [1] * 8)
        scale = numpy_helper.from_array(np.full((1, 2), 0.1, np.float32), "s")
        nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=4),
                 helper.make_node("MatMul", ["x", "wf"], ["y"])]
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=[w, scale]),
            opset_imports=[helper.make_opsetid("", 21)])

    save(graph(TensorProto.INT4), tmp_path / "int4.onnx")
    save(graph(TensorProto.INT8), tmp_path / "int8.onnx")
    assert _graph_qdq_bits(tmp_path / "int4.onnx") == 4 and _graph_qdq_bits(tmp_path / "int8.onnx") == 8
    assert _graph_qdq_bits(tmp_path / "missing.onnx") is None


def test_no_trt_form_is_an_error():
    with pytest.raises(PlanError, match="no TensorRT form of its decoder"):
        plan_for(precision={"dtype": "fp32", "quant": "int4", "backends": {"trt": {"decoder": None}}})


def test_defaults_follow_the_model():
    plan = make_plan(manifest(max_positions=4096), inspect_onnx=False)
    assert plan.options.max_seq_len == 2048 and plan.options.max_input_len == M + 512
    small = make_plan(manifest(max_positions=64), inspect_onnx=False)
    assert small.options.max_seq_len == 64 and small.options.max_input_len == 64


@pytest.mark.parametrize(
    ("options", "kwargs", "message"),
    [
        (dict(max_input_len=300, max_seq_len=256), {}, "max_input_len 300 exceeds max_seq_len 256"),
        (dict(max_seq_len=1024), {}, "exceeds the model's max_position_embeddings"),
        (dict(max_input_len=20, max_seq_len=256), {}, "cannot hold the 25 image tokens"),
        (dict(max_batch=0), {}, "max_batch must be >= 1"),
        (dict(max_batch=2, opt_batch=3), {}, "opt_batch must be within 1..2"),
        (dict(max_seq_len=1), {}, "max_seq_len must be >= 2"),
        (dict(workspace_mib=0), {}, "workspace"),
        (dict(empty_past="none"), {}, "empty_past"),
        (dict(builder_optimization_level=9), {}, "builder_optimization_level"),
        (dict(max_input_len=28, max_seq_len=256), {"max_anchors": 4}, "leaves no room for text"),
        ({}, {"precision": {"dtype": "bf16", "quant": "none"}}, "unknown artifact precision"),
    ],
)
def test_option_errors_are_one_line(options, kwargs, message):
    with pytest.raises(PlanError) as info:
        make_plan(manifest(**kwargs), BuildOptions(**options), inspect_onnx=False)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_plan_from_a_real_artifact(artifact):
    plan = make_plan(artifact("siglip-t2i-k4"), BuildOptions(max_input_len=64, max_seq_len=128))
    assert plan.engines["embedding"].backend == "tensorrt"
    assert plan.engines["decoder"].profile("prefill").shapes["past_key_values.0.key"]["max"][2] == 0
    assert profile_problems(plan.engines["decoder"]) == []
    assert {e.precision for e in plan.engines.values()} == {"fp32"}  # read from the files: no Q/DQ


# ---- the gate's comparison --------------------------------------------------------------------------
def test_compare_metrics():
    ref = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    ok = compare(ref, ref + 5e-4, Gate("logits", "max_abs_diff", 1e-3), "decoder", "prefill")
    assert ok["passed"] and ok["top1_agreement"] == 1.0
    bad = compare(ref, ref + 2e-3, Gate("logits", "max_abs_diff", 1e-3), "decoder", "prefill")
    assert not bad["passed"]
    cos = compare(ref, ref * 3.0, Gate("logits", "cosine", 0.99), "decoder", "prefill")
    assert cos["passed"] and cos["value"] == pytest.approx(1.0)
    flipped = compare(ref, -ref, Gate("logits", "cosine", 0.99), "decoder", "prefill")
    assert not flipped["passed"]
    nan = ref.copy()
    nan[0, 0, 0] = np.nan
    assert not compare(ref, nan, Gate("logits", "cosine", 0.0), "decoder", "x")["passed"]
    idx = np.array([[1, 2, 3]])
    assert compare(idx, idx, Gate("gather_index", "exact", 0), "embedding", "a")["passed"]
    assert not compare(idx, idx[:, ::-1], Gate("gather_index", "exact", 0), "embedding", "a")["passed"]
    assert not compare(idx, idx[:, :2], Gate("gather_index", "exact", 0), "embedding", "a")["passed"]
