"""The source model run in PyTorch (attanchor_export.source_model) against transformers itself and
against the anchored layout docs/CONTRACTS.md specifies."""

import numpy as np
import pytest
import torch

from attanchor_export.load.checkpoint import load_checkpoint
from attanchor_export.load.tiny_random import FAMILIES, make_tiny_llava
from attanchor_export.source_model import (
    anchored_inputs,
    expand_image_tokens,
    greedy_generate,
    image_features,
    teacher_forced_logits,
)

PROMPTS = [
    "USER: <image>\nWhat is in the image?\nASSISTANT:",
    "USER: <image>\nWhat color is the car on the left of the picture?\nASSISTANT:",
]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    from PIL import Image
    from transformers import AutoProcessor

    folder = make_tiny_llava(tmp_path_factory.mktemp(request.param) / "model", request.param)
    loaded = load_checkpoint(str(folder))
    processor = AutoProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in PROMPTS]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return loaded, processor, pixels, images


def one_placeholder_batch(tokenizer, prompts):
    """Left-padded ids with ONE <image> per row: the reference's (and the runtime's) input format."""
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("batch", [1, 2])
def test_threshold_above_one_reproduces_hf_generate_exactly(setup, batch):
    loaded, processor, pixels, images = setup
    d, t = loaded.dims, loaded.tokens
    ids, mask = one_placeholder_batch(processor.tokenizer, PROMPTS[:batch])
    pixels = pixels[:batch]
    embeds, out_mask, positions, _ = anchored_inputs(loaded, ids, mask, pixels, threshold=2.0)
    ours = greedy_generate(loaded, embeds, out_mask, positions, max_new_tokens=8, eos_token_id=t.eos_token_ids[0])

    hf_ids, hf_mask = expand_image_tokens(ids, mask, t.image_token_id, d.image_tokens, t.pad_token_id)
    # expand_image_tokens must produce exactly what LlavaProcessor feeds HF generate.
    from_processor = processor(images=images[:batch], text=PROMPTS[:batch], padding=True, return_tensors="pt")
    assert torch.equal(hf_ids, from_processor["input_ids"]) and torch.equal(hf_mask, from_processor["attention_mask"])
    with torch.no_grad():
        theirs = loaded.model.generate(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels,
                                       max_new_tokens=8, do_sample=False)[:, hf_ids.shape[1]:]
    assert ours.shape == (batch, 8)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0].tolist())) >= 4  # the tiny model's greedy output is not one token repeated


def test_eos_stops_a_row_and_pads_like_hf(setup):
    loaded, processor, pixels, _ = setup
    d, t = loaded.dims, loaded.tokens
    ids, mask = one_placeholder_batch(processor.tokenizer, PROMPTS)
    embeds, out_mask, positions, _ = anchored_inputs(loaded, ids, mask, pixels, threshold=2.0)
    free = greedy_generate(loaded, embeds, out_mask, positions, max_new_tokens=6)
    eos = int(free[0, 2])  # pretend row 0's third token is EOS
    ours = greedy_generate(loaded, embeds, out_mask, positions, max_new_tokens=6, eos_token_id=eos)
    hf_ids, hf_mask = expand_image_tokens(ids, mask, t.image_token_id, d.image_tokens, t.pad_token_id)
    with torch.no_grad():
        theirs = loaded.model.generate(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels, max_new_tokens=6,
                                       do_sample=False, eos_token_id=eos, pad_token_id=t.pad_token_id)
    assert torch.equal(ours, theirs[:, hf_ids.shape[1]:])
    assert ours.shape[1] >= 3 and torch.equal(ours[0, :3], free[0, :3])
    assert ours[0, 3:].eq(t.pad_token_id).all()  # row 0 ended at its EOS and is padded after it


def expected_row(ids, mask, text, image, threshold, image_id):
    """The t2i layout (docs/CONTRACTS.md) for one row, written independently of attanchor_graphs: list of indices into
    concat(text, image) and the anchors as (text_index, image_index)."""
    t = len(ids)
    valid = [n for n in range(t) if mask[n]]
    p = next(n for n in valid if ids[n] == image_id)
    sim = torch.nn.functional.cosine_similarity(text[:, None, :].double(), image[None, :, :].double(), dim=-1)
    best = {n: int(sim[n].argmax()) for n in valid if n > p and float(sim[n].max()) >= threshold}
    row = [n for n in valid if n < p]
    for m in range(image.shape[0]):
        row += [t + m] + [n for n in sorted(best) if best[n] == m]
    row += [n for n in valid if n > p]
    return row, sorted((n, m) for n, m in best.items())


def test_anchored_layout_and_positions_match_design(setup):
    loaded, processor, pixels, _ = setup
    d, t = loaded.dims, loaded.tokens
    ids, mask = one_placeholder_batch(processor.tokenizer, PROMPTS)
    threshold = 0.2
    embeds, out_mask, positions, gather = anchored_inputs(loaded, ids, mask, pixels, threshold)
    text = loaded.family.embed_tokens(loaded.model)(ids).detach()
    image = image_features(loaded, pixels)

    rows = [expected_row(ids[b].tolist(), mask[b].tolist(), text[b], image[b], threshold, t.image_token_id)
            for b in range(2)]
    length = max(len(r) for r, _ in rows)
    assert gather.shape == out_mask.shape == positions.shape == embeds.shape[:2] == (2, length)
    for b, (row, anchors) in enumerate(rows):
        valid = int(mask[b].sum())
        candidates = ids.shape[1] - 1 - int((ids[b] == t.image_token_id).nonzero()[0])
        assert 0 < len(anchors) < candidates  # the threshold is a real test: some anchors, not all
        assert len(row) == valid - 1 + d.image_tokens + len(anchors)  # CONTRACTS.md: (#valid - 1) + M + #anchors
        pad = length - len(row)
        assert gather[b, pad:].tolist() == row and gather[b, :pad].eq(0).all()
        assert out_mask[b].tolist() == [0] * pad + [1] * len(row)
        assert positions[b].tolist() == [1] * pad + list(range(len(row)))  # cumsum - 1, padding 1
        both = torch.cat([text[b], image[b]])
        assert torch.equal(embeds[b, pad:], both[row])  # an anchor is a copy of its text embedding


def test_thresholds_spread_on_tiny_models(setup):
    """The property make_tiny_llava promises: paper-range thresholds insert some anchors, not all or none."""
    loaded, processor, pixels, _ = setup
    ids, mask = one_placeholder_batch(processor.tokenizer, PROMPTS)
    plain = int(mask.sum()) - 2 + 2 * loaded.dims.image_tokens
    counts = {}
    for threshold in (0.05, 0.12, 0.3, 2.0):
        _, out_mask, _, _ = anchored_inputs(loaded, ids, mask, pixels, threshold)
        counts[threshold] = int(out_mask.sum()) - plain
    where = (ids == loaded.tokens.image_token_id).nonzero()[:, 1]
    candidates = int((ids.shape[1] - 1 - where).sum())  # left padding: everything after the image is valid
    assert counts[2.0] == 0
    assert candidates >= counts[0.05] >= counts[0.12] >= counts[0.3] > 0
    assert counts[0.12] < candidates  # the paper's default does not anchor everything


def test_budget_gives_static_length(setup):
    loaded, processor, pixels, _ = setup
    d = loaded.dims
    ids, mask = one_placeholder_batch(processor.tokenizer, PROMPTS)
    k = 2
    embeds, out_mask, positions, _ = anchored_inputs(loaded, ids, mask, pixels, 0.05, max_anchors=k)
    assert embeds.shape[1] == ids.shape[1] - 1 + d.image_tokens + k
    assert (out_mask.sum(1) == mask.sum(1) - 1 + d.image_tokens + k).all()  # 0.05 fills the budget


def test_teacher_forced_logits_agree_with_cache_and_with_hf(setup):
    loaded, processor, pixels, _ = setup
    d, t = loaded.dims, loaded.tokens
    ids, mask = one_placeholder_batch(processor.tokenizer, PROMPTS)
    embeds, out_mask, positions, _ = anchored_inputs(loaded, ids, mask, pixels, threshold=0.12)
    tokens = greedy_generate(loaded, embeds, out_mask, positions, max_new_tokens=4)
    logits = teacher_forced_logits(loaded, embeds, out_mask, positions, continuation_ids=tokens[:, :-1])
    assert torch.equal(logits[:, -4:].argmax(-1), tokens)  # teacher forcing reproduces the cached greedy path

    embeds, out_mask, positions, _ = anchored_inputs(loaded, ids, mask, pixels, threshold=2.0)
    hf_ids, hf_mask = expand_image_tokens(ids, mask, t.image_token_id, d.image_tokens, t.pad_token_id)
    with torch.no_grad():
        # Same explicit positions: without them HF counts positions from the padding, which RoPE makes
        # equivalent only up to rounding (~1e-4 on these logits).
        theirs = loaded.model(input_ids=hf_ids, attention_mask=hf_mask, position_ids=positions,
                              pixel_values=pixels).logits
    ours = teacher_forced_logits(loaded, embeds, out_mask, positions)
    real = out_mask.bool()
    assert torch.equal(ours[real], theirs[real])  # same modules, same inputs: bit-identical


def test_image_features_equal_get_image_features(setup):
    loaded, _, pixels, _ = setup
    expected = torch.stack(list(loaded.model.get_image_features(pixel_values=pixels).pooler_output))
    assert torch.equal(image_features(loaded, pixels), expected)


@pytest.mark.parametrize("layer,strategy", [([-2, -1], "default"), ([0, -2], "full"), (-1, "default")])
def test_image_features_other_layer_choices(layer, strategy):
    """Feature-layer lists and both strategies, on in-memory models (no save needed)."""
    from types import SimpleNamespace

    from transformers import LlavaForConditionalGeneration

    from attanchor_export.families import family_for
    from attanchor_export.load.tiny_random import tiny_llava_config

    for family in FAMILIES:
        config = tiny_llava_config(family)
        config.vision_feature_layer, config.vision_feature_select_strategy = layer, strategy
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
        loaded = SimpleNamespace(model=model, family=family_for(config), dims=family_for(config).dims)
        pixels = torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size)
        expected = torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))
        ours = image_features(loaded, pixels)
        assert ours.shape[1] == loaded.dims.image_tokens
        assert torch.equal(ours, expected)


def test_rows_need_exactly_one_placeholder(setup):
    loaded, processor, pixels, _ = setup
    d, t = loaded.dims, loaded.tokens
    ids, mask = one_placeholder_batch(processor.tokenizer, PROMPTS[:1])
    expanded, expanded_mask = expand_image_tokens(ids, mask, t.image_token_id, d.image_tokens, t.pad_token_id)
    with pytest.raises(ValueError, match=f"row 0 has {d.image_tokens} image placeholders"):
        anchored_inputs(loaded, expanded, expanded_mask, pixels[:1], 0.12)
    no_image = ids.clone()
    no_image[no_image == t.image_token_id] = t.bos_token_id
    with pytest.raises(ValueError, match="row 0 has 0 image placeholders"):
        anchored_inputs(loaded, no_image, mask, pixels[:1], 0.12)
