"""The decoder's optional logits_to_keep input (trace/logits_to_keep.py): a prefill that feeds 1 gets the
last position's logits only, equal to the last row of the full ones, with the same KV cache; a caller
that feeds nothing gets every position, as before; the TensorRT view of the graph is unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from attanchor_graphs.specification import position_ids_from_mask
from attanchor_graphs.trt_lint import lint_model
from attanchor_runtime.batch import left_pad
from attanchor_runtime.manifest import LOGITS_TO_KEEP, Manifest
from attanchor_runtime.ort_backend import OrtBackend
from attanchor_runtime.pipeline import Pipeline


@pytest.mark.parametrize("name", ["clip-t2i", "siglip-t2i-k4"])  # Llama and Qwen2 decoders
def test_one_kept_position_is_the_last_row_of_all(artifact, name):
    manifest = Manifest.load(artifact(name))
    spec, dims = manifest.graphs.decoder, manifest.dims
    assert spec.notes.logits_to_keep == LOGITS_TO_KEEP
    session = ort.InferenceSession(str(manifest.path(spec.file)), providers=["CPUExecutionProvider"])
    assert LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
    assert LOGITS_TO_KEEP not in {i.name for i in session.get_inputs()}  # optional: not a required feed
    rng = np.random.default_rng(0)
    _, mask = left_pad([np.zeros(n, np.int64) for n in (4, 9, 6)], 0)  # ragged rows, left padding
    feeds = {"inputs_embeds": rng.standard_normal((3, mask.shape[1], dims.hidden_size), np.float32),
             "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    feeds.update({n: np.zeros((3, dims.num_kv_heads, 0, dims.head_dim), np.float32) for n in spec.past_names})
    every = session.run(None, feeds)
    last = session.run(None, {**feeds, LOGITS_TO_KEEP: np.array(1, np.int64)})
    assert every[0].shape == (3, mask.shape[1], dims.vocab_size) and last[0].shape == (3, 1, dims.vocab_size)
    np.testing.assert_allclose(last[0][:, 0], every[0][:, -1], atol=1e-5, rtol=0)
    for got, want in zip(last[1:], every[1:], strict=True):
        np.testing.assert_array_equal(got, want)
    two = session.run(None, {**feeds, LOGITS_TO_KEEP: np.array(2, np.int64)})[0]
    np.testing.assert_allclose(two, every[0][:, -2:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(session.run(None, {**feeds, LOGITS_TO_KEEP: np.array(0, np.int64)})[0], every[0])


def test_the_runtime_asks_for_the_last_position_and_answers_the_same(artifact):
    """Pipeline.generate on the fp32 decoder: the prefill fetched [B, 1, V] (decode_last), and greedy and
    sampled tokens equal those of the same decoder made to return every position."""
    manifest = Manifest.load(artifact("clip-t2i"))
    ids = [[manifest.text.bos_token_id, manifest.text.image_token_id, 5, 9, 11, 4]] * 2
    pixels = np.random.default_rng(1).random((2, 3, manifest.dims.image_size, manifest.dims.image_size), np.float32)
    lean, full = Pipeline(manifest, OrtBackend(manifest)), Pipeline(manifest, OrtBackend(manifest))
    full.backend.decoder.logits_to_keep = None
    shapes = []
    decode_last = lean.backend.decode_last
    lean.backend.decode_last = lambda *a: shapes.append(a[0].shape[1]) or decode_last(*a)
    for options in ({}, {"do_sample": True, "temperature": 1.5, "seed": 3}):
        np.testing.assert_array_equal(lean.generate(ids, pixels, max_new_tokens=8, **options).tokens,
                                      full.generate(ids, pixels, max_new_tokens=8, **options).tokens)
    assert shapes and shapes[0] > 1  # the sampled run's prefill went through decode_last


def test_a_last_logits_only_export_has_no_such_input_and_trt_sees_none(artifact, checkpoint, tmp_path):
    """--last-logits-only already returns one position: no input added. In the default graph the input is
    an initializer, which TensorRT's parser (and trt_lint, which models it) takes for a constant."""
    from attanchor_export.exporter import ExportOptions, export_artifact

    out = tmp_path / "last"
    export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=out, last_logits_only=True))
    manifest = Manifest.load(out)
    assert manifest.graphs.decoder.notes.logits_to_keep is None
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    assert LOGITS_TO_KEEP not in {i.name for i in graph.input}
    default = Manifest.load(artifact("clip-t2i"))
    model = onnx.load(str(default.path("decoder.onnx")), load_external_data=False)
    report = lint_model(model, name="decoder.onnx", target="10.3")
    assert not [f for f in report.findings if f.severity == "error"], report.findings
