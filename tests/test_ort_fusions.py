"""The onnxruntime-only decoder fusions: same outputs as the standard-op graph, fewer nodes."""

from __future__ import annotations

import shutil

import onnx
import pytest
from attanchor_runtime.manifest import KV_APPEND, Manifest

from attanchor_export.precision.ort_fusions import fuse_decoder_file, op_counts
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
    model = onnx.load(str(fused), load_external_data=False)
    ops = op_counts(model)
    assert ops["Pow"] == ops["Neg"] == ops["Reciprocal"] == 0 and ops["Softmax"] == layers
    producer = {o: n for n in model.graph.node for o in n.output}
    past = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    assert not [n for n in model.graph.node if n.op_type == "Concat" and set(n.input) & past]
    assert all(producer[o.name].op_type in ("RotaryEmbedding", "Transpose") for o in model.graph.output
               if o.name.startswith("present."))  # the new positions, computed straight into the output
    assert report["nodes_after"] == len(model.graph.node) < report["nodes_before"]
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(str(source / "decoder.onnx"),
                                                                              load_external_data=False).graph.input]
    # batch 1 and a left-padded batch 3 (positions not 0..S-1 in every row), prefill and cached steps
    parity = decoder_parity(source / "decoder.onnx", fused, dims, candidate_kv=KV_APPEND)
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
