"""The onnxruntime-only decoder fusions: same outputs as the standard-op graph, fewer nodes."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from attanchor_runtime.manifest import KV_APPEND, NEXT_TOKEN, Manifest
from onnx import TensorProto, helper

from attanchor_export.precision.ort_fusions import (
    _greedy_output,
    attend_over_whole_cache,
    fuse_decoder_file,
    op_counts,
)
from attanchor_export.trace.decoder_parity import decoder_parity


@pytest.mark.parametrize("name", ["clip-t2i", "siglip-t2i-k4"])  # Llama and Qwen2 decoders
def test_fused_decoder_matches_the_standard_graph(artifact, tmp_path, name):
    source = artifact(name)
    dims = Manifest.load(source).dims
    for f in ("decoder.onnx", "decoder.onnx.data"):
        shutil.copy(source / f, tmp_path / f)
    fused = tmp_path / "decoder.onnx"
    report = fuse_decoder_file(fused, dims)
    layers = dims.num_layers
    # every layer: two norms with their residual Add folded in (but the first, which has no residual
    # before it), plus the final norm; queries and keys rotated by one RotaryEmbedding each; and each
    # layer's attention reads its past in place (no cache Concat), returning the new positions only
    assert report["fused"] == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2 * layers,
                               "RotaryEmbedding": 2 * layers}
    assert report["attention_in_place"] == layers and report["kv_cache"] == KV_APPEND
    assert report["next_token"] == NEXT_TOKEN  # the greedy choice as an extra output, the logits kept
    model = onnx.load(str(fused), load_external_data=False)
    ops = op_counts(model)
    assert ops["Pow"] == ops["Neg"] == ops["Reciprocal"] == 0 and ops["Softmax"] == layers
    producer = {o: n for n in model.graph.node for o in n.output}
    past = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    assert not [n for n in model.graph.node if n.op_type == "Concat" and set(n.input) & past]
    assert all(producer[o.name].op_type in ("RotaryEmbedding", "Transpose") for o in model.graph.output
               if o.name.startswith("present."))  # the new positions, computed straight into the output
    assert report["nodes_after"] == len(model.graph.node) < report["nodes_before"]
    standard = onnx.load(str(source / "decoder.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == [i.name for i in standard.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in standard.graph.output] + [NEXT_TOKEN]
    # batch 1 and a left-padded batch 3 (positions not 0..S-1 in every row), prefill and cached steps
    parity = decoder_parity(source / "decoder.onnx", fused, dims, candidate_kv=KV_APPEND)
    assert parity["max_abs_diff"] < 1e-4, parity


@pytest.mark.parametrize("name,chunks", [("clip-t2i", 1), ("siglip-t2i-k4", 1), ("clip-t2i", 3), ("siglip-t2i-k4", 8)])
def test_whole_cache_attention_matches_the_standard_graph(artifact, tmp_path, name, chunks):
    """attend_over_whole_cache (the prompt graph's attention): K and V joined before the products instead
    of scores joined after; same IO, KV_APPEND, same outputs as the standard graph (prefill and cached
    steps against a KV buffer longer than the past, whose unused slots are masked)."""
    source = artifact(name)
    dims = Manifest.load(source).dims
    for f in ("decoder.onnx", "decoder.onnx.data"):
        shutil.copy(source / f, tmp_path / f)
    fused = tmp_path / "decoder.onnx"
    fuse_decoder_file(fused, dims)
    model = onnx.load(str(fused), load_external_data=False)
    assert attend_over_whole_cache(model, chunks) == dims.num_layers
    softmax_out = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
    assert not [n for n in model.graph.node if n.op_type == "Slice" and set(n.input) & softmax_out]
    producer = {o: n for n in model.graph.node for o in n.output}
    assert all(producer[n.input[0]].op_type != "Concat" for n in model.graph.node if n.op_type == "Add"
               and n.output[0] in {m.input[0] for m in model.graph.node if m.op_type == "Softmax"})
    onnx.save(model, str(tmp_path / "whole.onnx"))
    parity = decoder_parity(source / "decoder.onnx", tmp_path / "whole.onnx", dims, candidate_kv=KV_APPEND)
    assert parity["max_abs_diff"] < 1e-4, parity


def test_a_graph_without_the_patterns_is_left_alone(artifact, tmp_path):
    """The vision graph has LayerNorms and no rotary: nothing matches, nothing changes."""
    source = artifact("clip-t2i")
    for f in ("vision.onnx", "vision.onnx.data"):
        if (source / f).exists():
            shutil.copy(source / f, tmp_path / f)
    before = onnx.load(str(tmp_path / "vision.onnx"), load_external_data=False)
    report = fuse_decoder_file(tmp_path / "vision.onnx", Manifest.load(source).dims)
    assert not any(report["fused"].values())
    assert report["nodes_after"] == report["nodes_before"] == len(before.graph.node)


def test_the_graph_greedy_choice_is_numpy_argmax_of_the_last_position():
    """next_token on a logits pass-through: the last position's first maximum (ties as numpy/torch
    break them), -1 in a row whose logits hold NaN or Inf; a second run adds nothing."""
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 5])
    present = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", "seq", 5])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"]),
                               helper.make_node("Identity", ["x"], ["present.0.key"])], "toy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 5])],
                              [logits, present])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert _greedy_output(model) == NEXT_TOKEN and _greedy_output(model) is None
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((5, 3, 5)).astype(np.float32)
    x[1, -1] = [0, 3, 1, 3, 2]  # a tie: the first maximum
    x[1, 0, 0] = 99  # not the last position: ignored
    x[2, -1, 4], x[3, -1, 0], x[4, -1, 2] = np.nan, np.inf, -np.inf
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run([NEXT_TOKEN], {"x": x})[0]
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [x[0, -1].argmax(), 1, -1, -1, -1])
