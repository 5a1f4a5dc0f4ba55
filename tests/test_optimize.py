"""The grouped-attention rewrite of decoder.onnx (attanchor_graphs.attention_pass, run by
attanchor_export.trace.optimize) keeps parity and position ids."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import pytest
import torch

from attanchor_export.families import family_for
from attanchor_export.families.base import decoder_spec
from attanchor_export.load.tiny_random import tiny_llava_config
from attanchor_export.source_model import DecoderWithCache
from attanchor_export.trace.decoder import export_decoder
from attanchor_export.trace.decoder_parity import decoder_parity
from attanchor_export.trace.optimize import optimize_decoder


def _language_model(family):
    from transformers import AutoModelForCausalLM

    config = tiny_llava_config(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config.text_config).eval()
    with torch.no_grad():  # a larger std than the 0.02 init, so attention patterns are far from uniform
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model, family_for(config).dims


@pytest.fixture(scope="module", params=[("clip-llama", False), ("clip-llama", True), ("siglip-qwen2", False)],
                ids=lambda p: f"{p[0]}-{'last' if p[1] else 'all'}-logits")
def exported(request, tmp_path_factory):
    family, last = request.param
    model, dims = _language_model(family)
    folder = tmp_path_factory.mktemp(f"dec-{family}-{int(last)}")
    path = folder / "decoder.onnx"
    export_decoder(model.model, model.lm_head, dims, decoder_spec(dims, last), path, 18)
    shutil.copy(path, folder / "original.onnx")  # same folder: shares decoder.onnx.data
    return model, dims, path, last


@pytest.fixture(scope="module")
def optimized(exported):
    model, dims, path, last = exported
    data = path.with_name("decoder.onnx.data")
    before = (data.stat().st_size, data.stat().st_mtime_ns) if data.exists() else None
    report = optimize_decoder(path, dims, check=True)
    after = (data.stat().st_size, data.stat().st_mtime_ns) if data.exists() else None
    return model, dims, path, last, report, before == after


def test_every_layer_rewritten_and_parity_with_original(optimized):
    _, dims, path, _, report, data_untouched = optimized
    assert report["attention"]["layers"] == dims.num_layers
    assert report["attention"]["skipped"] == []
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert set(report["parity"]["cases"]) == {"batch1", "batch3-left-padded"}
    assert data_untouched, "weights (external data) must not be rewritten"
    onnx.checker.check_model(str(path))


def test_no_repeated_kv_no_nan_guard_position_ids_kept(optimized):
    _, dims, path, *_ = optimized
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["IsNaN"] == 0
    assert ops["Softmax"] == dims.num_layers
    assert ops["Tile"] == 1  # one mask tile shared by all layers
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), "standard ops only (TensorRT reads this file)"
    # repeat_kv is gone: no Expand reads a present/past tensor any more.
    produced_by = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Expand":
            src = produced_by.get(node.input[0])
            assert src is None or not any("present" in i for i in src.input)
    assert "position_ids" in [i.name for i in graph.input]
    assert any("position_ids" in n.input for n in graph.node), "explicit position ids must stay in use"


def _torch_reference(model, embeds, mask, pos, past, last):
    module = DecoderWithCache(model.model, model.lm_head, model.config.num_hidden_layers, last).eval()
    with torch.no_grad():
        out = module(torch.from_numpy(embeds), torch.from_numpy(mask), torch.from_numpy(pos),
                     [torch.from_numpy(t) for t in past])
    return [t.numpy() for t in out]


@pytest.mark.parametrize("lengths,past_len", [([9], 0), ([6, 12, 9], 0), ([6, 12, 9], 4)])
def test_parity_with_torch(optimized, lengths, past_len):
    """Rewritten graph vs the PyTorch module on untraced shapes, left-padded batches, with a past."""
    from attanchor_runtime.sessions import ort_session

    model, dims, path, last, *_ = optimized
    rng = np.random.default_rng(len(lengths) * 10 + past_len)
    batch, width = len(lengths), max(lengths) + past_len
    mask = np.zeros((batch, width), np.int64)
    for b, n in enumerate(lengths):
        mask[b, width - n - past_len:] = 1
    pos_all = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)
    seq = width - past_len
    embeds = rng.standard_normal((batch, seq, dims.hidden_size)).astype(np.float32)
    past = [rng.standard_normal((batch, dims.num_kv_heads, past_len, dims.head_dim)).astype(np.float32)
            for _ in range(2 * dims.num_layers)]
    pos = pos_all[:, past_len:]
    session = ort_session(path)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
    feeds.update({f"past_key_values.{i}.{k}": past[2 * i + j] for i in range(dims.num_layers)
                  for j, k in enumerate(("key", "value"))})
    got = session.run(None, feeds)
    ref = _torch_reference(model, embeds, mask, pos, past, last)
    rows = mask[:, -got[0].shape[1]:].astype(bool)
    assert np.abs(got[0] - ref[0])[rows].max() <= 1e-4
    valid = mask.astype(bool)[:, None, :, None]
    for a, b in zip(got[1:], ref[1:]):
        assert np.abs(a - b)[np.broadcast_to(valid, a.shape)].max() <= 1e-4


def test_second_run_changes_nothing(optimized, tmp_path):
    _, dims, path, *_ = optimized
    copy = path.with_name("again.onnx")
    shutil.copy(path, copy)
    report = optimize_decoder(copy, dims)
    assert report["attention"]["layers"] == 0
    assert decoder_parity(path, copy, dims)["max_abs_diff"] == 0.0


def test_failed_check_keeps_the_original(exported, monkeypatch):
    import attanchor_export.trace.optimize as opt

    _, dims, path, _ = exported
    probe = path.with_name("probe.onnx")
    shutil.copy(path.with_name("original.onnx"), probe)
    before = probe.read_bytes()
    monkeypatch.setattr(opt, "decoder_parity", lambda *a, **k: {"max_abs_diff": 1.0, "cases": {}})
    with pytest.raises(ValueError, match="differs from the original"):
        opt.optimize_decoder(probe, dims, check=True)
    assert probe.read_bytes() == before
    assert not probe.with_name("probe.onnx.optimizing").exists()
