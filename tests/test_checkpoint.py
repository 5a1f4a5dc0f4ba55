"""Loading checkpoints: aliases, local folders, the offline Hub cache, and every way it can fail.

Downloading from the Hub is tested in test_hub_download.py."""

import shutil
import socket
import time

import pytest
import torch

from attanchor_export.errors import CheckpointError, UnsupportedArchitecture
from attanchor_export.families import family_for
from attanchor_export.families.llava import Llava
from attanchor_export.load.checkpoint import ALIASES, load_checkpoint, resolve_model
from attanchor_export.load.tiny_random import FAMILIES, make_tiny_llava, tinyllava_1b_config

EXPECTED = {  # family -> (M image tokens, image size, tied lm_head)
    "clip-llama": (25, 30, False),
    "siglip-qwen2": (16, 32, True),
    "clip-mistral": (25, 30, False),
}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, checkpoint):
    return request.param, checkpoint(request.param)


def test_load_tiny_folder(tiny):
    family, folder = tiny
    loaded = load_checkpoint(str(folder))
    m, size, tied = EXPECTED[family]
    assert isinstance(loaded.family, Llava)
    assert not loaded.model.training
    assert loaded.source == str(folder.resolve()) and loaded.folder == folder.resolve()
    assert loaded.commit is None and loaded.alias is None
    assert loaded.processor_folder == folder.resolve()
    assert next(loaded.model.parameters()).dtype == torch.float32
    d = loaded.dims
    assert (d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim) == (64, 2, 4, 2, 16)
    assert (d.image_tokens, d.image_size, d.tie_word_embeddings) == (m, size, tied)
    t = loaded.tokens
    assert (t.bos_token_id, t.eos_token_ids) == (1, (2,))
    assert d.vocab_size == loaded.model.config.text_config.vocab_size
    assert t.image_token_id == loaded.model.config.image_token_id


def test_tiny_folder_has_processor_and_chat_template(tiny):
    from transformers import AutoProcessor, AutoTokenizer

    family, folder = tiny
    processor, tokenizer = AutoProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is in the image?\nASSISTANT:"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + prompt
    # The processor expands one <image> into exactly M tokens, which is what HF generate needs.
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))
    batch = processor(images=image, text=prompt, return_tensors="pt")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == EXPECTED[family][0]
    assert batch["pixel_values"].shape[-2:] == (EXPECTED[family][1],) * 2


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = make_tiny_llava(tmp_path / "a", "siglip-qwen2", seed=3)
    b = make_tiny_llava(tmp_path / "b", "siglip-qwen2", seed=3)
    c = make_tiny_llava(tmp_path / "c", "siglip-qwen2", seed=4)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_aliases_and_ids_resolve_without_network(tmp_path):
    assert resolve_model("tinyllava-1b") == ("bczhou/tiny-llava-v1-hf", "tinyllava-1b")
    assert resolve_model("llava-1.5-7b") == ("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b")
    assert resolve_model("qwen2.5-vl-3b") == ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-3b")
    assert set(ALIASES) == {"tinyllava-1b", "llava-1.5-7b", "qwen2.5-vl-3b"}
    assert resolve_model("someone/some-model") == ("someone/some-model", None)
    assert resolve_model(str(tmp_path)) == (str(tmp_path.resolve()), None)
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_model("not-a-model")


def test_uncached_hub_id_offline_fails_at_once_with_one_line(tmp_path, monkeypatch):
    # Downloads are in test_hub_download.py; offline, a missing model must fail without any network.
    attempts = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("tinyllava-1b", cache_dir=tmp_path, offline=True)
    assert time.monotonic() - start < 5
    assert attempts == []
    message = str(info.value)
    assert "\n" not in message
    assert "bczhou/tiny-llava-v1-hf is not in the local Hugging Face cache" in message
    assert "`hf download bczhou/tiny-llava-v1-hf`" in message and "local folder" in message
    assert "huggingface-cli" not in message  # gone in huggingface_hub 2.x


def test_hub_id_loads_from_local_cache_snapshot(tiny, tmp_path):
    # The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}
    _, folder = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-llava"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_checkpoint("acme/tiny-llava", cache_dir=tmp_path, offline=True)
    assert loaded.source == "acme/tiny-llava" and loaded.commit == commit
    assert loaded.folder == repo / "snapshots" / commit
    with pytest.raises(CheckpointError, match="at revision v2 is not in the local"):
        load_checkpoint("acme/tiny-llava", cache_dir=tmp_path, revision="v2", offline=True)


def test_folder_without_weights(tiny, tmp_path):
    _, folder = tiny
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=f"no weights in {tmp_path}"):
        load_checkpoint(str(tmp_path))


def test_revision_with_a_folder_is_an_error(tiny):
    with pytest.raises(CheckpointError, match="applies to Hub ids"):
        load_checkpoint(str(tiny[1]), revision="main")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json in"):
        load_checkpoint(str(tmp_path))


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture) as info:
        load_checkpoint(str(tmp_path))
    assert str(info.value) == ("unsupported architecture LlamaForCausalLM; supported: LlavaForConditionalGeneration, "
                               "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration")


def test_unsupported_vision_tower_is_reported():
    config = tinyllava_1b_config()
    config.vision_config.model_type = "dinov2"  # what family_for looks at
    with pytest.raises(UnsupportedArchitecture, match="unsupported vision tower dinov2"):
        family_for(config)


def test_remote_code_is_not_run_by_default(tmp_path):
    marker = tmp_path / "EXECUTED"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "xcustom", "architectures": ["XForCausalLM"],'
        ' "auto_map": {"AutoConfig": "configuration_x.XConfig"}}'
    )
    (model / "configuration_x.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('yes')\n"
        "from transformers import PretrainedConfig\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'xcustom'\n"
    )
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        load_checkpoint(str(model))
    assert not marker.exists()


def test_trust_remote_code_is_false_unless_asked(tiny, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    seen = []
    original = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    load_checkpoint(str(tiny[1]))
    assert seen == [False]


def test_tinyllava_1b_dims_without_weights():
    family = family_for(tinyllava_1b_config())
    d, t = family.dims, family.tokens
    assert (d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim) == (2048, 22, 32, 4, 64)
    assert (d.vocab_size, t.image_token_id, t.pad_token_id, d.max_position_embeddings) == (32064, 32000, 32001, 2048)
    assert (d.image_tokens, d.image_size, d.patch_size, d.vision_hidden_size) == (576, 336, 14, 1024)
