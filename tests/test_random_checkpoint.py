"""scripts/make_random_checkpoint.py: shard-by-shard random checkpoints load as the model they describe."""

from __future__ import annotations

import json

import torch
from helpers import load_script


def _script():
    return load_script("make_random_checkpoint")


def test_shards_load_with_transformers(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from attanchor_export.load.tiny_random import tiny_llava_config

    script = _script()
    config = tiny_llava_config("clip-llama")
    shapes = script.parameter_shapes(config)
    total = script.write_shards(shapes, tmp_path, torch.float16, seed=3, std=0.02, shard_bytes=64 << 10,
                                log=lambda *_: None)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == {name for name, _ in shapes}
    config.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16)
    state = model.state_dict()
    for name, shape in shapes:
        expected = script.random_tensor(name, shape, torch.float16, seed=3, std=0.02)
        assert torch.equal(state[name], expected), name
    weight = state["model.language_model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.015 < float(weight.std()) < 0.025  # transformers' own init scale, not ones or zeros


def test_weights_do_not_depend_on_shard_size(tmp_path):
    from safetensors.torch import load_file

    from attanchor_export.load.tiny_random import tiny_llava_config

    script = _script()
    shapes = script.parameter_shapes(tiny_llava_config("siglip-qwen2"))
    for size, folder in ((16 << 10, tmp_path / "a"), (1 << 30, tmp_path / "b")):
        folder.mkdir()
        script.write_shards(shapes, folder, torch.bfloat16, seed=0, std=0.02, shard_bytes=size, log=lambda *_: None)
    a = {k: v for f in sorted((tmp_path / "a").glob("*.safetensors")) for k, v in load_file(f).items()}
    (b,) = [load_file(f) for f in (tmp_path / "b").glob("*.safetensors")]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
