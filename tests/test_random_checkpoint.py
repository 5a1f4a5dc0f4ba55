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


def test_qwen_3b_dims_are_the_hub_model():
    """qwen2.5-vl-3b: Qwen2.5-VL-3B-Instruct's parameter count to the last one (its safetensors index:
    7,509,245,952 bytes of bf16), the tied lm_head stored once, the exporter's dims."""
    from attanchor_export.families import family_for
    from attanchor_export.load.tiny_random import REAL_DIMS

    config = REAL_DIMS["qwen2.5-vl-3b"]()
    shapes = dict(_script().parameter_shapes(config))
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 3_754_622_976
    assert "lm_head.weight" not in shapes and shapes["model.language_model.embed_tokens.weight"] == (151936, 2048)
    family = family_for(config)
    family.configure(image_size=(448, 448))
    dims = family.dims
    assert (dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (36, 2048, 16, 2, 128)
    assert (dims.vocab_size, dims.image_tokens, dims.tie_word_embeddings) == (151936, 256, True)


def test_qwen_checkpoint_loads_as_the_model_it_describes(qwen_dims_checkpoint):
    """The 3B layout written by the script (reduced sizes, real vocabulary and special ids): transformers loads
    every tensor the script drew, the tokenizer's special ids are the config's, and the processor gives the
    export a 448x448 grid."""
    from attanchor_runtime.tokenizer import load_tokenizer
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from attanchor_export.load.checkpoint import load_checkpoint

    script, folder = _script(), qwen_dims_checkpoint
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float16)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    state = model.state_dict()
    for name in index["weight_map"]:
        expected = script.random_tensor(name, tuple(state[name].shape), torch.float16, seed=0, std=0.02)
        assert torch.equal(state[name], expected), name
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()

    config, tokenizer = model.config, AutoTokenizer.from_pretrained(folder)
    want = [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]
    assert want == [151652, 151655, 151653]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the car?"}]}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt)["input_ids"]
    start = ids.index(want[0])
    assert ids[start:start + 3] == want and config.text_config.eos_token_id in ids  # <|im_end|> 151645
    assert max(ids) < config.text_config.vocab_size and tokenizer.decode(ids) == prompt
    runtime, _, _ = load_tokenizer(folder)  # the torch-free runtime reads the same ids
    assert runtime.encode(prompt).ids == ids

    loaded = load_checkpoint(str(folder))
    assert (loaded.family.grid.height, loaded.family.grid.width, loaded.dims.image_tokens) == (448, 448, 256)
    floors = json.loads((folder / "attanchor_config.json").read_text())["gate_floors"]
    assert floors == script.BENCHMARK_FLOORS
    assert not folder.with_name(folder.name + ".partial").exists()
