"""Qwen2.5-VL family graphs: vision, embedding (AnchorInsert + 3-D positions) and decoder, each against
its reference, and the three chained in onnxruntime against transformers' generate (no anchors) and
against the PyTorch model fed the contract's anchored inputs (anchors), single prompts and a ragged batch.

The graphs are exported once per module from the tiny random checkpoint (~30 s).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from attanchor_graphs.specification import anchor_insert
from attanchor_runtime.batch import left_pad
from attanchor_runtime.families import qwen2_5_vl as rt
from attanchor_runtime.image_placeholders import collapse_image_runs
from qwen_helpers import contract_positions, greedy_from_layout, pil_image

from attanchor_export.families import family_for  # noqa: E402
from attanchor_export.families import qwen2_5_vl as fam  # noqa: E402
from attanchor_export.load.hf_compat import cache_kwargs  # noqa: E402
from attanchor_export.load.tiny_qwen2_5_vl import tiny_qwen_image_processor  # noqa: E402
from attanchor_export.options import ARTIFACT_IR_VERSION, DEFAULT_OPSET  # noqa: E402
from attanchor_export.trace.decoder import export_decoder  # noqa: E402
from attanchor_export.trace.embedding import build_embedding_model, write_embed_table  # noqa: E402
from attanchor_export.trace.vision import export_vision  # noqa: E402

QUESTIONS = ["What color is the car?", "How many people are there in the picture on the left?", "Is it day?"]
EMBEDDINGS = {"t2i": ("t2i", None), "i2t": ("i2t", None), "t2i-k3": ("t2i", 3), "i2t-k4": ("i2t", 4)}
SIZES = {"112x112": (112, 112), "84x140": (84, 140)}
NEW_TOKENS = 8


class Exported:
    def __init__(self, model, tokenizer, folder):
        self.model, self.tokenizer, self.folder = model, tokenizer, folder
        self.config = model.config
        self.grids = {name: fam.image_grid(model.config, *size) for name, size in SIZES.items()}
        self.dims = fam.model_dims(model.config, self.grids["112x112"])
        self.table = model.model.language_model.embed_tokens.weight.detach().numpy()
        self.sessions = {}

    def session(self, name):
        if name not in self.sessions:
            self.sessions[name] = ort.InferenceSession(str(self.folder / name), providers=["CPUExecutionProvider"])
        return self.sessions[name]


@pytest.fixture(scope="module")
def exported(qwen_checkpoint, tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_checkpoint).eval()
    folder = tmp_path_factory.mktemp("qwen-graphs")
    out = Exported(model, AutoTokenizer.from_pretrained(qwen_checkpoint), folder)
    table = write_embed_table(out.table, folder)
    family = family_for(model.config)  # the family seam's builders, as the exporter runs them
    for size, hw in SIZES.items():
        family.configure(image_size=hw)
        graphs = family.graph_specs(None, False)
        export_vision(family, model, graphs.vision, folder / f"vision-{size}.onnx", DEFAULT_OPSET)
        onnx.checker.check_model(str(folder / f"vision-{size}.onnx"))
        for name, (mode, budget) in EMBEDDINGS.items():
            spec = family.graph_specs(budget, False).embedding
            graph = build_embedding_model(family, spec, table, out.config.image_token_id, mode, budget,
                                          ARTIFACT_IR_VERSION)
            path = folder / f"embedding-{name}-{size}.onnx"
            path.write_bytes(graph.SerializeToString())
            onnx.checker.check_model(str(path))  # by path: the table is external data (embed_tokens.bin)
    family.configure(image_size=SIZES["112x112"])
    export_decoder(family.language_model(model), family.lm_head(model), family.dims,
                   family.graph_specs(None, False).decoder, folder / "decoder.onnx", DEFAULT_OPSET)
    onnx.checker.check_model(str(folder / "decoder.onnx"))
    return out


def empty_past(dims, batch):
    return {f"past_key_values.{i}.{kv}": np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), np.float32)
            for i in range(dims.num_layers) for kv in ("key", "value")}


def _prompt(tokenizer, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _processor_inputs(exported, questions, size="112x112", seed=0):
    grid = exported.grids[size]
    processor = tiny_qwen_image_processor(min_pixels=grid.height * grid.width, max_pixels=grid.height * grid.width)
    images = [pil_image(grid.height, grid.width, seed + i) for i in range(len(questions))]
    return fam.processor_inputs(exported.tokenizer, processor, [_prompt(exported.tokenizer, q) for q in questions],
                                images)


def _collapsed(exported, inputs):
    """The processor's rows with each image-pad run collapsed to one id, left padded again."""
    image_id = exported.config.image_token_id
    rows = [collapse_image_runs(r[m.astype(bool)], image_id)
            for r, m in zip(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())]
    return left_pad(rows, exported.tokenizer.pad_token_id)


@torch.no_grad()
def _hf_features(exported, inputs):
    out = exported.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return torch.cat(out.pooler_output)


# ------------------------------------------------------------------------------------------ per graph


@pytest.mark.parametrize("images", [1, 3])
@pytest.mark.parametrize("size", list(SIZES))
def test_vision_graph_matches_transformers(exported, size, images):
    """Traced with 2 images; checked with 1 and 3, against Qwen2_5_VLModel.get_image_features."""
    grid = exported.grids[size]
    session = exported.session(f"vision-{size}.onnx")
    rng = np.random.default_rng(images)
    pixels = rng.standard_normal((images * grid.num_patches, grid.patch_dim)).astype(np.float32)
    thw = torch.tensor([list(grid.grid_thw)] * images)
    want = _hf_features(exported, {"pixel_values": torch.from_numpy(pixels), "image_grid_thw": thw}).numpy()
    got = session.run(None, {"pixel_values": pixels})[0]
    assert got.shape == (images, grid.num_image_tokens, exported.dims.hidden_size)  # per image, as the embedding takes
    got = got.reshape(want.shape)
    assert want.shape == (images * grid.num_image_tokens, exported.dims.hidden_size)
    assert np.abs(got - want).max() <= 1e-4


def test_vision_encoder_has_windows_and_full_blocks(exported):
    encoder = fam.VisionEncoder(exported.model.model.visual, exported.grids["84x140"])
    windows = {tuple(row) for row in (encoder.window_bias == 0).numpy()}
    # 3x5 merged tokens in windows of 2x2 merged tokens: rows 2 + 1, columns 2 + 2 + 1, so 6 windows
    # of 4, 4, 2 / 2, 2, 1 merged tokens, 4 patches each.
    assert sorted(int(np.sum(w)) for w in windows) == [4, 8, 8, 8, 16, 16]
    assert encoder.full_blocks == {1, 3} and len(exported.model.model.visual.blocks) == 4


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
@pytest.mark.parametrize(("embedding", "threshold"), [
    ("t2i", 2.0), ("t2i", 0.1), ("t2i", 0.25), ("i2t", 0.15), ("t2i-k3", 0.1), ("i2t-k4", 0.1),
])
@pytest.mark.parametrize("size", list(SIZES))
def test_embedding_graph_matches_the_reference(exported, questions, embedding, threshold, size):
    """AnchorInsert's layout, the fused embeddings and the 3-D positions against the numpy specification
    (attanchor_graphs.specification + mrope_position_ids) and the slot-by-slot contract."""
    mode, budget = EMBEDDINGS[embedding]
    grid = exported.grids[size]
    ids, mask = _collapsed(exported, _processor_inputs(exported, questions, size))
    rng = np.random.default_rng(7)
    features = rng.standard_normal((len(questions), grid.num_image_tokens, exported.dims.hidden_size)).astype(np.float32)
    session = exported.session(f"embedding-{embedding}-{size}.onnx")
    embeds, out_mask, positions, gather = session.run(None, {
        "input_ids": ids, "text_attention_mask": mask, "image_features": features, "threshold": np.array(threshold, np.float32)})

    text = exported.table[ids]
    where = np.array([int(np.flatnonzero(r == exported.config.image_token_id)[0]) for r in ids])
    want_gather, want_mask = anchor_insert(text, features, mask, where, np.float32(threshold), mode=mode,
                                           max_anchors=budget)
    np.testing.assert_array_equal(gather, want_gather)
    np.testing.assert_array_equal(out_mask, want_mask)
    if threshold < 1:
        assert out_mask.sum() > len(questions) * (grid.num_image_tokens - 1) + mask.sum(), "the case must insert anchors"
    np.testing.assert_array_equal(embeds, np.concatenate([text, features], axis=1)[np.arange(len(ids))[:, None], gather])
    assert positions.shape == (3, *gather.shape) and positions.dtype == np.int64
    np.testing.assert_array_equal(positions, rt.mrope_position_ids(gather, out_mask, mask, where, grid.merged_hw, mode))
    np.testing.assert_array_equal(positions, contract_positions(gather, out_mask, mask, where, grid.merged_hw, mode))


@torch.no_grad()
def test_decoder_graph_matches_pytorch(exported):
    """Prefill and two cached steps at shapes the trace did not see (batch 1 and a left-padded batch of 3),
    real 3-D positions; logits and present KV compared on real positions (<= 1e-4)."""
    from transformers import DynamicCache

    session = exported.session("decoder.onnx")
    lm, head = exported.model.model.language_model, exported.model.lm_head
    layers = exported.dims.num_layers
    for questions in (QUESTIONS[:1], QUESTIONS):
        ids, mask = _collapsed(exported, _processor_inputs(exported, questions))
        text = exported.table[ids]
        features = _hf_features(exported, _processor_inputs(exported, questions)).numpy().reshape(len(ids), 16, -1)
        where = np.array([int(np.flatnonzero(r == exported.config.image_token_id)[0]) for r in ids])
        gather, out_mask = anchor_insert(text, features, mask, where, np.float32(0.15))
        embeds = np.concatenate([text, features], axis=1)[np.arange(len(ids))[:, None], gather]
        positions = rt.mrope_position_ids(gather, out_mask, mask, where, (4, 4))
        past = empty_past(exported.dims, len(ids))
        cache = DynamicCache(config=lm.config)
        feeds_mask, step_embeds, step_positions = out_mask, embeds, positions
        deltas = rt.rope_deltas(positions, out_mask)
        for step in range(3):
            out = session.run(None, {"inputs_embeds": step_embeds, "attention_mask": feeds_mask,
                                     "position_ids": step_positions, **past})
            hidden = lm(inputs_embeds=torch.from_numpy(step_embeds), attention_mask=torch.from_numpy(feeds_mask),
                        position_ids=torch.from_numpy(step_positions), use_cache=True, **cache_kwargs(lm, cache))
            want = head(hidden.last_hidden_state).numpy()
            real = feeds_mask[:, -step_embeds.shape[1]:].astype(bool)
            assert np.abs(out[0] - want)[real].max() <= 1e-4, f"logits, step {step}, batch {len(ids)}"
            kv_real = feeds_mask.astype(bool)[:, None, :, None]
            for i, layer in enumerate(cache.layers):
                for got, ref in ((out[1 + 2 * i], layer.keys), (out[2 + 2 * i], layer.values)):
                    assert np.abs(np.where(kv_real, got - ref.numpy(), 0)).max() <= 1e-4
            past = {f"past_key_values.{i}.{kv}": out[1 + 2 * i + j] for i in range(layers)
                    for j, kv in enumerate(("key", "value"))}
            token = out[0][:, -1].argmax(-1)
            step_embeds = exported.table[token][:, None]
            feeds_mask = np.concatenate([feeds_mask, np.ones((len(ids), 1), np.int64)], axis=1)
            step_positions = rt.decode_position_ids(deltas, feeds_mask)


# ------------------------------------------------------------------------------------------ end to end


def _onnx_generate(exported, inputs, threshold, embedding="t2i", size="112x112"):
    """vision.onnx -> embedding.onnx -> decoder.onnx, greedy, NEW_TOKENS tokens per row (no early stop),
    from exactly what the processor returns. Returns (tokens [B, NEW_TOKENS], gather_index, attention_mask,
    position_ids) of the prompt."""
    grid = exported.grids[size]
    batch = inputs["input_ids"].shape[0]
    pixels = rt.check_pixel_inputs(inputs["pixel_values"].numpy(), inputs["image_grid_thw"].numpy(), grid, batch)
    features = exported.session(f"vision-{size}.onnx").run(None, {"pixel_values": pixels})[0]
    ids, mask = _collapsed(exported, inputs)
    embeds, out_mask, positions, gather = exported.session(f"embedding-{embedding}-{size}.onnx").run(None, {
        "input_ids": ids, "text_attention_mask": mask, "threshold": np.array(threshold, np.float32),
        "image_features": features.reshape(batch, grid.num_image_tokens, -1)})
    decoder = exported.session("decoder.onnx")
    layers = exported.dims.num_layers
    past = empty_past(exported.dims, batch)
    deltas = rt.rope_deltas(positions, out_mask)
    feeds_mask, step_embeds, step_positions = out_mask, embeds, positions
    tokens = []
    for _ in range(NEW_TOKENS):
        out = decoder.run(None, {"inputs_embeds": step_embeds, "attention_mask": feeds_mask,
                                 "position_ids": step_positions, **past})
        past = {f"past_key_values.{i}.{kv}": out[1 + 2 * i + j] for i in range(layers) for j, kv in enumerate(("key", "value"))}
        token = out[0][:, -1].argmax(-1)
        tokens.append(token)
        step_embeds = exported.table[token][:, None]
        feeds_mask = np.concatenate([feeds_mask, np.ones((batch, 1), np.int64)], axis=1)
        step_positions = rt.decode_position_ids(deltas, feeds_mask)
    return np.stack(tokens, axis=1), gather, out_mask, positions


def _until_eos(row, eos_ids):
    row = list(row)
    ends = [k for k, t in enumerate(row) if t in eos_ids]
    return row[: ends[0] + 1] if ends else row


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
def test_end_to_end_without_anchors_equals_generate(exported, questions):
    inputs = _processor_inputs(exported, questions, seed=11)
    tokens, *_ = _onnx_generate(exported, inputs, threshold=2.0)
    with torch.no_grad():
        generated = exported.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    generated = generated[:, inputs["input_ids"].shape[1]:].numpy()
    eos = set(exported.model.generation_config.eos_token_id)
    for row, want in zip(tokens, generated):
        assert _until_eos(row, eos) == _until_eos(want, eos)
    assert len(_until_eos(tokens[0], eos)) >= 3, "too short to show anything: pick other questions or images"


@torch.no_grad()
def _torch_anchored_greedy(exported, inputs, gather, out_mask, mode):
    """The PyTorch reference of an anchored prompt: HF's own embeddings and image features gathered by the
    AnchorInsert layout, the contract's positions (contract_positions), HF's text model with a DynamicCache,
    step k at the largest prompt position + 1 + k."""
    model, lm = exported.model, exported.model.model.language_model
    ids, mask = _collapsed(exported, inputs)
    batch = len(ids)
    text = lm.embed_tokens(torch.from_numpy(ids))
    features = _hf_features(exported, inputs).reshape(batch, -1, text.shape[-1])
    both = torch.cat([text, features], dim=1)
    embeds = torch.gather(both, 1, torch.from_numpy(gather)[..., None].expand(-1, -1, both.shape[-1]))
    where = np.array([int(np.flatnonzero(r == exported.config.image_token_id)[0]) for r in ids])
    positions = contract_positions(gather, out_mask, mask, where, (4, 4), mode)
    return greedy_from_layout(model, embeds, out_mask, positions, NEW_TOKENS)


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
@pytest.mark.parametrize(("embedding", "threshold"), [("t2i", 0.15), ("i2t", 0.15), ("t2i-k3", 0.1)])
def test_end_to_end_with_anchors_equals_the_reference(exported, questions, embedding, threshold):
    inputs = _processor_inputs(exported, questions, seed=11)
    tokens, gather, out_mask, _ = _onnx_generate(exported, inputs, threshold, embedding)
    inserted = out_mask.sum(axis=1) - (inputs["attention_mask"].numpy().sum(axis=1))
    assert (inserted > 0).any(), "the case must insert anchors"
    want = _torch_anchored_greedy(exported, inputs, gather, out_mask, EMBEDDINGS[embedding][0])
    np.testing.assert_array_equal(tokens, want)
    plain, *_ = _onnx_generate(exported, inputs, threshold=2.0)
    assert not np.array_equal(tokens, plain), "anchors changed nothing: the case proves nothing"


def test_vision_encoder_takes_qwen2_vl_towers_too():
    """Qwen2-VL's tower (LayerNorm, quick-GELU MLP, no windows) runs through the same module."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 100.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14),
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    grid = fam.image_grid(config, 56, 84)
    encoder = fam.VisionEncoder(model.model.visual, grid)
    assert encoder.full_blocks == {0, 1}
    pixels = torch.randn(2 * grid.num_patches, grid.patch_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.cat(model.model.get_image_features(pixels, torch.tensor([list(grid.grid_thw)] * 2)).pooler_output)
        got = encoder(pixels)
    assert got.shape == want.shape == (12, 32)
    assert (got - want).abs().max() <= 1e-5
