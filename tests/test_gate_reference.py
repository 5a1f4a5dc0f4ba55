"""The accuracy gate's PyTorch reference (precision/gate_reference.py) on both families: the one-forward
logits are the step-by-step decode loop's on the same tokens, each streamed layer is read once per forward,
and a form's metrics and gate decision against it agree with those against the fp32 graphs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.pipeline import Pipeline

from attanchor_export.load.datasets import gate_samples
from attanchor_export.load.source import load_source
from attanchor_export.load.tiny_random import RANDOM_CHECKPOINT_FLOORS
from attanchor_export.precision import gate
from attanchor_export.source_model import TorchBackend, drop_front_weights

NEW_TOKENS = 6


@pytest.fixture(params=["llava", "qwen2_5_vl"])
def family(request):
    return request.param


@pytest.fixture
def fp32_folder(family, artifact, request):
    return artifact("clip-t2i") if family == "llava" else request.getfixturevalue("qwen_artifact")


def _source(folder):
    manifest = Manifest.load(folder)
    return manifest, load_source(manifest, streamed=True)


def test_one_forward_equals_the_step_by_step_loop(fp32_folder):
    """Prompt logits and the logits over a continuation (random tokens, not the model's choices) from the
    reference's two forwards are the decode loop's, run on TorchBackend one step at a time and fed the same
    tokens, at every compared position of a left-padded batch (LLaVA 1-D positions, Qwen M-RoPE [3, B, S])."""
    manifest, loaded = _source(fp32_folder)
    assert loaded.streaming == "streamed"
    baseline = gate.source_model_baseline(loaded, manifest, NEW_TOKENS, gate_samples(3))
    assert (baseline.front.attention_mask == 0).any(), "the rows should differ in length"
    reference = baseline.reference
    tokens = np.random.default_rng(0).integers(0, manifest.dims.vocab_size, (3, NEW_TOKENS))
    continuation = reference.continuation(tokens)
    assert continuation.shape == (3, NEW_TOKENS - 1, manifest.dims.vocab_size)
    expected = np.concatenate([np.concatenate([reference.prompt(b), continuation[b]]) for b in range(3)])

    loop = Pipeline(manifest, TorchBackend(loaded, manifest))
    own, logits, answer, _ = gate._run_decoder(loop, gate._rows(baseline.front, slice(None)), NEW_TOKENS,
                                               forced=tokens)
    assert logits.shape == expected.shape
    np.testing.assert_allclose(expected, logits, rtol=1e-4, atol=1e-4 * float(np.abs(logits).max()))
    # the choices PyTorch makes after the same prefixes are the loop's arg-max at the answer positions
    np.testing.assert_array_equal(reference.choices(tokens, continuation).ravel(), logits[answer].argmax(-1))
    assert reference.continuations == 1


def test_each_streamed_layer_is_read_once_per_forward(fp32_folder, monkeypatch):
    """The prefill reads every decoder layer once for all rows and positions, each form's continuation once
    more, where the step-by-step loop read each layer once per token."""
    manifest, loaded = _source(fp32_folder)
    loads = Counter()
    fill = loaded.streamed.fill

    def counting(module, keep=frozenset()):
        loads[id(module)] += 1
        return fill(module, keep)

    monkeypatch.setattr(loaded.streamed, "fill", counting)
    layers = [id(layer) for layer in loaded.family.decoder_layers(loaded.model)]
    baseline = gate.source_model_baseline(loaded, manifest, NEW_TOKENS, gate_samples(2))
    assert [loads[i] for i in layers] == [1] * len(layers) and set(loads.values()) == {1}
    drop_front_weights(loaded)  # what the exporter and `check` do before the forms run
    baseline.reference.continuation(np.zeros((2, NEW_TOKENS), np.int64))
    assert [loads[i] for i in layers] == [2] * len(layers) and set(loads.values()) == {2}

    loads.clear()
    loop = Pipeline(manifest, TorchBackend(loaded, manifest))
    gate._run_decoder(loop, gate._rows(baseline.front, slice(None)), NEW_TOKENS)
    assert [loads[i] for i in layers] == [NEW_TOKENS] * len(layers)


def test_fp32_graphs_against_the_reference_agree_everywhere(fp32_folder):
    """The fp32 artifact judged against PyTorch: every compared position agrees (the positions are the fp32
    baseline's own), and greedy agreement is the top-1 agreement over the answer positions."""
    manifest, loaded = _source(fp32_folder)
    samples = gate_samples(2)
    pipe = gate.gate_pipeline(manifest)
    result = gate.evaluate(gate.source_model_baseline(loaded, manifest, NEW_TOKENS, samples), pipe)
    itself = gate.evaluate(gate.fp32_baseline(pipe, samples, NEW_TOKENS), pipe)
    assert result["positions"] == itself["positions"]
    assert result["cos_min"] > 0.9999 and result["top1"] == 1.0 and result["finite"]
    assert result["greedy_match"] == 1.0 and result["greedy_prefix"] == NEW_TOKENS
    # with its own vision graph: judged by the feature cosine, the decoder still on PyTorch's features
    seen = gate.evaluate(gate.source_model_baseline(loaded, manifest, NEW_TOKENS, samples), pipe, vision_changed=True)
    assert seen["vision_cos_min"] > 0.9999 and seen["positions"] == result["positions"]
    assert seen["cos_mean"] == result["cos_mean"] and seen["greedy_match"] == 1.0


def test_int4_gate_decision_is_unchanged(qwen_artifact, qwen_artifact_int4):
    """Qwen2.5-VL int4, each form: the metrics against PyTorch teacher-forced on the form's tokens are
    close to those against the fp32 graphs teacher-forced on fp32's, and the decision is the same."""
    fp32_pipe = gate.gate_pipeline(Manifest.load(qwen_artifact))
    manifest, loaded = _source(qwen_artifact_int4)
    samples = gate_samples(4)
    against_fp32 = gate.fp32_baseline(fp32_pipe, samples, NEW_TOKENS)
    against_torch = gate.source_model_baseline(loaded, manifest, NEW_TOKENS, samples)
    floors = gate.floors_for("int4", RANDOM_CHECKPOINT_FLOORS)
    for files in manifest.precision.backends.values():
        form = manifest.with_files(manifest.folder, files, manifest.precision.graphs)
        old = gate.evaluate(against_fp32, gate.gate_pipeline(form, files))
        new = gate.evaluate(against_torch, gate.gate_pipeline(form, files))
        assert old["positions"] == new["positions"]
        assert new["cos_mean"] == pytest.approx(old["cos_mean"], abs=0.01), (old, new)
        assert new["top1"] == pytest.approx(old["top1"], abs=0.05), (old, new)
        assert new["greedy_match"] == new["top1_answer"]
        assert gate.judge(new, floors) == gate.judge(old, floors) == []
    assert against_torch.reference.continuations == len(manifest.precision.backends)


def test_broken_int4_fails_the_gate_against_pytorch(checkpoint, tmp_path, monkeypatch):
    """Scales off by 4x fail an over-budget export's gate, judged against the PyTorch reference."""
    import attanchor_export.export_cost as export_cost
    from attanchor_export.exporter import ExportOptions, export_artifact
    from attanchor_export.precision import streamed_weights

    original = streamed_weights._Quantized.part

    def broken(self, value, index):
        compute = original(self, value, index)
        return (lambda: compute() * 4) if index == 1 else compute  # index 1: the scales

    monkeypatch.setattr(streamed_weights._Quantized, "part", broken)
    monkeypatch.setattr(export_cost, "FP32_SESSION_FACTOR", 1 << 30)  # the fp32 decoder "does not fit"
    with pytest.raises(gate.AccuracyGateFailed) as info:
        export_artifact(str(checkpoint("siglip-qwen2")), ExportOptions(output=tmp_path / "art", memory_budget=0.5,
                                                                       quant="int4"))
    assert "logits cosine mean" in str(info.value) and "\n" not in str(info.value)
    assert info.value.precision.gate.set["reference"].startswith("PyTorch fp32 (streamed), teacher-forced")
    assert all(r.cos_mean < RANDOM_CHECKPOINT_FLOORS["int4"]["cos_mean"] for r in info.value.results)
    assert not (tmp_path / "art").exists()
