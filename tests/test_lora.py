"""`--adapter` merges a peft LoRA adapter before export; check re-applies it; a wrong one fails
with one line. The LoRA weights are random (init_lora_weights=False), so the adapter changes the logits."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import peft  # noqa: F401  (the [export] extra: a broken install fails here, it does not skip)
import pytest
import torch
from attanchor_runtime.manifest import AdapterRecord, Manifest
from click.testing import CliRunner
from helpers import read_manifest

from attanchor_export.cli import main
from attanchor_export.errors import CheckpointError

LM_TARGETS = r".*language_model.*\.(q_proj|v_proj)"  # the CLIP tower has q_proj/v_proj too: LM only


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def make_lora(base, out, against="model", seed=1):
    """A random LoRA on the language model's q_proj/v_proj of the checkpoint at `base`, saved to `out`.

    against="model": saved against the whole LlavaForConditionalGeneration; "language_model": against
    llava.model.language_model (e.g. LlamaModel), as a text-only fine-tune of the same weights would be.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base)
    torch.manual_seed(seed)
    if against == "model":
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS,
                                                      init_lora_weights=False))
    else:
        peft_model = get_peft_model(model.model.language_model,
                                    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def merged_model(base, lora):
    """The reference, built with peft directly (not through attanchor_export.load.lora)."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base).eval()
    return PeftModel.from_pretrained(model, lora).merge_and_unload().eval()


def _edit_adapter(src, dst, rename=None, reshape=None, config=None):
    """Copy an adapter, renaming keys / replacing tensor shapes / overriding adapter_config fields."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    state = load_file(str(src / "adapter_model.safetensors"))
    if rename:
        state = {rename(k): v for k, v in state.items()}
    if reshape:
        state = {k: reshape(k, v) for k, v in state.items()}
    save_file(state, str(dst / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def lora(checkpoint, tmp_path_factory):
    return make_lora(checkpoint("clip-llama"), tmp_path_factory.mktemp("lora") / "clip-lora")


@pytest.fixture(scope="module")
def adapted(checkpoint, lora, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapted") / "art"
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--adapter", lora, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def _decoder_logits_ort(folder, embeds, mask, positions):
    import onnxruntime as ort

    manifest = Manifest.load(folder)
    dims = manifest.dims
    session = ort.InferenceSession(str(manifest.graph_path("decoder")), providers=["CPUExecutionProvider"])
    empty = np.zeros((embeds.shape[0], dims.num_kv_heads, 0, dims.head_dim), np.float32)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
    feeds.update({i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values.")})
    return session.run(["logits"], feeds)[0]


@torch.no_grad()
def _decoder_logits_torch(model, embeds, mask, positions):
    out = model.model.language_model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                                     position_ids=torch.from_numpy(positions), use_cache=False)
    return model.lm_head(out.last_hidden_state).numpy()


def test_exported_decoder_is_the_merged_model_not_the_base(adapted, checkpoint, lora):
    from transformers import LlavaForConditionalGeneration

    manifest = read_manifest(adapted)
    assert manifest["validation"]["passed"] is True
    assert any(c["graph"] == "decoder" for c in manifest["validation"]["checks"])
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((2, 7, manifest["dims"]["hidden_size"])).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0  # one left-padded row
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    got = _decoder_logits_ort(adapted, embeds, mask, positions)
    valid = mask.astype(bool)
    merged = _decoder_logits_torch(merged_model(checkpoint("clip-llama"), lora), embeds, mask, positions)
    base = _decoder_logits_torch(LlavaForConditionalGeneration.from_pretrained(checkpoint("clip-llama")).eval(),
                                 embeds, mask, positions)
    assert np.abs(got - merged)[valid].max() <= 1e-4
    assert np.abs(got - base)[valid].max() > 0.1  # the adapter is really in the graph


def test_manifest_records_adapter_source_and_hash(adapted, lora):
    record = read_manifest(adapted)["source"]["adapter"]
    assert record["source"] == str(lora) and record["applies_to"] == "model" and record["commit"] is None
    files = {n: hashlib.sha256((lora / n).read_bytes()).hexdigest()
             for n in ("adapter_config.json", "adapter_model.safetensors")}
    assert record["files"] == files
    listing = "".join(f"{h}  {n}\n" for n, h in sorted(files.items()))  # = sha256sum FILES | sha256sum
    assert record["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert record["r"] == 4 and record["modules"] == 4  # q_proj + v_proj in each of 2 layers


def test_check_reapplies_the_recorded_adapter(adapted):
    # Without the merge, check would compare the merged graphs with the plain base model and fail.
    result = run_cli("check", adapted)
    assert result.exit_code == 0, result.output
    assert "checks passed" in result.output


def test_check_refuses_a_different_adapter(adapted, checkpoint, tmp_path):
    other = make_lora(checkpoint("clip-llama"), tmp_path / "other", seed=7)
    result = run_cli("check", adapted, "--adapter", other, "--quiet")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: adapter {other} is not the one the artifact was exported with")


def test_adapter_saved_against_the_bare_language_model(checkpoint, tmp_path):
    from attanchor_export.exporter import ExportOptions, export_artifact

    lora = make_lora(checkpoint("siglip-qwen2"), tmp_path / "lm-lora", against="language_model")
    result = export_artifact(str(checkpoint("siglip-qwen2")),
                             ExportOptions(output=tmp_path / "art", adapter=str(lora)))
    assert result.passed and result.manifest.source.adapter.applies_to == "language_model"


def _wrong_adapters(checkpoint, lora, tmp):
    """name -> (adapter folder, what the one error line must say)."""
    yield "other-base", make_lora(checkpoint("siglip-qwen2"), tmp / "siglip-lora"), "another base model"
    unknown_base = {"base_model_name_or_path": "/nowhere/else"}  # a base path not on this machine proves nothing
    yield "other-dims", _edit_adapter(
        lora, tmp / "dims", config=unknown_base,
        reshape=lambda k, v: torch.zeros(v.shape[0], 48) if "q_proj.lora_A" in k else v,
    ), "is Linear 64->64, but the adapter's lora_A.weight is 4x48"
    yield "missing-modules", _edit_adapter(
        lora, tmp / "missing", config=unknown_base, rename=lambda k: k.replace("layers.1.", "layers.5."),
    ), "targets modules this checkpoint lacks: model.language_model.layers.5.self_attn.q_proj and 1 more"
    pickled = tmp / "pickled"
    pickled.mkdir()
    shutil.copy(lora / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    yield "pickled", pickled, "has only a pickled adapter_model.bin"
    yield "no-such-folder", tmp / "absent", "no such folder"


def test_wrong_adapters_fail_with_one_line(checkpoint, lora, tmp_path):
    for name, adapter, says in _wrong_adapters(checkpoint, lora, tmp_path):
        out = tmp_path / f"out-{name}"
        result = run_cli(checkpoint("clip-llama"), "-o", out, "--adapter", adapter, "--no-validate", "--quiet")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (name, result.output)
        assert lines[0].startswith(f"error: adapter {adapter}") and says in lines[0], (name, lines[0])
        assert not out.exists()


def test_hub_adapter_from_the_cache_offline(lora, tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache layout; offline and not cached: one line."""
    import huggingface_hub.constants as hub_constants

    from attanchor_export.load.lora import locate_adapter

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--me--tiny-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(lora, repo / "snapshots" / commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    located = locate_adapter("me/tiny-lora", offline=True)
    assert located.commit == commit and located.weights.name == "adapter_model.safetensors"
    with pytest.raises(CheckpointError, match=r"^cannot fetch adapter me/absent \(offline: not in the local"):
        locate_adapter("me/absent", offline=True)


def test_pickled_adapter_is_read_only_when_allowed(lora, tmp_path):
    from safetensors.torch import load_file

    from attanchor_export.load.lora import locate_adapter

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora / "adapter_config.json", pickled)
    torch.save(load_file(str(lora / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        locate_adapter(str(pickled))
    located = locate_adapter(str(pickled), allow_pickle=True)
    assert located.weights.name == "adapter_model.bin"
    # check DIR of an artifact exported with it may read it again: the recorded hash vouches for the file
    record = AdapterRecord(source=str(pickled), resolved=str(pickled), sha256=located.sha256,
                           files={"adapter_model.bin": "x"})
    assert locate_adapter(str(pickled), expect=record).weights.name == "adapter_model.bin"
