"""Test-side references for the Qwen2.5-VL family, written independently of the code under test.

`contract_positions` places every slot of an AnchorInsert output by the contract's own words, using
the anchor pairs (which text token went after which patch) instead of the layout arithmetic that
attanchor_runtime.families.qwen2_5_vl.mrope_position_ids and the embedding graph use.

`check_equals_generate` and `check_equals_contract` are the end-to-end checks of an artifact exported
from a tiny random checkpoint (load/tiny_qwen2_5_vl.py), shared by both generations (test_qwen_runtime,
test_qwen2_vl): the runtime's tokens against transformers' `generate` without anchors, and against
`contract_reference` (the contract in PyTorch: AnchorInsert's numpy specification, transformers'
embeddings and image features, contract_positions, HF's text model with a DynamicCache) with anchors.
"""

from __future__ import annotations

import numpy as np
import torch
from attanchor_graphs.specification import anchor_insert, anchor_pairs, candidate_mask_from_ids
from attanchor_runtime.batch import left_pad
from attanchor_runtime.image_placeholders import collapse_image_runs
from PIL import Image

QUESTIONS = ["What color is the car?", "How many people are there in the picture on the left?", "Is it day?"]
NEW_TOKENS = 8
SIDE = 112  # the tiny checkpoints' processor: max_pixels = 112 * 112, so the default grid


def smooth_image(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """uint8 noise plus gradients: resampling filters see edges and smooth areas."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, channels)).astype(np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (255 * (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2)[..., None]
    return np.clip(0.5 * noise + 0.5 * ramp, 0, 255).astype(np.uint8)


def pil_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(smooth_image(height, width, seed), "RGB")


def contract_positions(gather_index, out_mask, text_mask, image_position, merged_hw, mode="t2i") -> np.ndarray:
    """[3, B, L] positions, slot by slot:
    - the original tokens are numbered as Qwen numbers an unbroken prompt: text before the image
      0..p-1 on all axes, merged patch m at (p, p + m // cols, p + m % cols), text after the image
      from p + max(rows, cols) on;
    - t2i: a copy of text n placed after patch m (anchor pair (n, m)) takes patch m's position;
      i2t: a copy of patch m placed after text n takes text n's position;
    - padding 0."""
    gather_index, out_mask = np.asarray(gather_index), np.asarray(out_mask)
    text_mask = np.asarray(text_mask)
    rows, cols = merged_hw
    m_total = rows * cols
    b, length = gather_index.shape
    t = text_mask.shape[1]
    pairs = anchor_pairs(gather_index, out_mask, t, mode)
    result = np.zeros((3, b, length), np.int64)
    for r in range(b):
        p = int(image_position[r])
        pre = [n for n in range(p) if text_mask[r, n]]
        post = [n for n in range(p + 1, t) if text_mask[r, n]]
        start = len(pre)
        place = {("text", n): (i, i, i) for i, n in enumerate(pre)}
        place.update({("image", m): (start, start + m // cols, start + m % cols) for m in range(m_total)})
        after = start + max(rows, cols)
        place.update({("text", n): (after + k,) * 3 for k, n in enumerate(post)})
        copies = list(pairs[r])  # in output order
        images_seen = 0
        slots = np.flatnonzero(out_mask[r])
        for j in slots:
            v = int(gather_index[r, j])
            if v >= t:
                images_seen += 1
                if mode == "i2t" and images_seen > m_total:  # a patch copy after a word
                    n, m = copies.pop(0)
                    assert m == v - t
                    pos = place[("text", n)]
                else:
                    pos = place[("image", v - t)]
            elif mode == "t2i" and images_seen and copies:
                # The image block holds every text copy (I_0, copies of 0, I_1, ...); the text after the
                # image follows it, so the first len(pairs) text slots after an image are the copies.
                n, m = copies.pop(0)
                assert n == v
                pos = place[("image", m)]
            else:
                pos = place[("text", v)]
            result[:, r, j] = pos
        assert not copies, f"row {r}: anchors {copies} not found in the output"
    return result


def decode_positions(prompt_positions: np.ndarray, out_mask: np.ndarray, step: int) -> np.ndarray:
    """[3, B, 1] position of the step-th new token (0 = the first): largest prompt position + 1 + step."""
    largest = np.where(np.asarray(out_mask)[None].astype(bool), prompt_positions, -1).max(axis=(0, 2))
    return np.broadcast_to((largest + 1 + step)[None, :, None], (3, largest.shape[0], 1)).astype(np.int64)


# ------------------------------------------------------------------- end to end, both generations


def processor_inputs(tokenizer, questions, seed=11) -> dict:
    """What transformers' processor returns for one SIDE x SIDE image per question (torch tensors)."""
    from attanchor_export.families.qwen2_5_vl import processor_inputs as hf_processor_inputs
    from attanchor_export.load.tiny_qwen2_5_vl import tiny_qwen_image_processor

    processor = tiny_qwen_image_processor(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                             tokenize=False, add_generation_prompt=True) for q in questions]
    images = [pil_image(SIDE, SIDE, seed + i) for i in range(len(questions))]
    return hf_processor_inputs(tokenizer, processor, prompts, images)


def run(pipe, inputs, threshold):
    return pipe.generate(input_ids=inputs["input_ids"].numpy(), attention_mask=inputs["attention_mask"].numpy(),
                         pixel_values=inputs["pixel_values"].numpy(), image_grid_thw=inputs["image_grid_thw"].numpy(),
                         max_new_tokens=NEW_TOKENS, threshold=threshold)


def until_eos(row, eos_ids):
    row = [int(t) for t in row]
    ends = [k for k, t in enumerate(row) if t in eos_ids]
    return row[: ends[0] + 1] if ends else row


def check_equals_generate(model, tokenizer, pipe, questions) -> None:
    """Without anchors (threshold above 1) the runtime's tokens equal transformers' `generate`."""
    inputs = processor_inputs(tokenizer, questions)
    out = run(pipe, inputs, threshold=2.0)
    assert all(not row for row in out.anchors)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    eos = set(model.generation_config.eos_token_id)
    for got, ref in zip(out.tokens, want.numpy(), strict=True):
        assert until_eos(got, eos) == until_eos(ref, eos)
    assert len(until_eos(out.tokens[0], eos)) >= 3, "too short to show anything: pick other questions or images"


def check_equals_contract(model, tokenizer, pipe, questions, threshold=0.1) -> None:
    """With anchors the runtime's tokens and anchor pairs equal contract_reference's, and differ from none."""
    inputs = processor_inputs(tokenizer, questions)
    out = run(pipe, inputs, threshold)
    want, pairs = contract_reference(model, inputs, threshold, pipe.manifest.anchor.excluded_token_ids)
    assert all(pairs), "every row must get anchors, or the case proves nothing"
    ids = inputs["input_ids"].numpy()
    assert [sorted((int(ids[b, n]), m) for n, m in row) for b, row in enumerate(out.anchors)] == pairs
    eos = set(model.generation_config.eos_token_id)
    for got, ref in zip(out.tokens, want, strict=True):
        assert until_eos(got, eos) == until_eos(ref, eos)
    plain = run(pipe, inputs, threshold=2.0)
    assert not np.array_equal(out.tokens, plain.tokens), "anchors changed nothing: the case proves nothing"


@torch.no_grad()
def contract_reference(model, inputs, threshold, excluded):
    """(tokens [B, NEW_TOKENS], anchor pairs per row as (token id, patch)) of the contract, in PyTorch."""
    lm = model.model.language_model
    image_id = model.config.image_token_id
    rows = [collapse_image_runs(r[m.astype(bool)], image_id)
            for r, m in zip(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), strict=True)]
    ids, mask = left_pad(rows, model.config.text_config.pad_token_id)
    text = lm.embed_tokens(torch.from_numpy(ids))
    features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    features = features.reshape(len(ids), -1, text.shape[-1])
    where = np.array([int(np.flatnonzero(r == image_id)[0]) for r in ids])
    gather, out_mask = anchor_insert(text.numpy(), features.numpy(), mask, where, np.float32(threshold),
                                     candidate_mask=candidate_mask_from_ids(ids, excluded))
    both = torch.cat([text, features], dim=1)
    embeds = torch.gather(both, 1, torch.from_numpy(gather)[..., None].expand(-1, -1, both.shape[-1]))
    positions = contract_positions(gather, out_mask, mask, where, (SIDE // 28, SIDE // 28))
    pairs = [sorted((int(ids[b, n]), m) for n, m in row) for b, row in enumerate(anchor_pairs(gather, out_mask, ids.shape[1], "t2i"))]
    return greedy_from_layout(model, embeds, out_mask, positions), pairs


@torch.no_grad()
def greedy_from_layout(model, embeds, out_mask, positions, new_tokens: int = NEW_TOKENS) -> np.ndarray:
    """Greedy tokens [B, new_tokens] of HF's text model + lm_head over an anchored layout (embeds, its mask, the
    contract's prompt positions), with a DynamicCache; step k at decode_positions(positions, out_mask, k)."""
    from transformers import DynamicCache

    from attanchor_export.load.hf_compat import cache_kwargs

    lm = model.model.language_model
    cache, attention, step_positions = DynamicCache(config=lm.config), torch.from_numpy(out_mask), positions
    tokens = []
    for k in range(new_tokens):
        hidden = lm(inputs_embeds=embeds, attention_mask=attention, position_ids=torch.from_numpy(step_positions),
                    use_cache=True, **cache_kwargs(lm, cache)).last_hidden_state
        token = model.lm_head(hidden[:, -1]).argmax(-1)
        tokens.append(token.numpy())
        embeds = lm.embed_tokens(token[:, None])
        attention = torch.cat([attention, torch.ones(len(out_mask), 1, dtype=attention.dtype)], dim=1)
        step_positions = decode_positions(positions, out_mask, k)
    return np.stack(tokens, axis=1)
