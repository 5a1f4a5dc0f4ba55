"""Qwen2.5-VL family, torch-free pieces: export image size rule, preprocessing, prompts, 3-D positions.

References: transformers itself (Qwen2VLImageProcessorPil, the chat template, get_rope_index) where it
defines the answer, and qwen_helpers.contract_positions (the contract written slot by slot) where
anchors are inserted, which transformers cannot express.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attanchor_graphs.specification import anchor_insert
from attanchor_runtime.batch import left_pad
from attanchor_runtime.chat_template import PromptFormatter
from attanchor_runtime.errors import ArtifactError, RuntimeInputError
from attanchor_runtime.families import qwen2_5_vl as rt
from attanchor_runtime.image_placeholders import collapse_image_runs
from qwen_helpers import contract_positions, decode_positions, pil_image, smooth_image

from attanchor_export.errors import CheckpointError, ExportError  # noqa: E402
from attanchor_export.families import qwen2_5_vl as fam  # noqa: E402
from attanchor_export.load.tiny_qwen2_5_vl import CHAT_TEMPLATE, tiny_qwen_image_processor  # noqa: E402

QUESTIONS = ["What color is the car?", "How many people are there in the picture on the left?", "Is it day?"]


@pytest.fixture(scope="module")
def qwen(qwen_checkpoint):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_checkpoint).eval()
    return model, AutoTokenizer.from_pretrained(qwen_checkpoint), AutoImageProcessor.from_pretrained(qwen_checkpoint)


def prompt(tokenizer, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------- export image size


@pytest.mark.parametrize(("pixels", "side"), [
    ((3136, 12845056), 448),  # Qwen2.5-VL-3B-Instruct's processor: capped at 448
    ((224 * 224, 224 * 224), 224),  # min = max = 224^2 exports at 224x224 (the example)
    ((56 * 56, 112 * 112), 112),  # the tiny checkpoint
    ((56 * 56, 100 * 100), 84),  # the largest multiple of 28 whose square fits
    ((3136, 447 * 447), 420),
])
def test_default_image_size(pixels, side):
    assert fam.default_image_size(*pixels) == (side, side)


def test_default_image_size_refuses_what_cannot_fit():
    with pytest.raises(CheckpointError, match="pass --image-size"):
        fam.default_image_size(100 * 100, 27 * 27)
    with pytest.raises(CheckpointError, match="pixel range"):
        fam.default_image_size(90 * 90, 90 * 90)  # 84^2 < min_pixels


def test_processor_pixel_range_of_the_saved_processor(qwen):
    _, _, processor = qwen
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
    assert fam.processor_pixel_range(processor) == (56 * 56, 112 * 112)
    assert fam.default_image_size(*fam.processor_pixel_range(processor)) == (112, 112)


@pytest.mark.parametrize(("text", "size"), [("448x448", (448, 448)), ("84X140", (84, 140)), (" 224 ", (224, 224))])
def test_parse_image_size(text, size):
    assert fam.parse_image_size(text) == size


@pytest.mark.parametrize("text", ["448x", "x448", "abc", "100x100", "0x28", "-28x28"])
def test_parse_image_size_errors(text):
    with pytest.raises(ExportError, match="--image-size"):
        fam.parse_image_size(text)


def test_image_grid_refuses_other_multiples():
    with pytest.raises(ArtifactError, match="multiples of patch x merge = 28"):
        rt.ImageGrid(height=100, width=112)


# ------------------------------------------------------------------------------------------ preprocessing


def _hf_pixels(processor, images):
    out = processor(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize(("height", "width"), [(112, 112), (84, 140), (448, 448)])
def test_preprocessing_matches_transformers_at_the_export_size(height, width):
    """Images already at the export size: not resampled by either side, same pixel_values and grid."""
    processor = tiny_qwen_image_processor(min_pixels=height * width, max_pixels=height * width)
    runtime = rt.QwenImagePreprocessor(rt.ImageGrid(height, width))
    images = [pil_image(height, width, seed) for seed in range(3)]
    want_pixels, want_grid = _hf_pixels(processor, images)
    got_pixels, got_grid = runtime(images)
    assert got_pixels.dtype == np.float32 and got_pixels.shape == want_pixels.shape == (3 * (height // 14) * (width // 14), 1176)
    assert np.abs(got_pixels - want_pixels).max() <= 1e-5
    np.testing.assert_array_equal(got_grid, want_grid)


@pytest.mark.parametrize(("height", "width"), [(50, 50), (333, 333), (20, 20)])
def test_preprocessing_stretch_equals_transformers_on_square_images(height, width):
    """Any square image: smart_resize of a processor with min = max = export area gives the export size,
    so the runtime's resize (stretch to the grid) and transformers' resize agree."""
    processor = tiny_qwen_image_processor(min_pixels=112 * 112, max_pixels=112 * 112)
    runtime = rt.QwenImagePreprocessor(rt.ImageGrid(112, 112))
    image = pil_image(height, width, seed=height)
    want_pixels, want_grid = _hf_pixels(processor, [image])
    got_pixels, got_grid = runtime(image)
    assert np.abs(got_pixels - want_pixels).max() <= 1e-5
    np.testing.assert_array_equal(got_grid, want_grid)


def test_preprocessing_stretches_other_aspect_ratios_and_converts_like_transformers(tmp_path):
    """A wide RGBA image is stretched to the grid (transformers would pick another grid for it: the
    runtime's answer is its processor run on the image resized to the export size first)."""
    from PIL import Image

    runtime = rt.QwenImagePreprocessor(rt.ImageGrid(84, 140))
    rgba = Image.fromarray(smooth_image(61, 203, seed=5, channels=4), "RGBA")
    got, grid = runtime(rgba)
    assert grid.tolist() == [[1, 6, 10]] and got.shape == (60, 1176)
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    processor = tiny_qwen_image_processor(min_pixels=84 * 140, max_pixels=84 * 140)
    want, _ = _hf_pixels(processor, [rgb.resize((140, 84), resample=Image.BICUBIC)])
    assert np.abs(got - want).max() <= 1e-5
    path = tmp_path / "wide.png"
    rgba.convert("RGB").save(path)
    from_path, _ = runtime(str(path))
    assert from_path.shape == (60, 1176)


def test_patchify_layout():
    """Patch rows in merge-block order: row 1 is the patch right of row 0, row 2 the one below it."""
    grid = rt.ImageGrid(56, 56)
    image = np.arange(3 * 56 * 56, dtype=np.float32).reshape(3, 56, 56)
    rows = rt.patchify(image, grid)
    assert rows.shape == (16, 1176)
    first = rows.reshape(16, 3, 2, 14, 14)
    np.testing.assert_array_equal(first[0, :, 0], image[:, :14, :14])
    np.testing.assert_array_equal(first[0, :, 1], image[:, :14, :14])  # the temporal copy
    np.testing.assert_array_equal(first[1, :, 0], image[:, :14, 14:28])
    np.testing.assert_array_equal(first[2, :, 0], image[:, 14:28, :14])
    np.testing.assert_array_equal(first[4, :, 0], image[:, :14, 28:42])  # next merge block, to the right


def test_check_pixel_inputs():
    grid = rt.ImageGrid(112, 112)
    pixels = np.zeros((128, 1176), np.float32)
    thw = np.array([[1, 8, 8], [1, 8, 8]])
    assert rt.check_pixel_inputs(pixels, thw, grid, 2) is not None
    with pytest.raises(RuntimeInputError, match="image_grid_thw is required"):
        rt.check_pixel_inputs(pixels, None, grid, 2)
    with pytest.raises(RuntimeInputError, match=r"\[1, 6, 10\] differs from the export's grid \[1, 8, 8\]"):
        rt.check_pixel_inputs(np.zeros((124, 1176), np.float32), np.array([[1, 8, 8], [1, 6, 10]]), grid, 2)
    with pytest.raises(RuntimeInputError, match=r"shape \[128, 1176\]"):
        rt.check_pixel_inputs(np.zeros((64, 1176), np.float32), thw, grid, 2)
    with pytest.raises(RuntimeInputError, match="2 rows for 3 prompts"):
        rt.check_pixel_inputs(pixels, thw, grid, 3)


# ---------------------------------------------------------------------------------------------- prompts


def test_chat_template_and_image_pads(qwen):
    """The runtime renders Qwen's template as transformers does; collapsing the processor's image pads
    and expanding them again gives the processor's ids."""
    model, tokenizer, processor = qwen
    assert tokenizer.chat_template == CHAT_TEMPLATE
    formatter = PromptFormatter(CHAT_TEMPLATE, special_tokens={"eos_token": "<|im_end|>"})
    for question in QUESTIONS:
        text = formatter.format_chat(question)
        assert text == prompt(tokenizer, question)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "<|vision_start|><|image_pad|><|vision_end|>")
    inputs = fam.processor_inputs(tokenizer, processor, [prompt(tokenizer, q) for q in QUESTIONS],
                                  [pil_image(112, 112, s) for s in range(3)])
    image_id = model.config.image_token_id
    for row, mask in zip(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()):
        real = row[mask.astype(bool)]
        assert (real == image_id).sum() == 16
        collapsed = collapse_image_runs(real, image_id)
        np.testing.assert_array_equal(rt.expand_image_pads(collapsed, image_id, 16), real)
    with pytest.raises(RuntimeInputError, match="no image placeholder"):
        rt.expand_image_pads([1, 2, 3], image_id, 16)


# -------------------------------------------------------------------------------------------- positions


def _inputs(qwen, questions, height=112, width=112):
    """Processor inputs for `questions` at an export size, and what the embedding graph sees for them."""
    model, tokenizer, _ = qwen
    processor = tiny_qwen_image_processor(min_pixels=height * width, max_pixels=height * width)
    images = [pil_image(height, width, seed) for seed in range(len(questions))]
    inputs = fam.processor_inputs(tokenizer, processor, [prompt(tokenizer, q) for q in questions], images)
    image_id = model.config.image_token_id
    rows = [collapse_image_runs(r[m.astype(bool)], image_id)
            for r, m in zip(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        text = model.model.language_model.embed_tokens(torch.from_numpy(ids)).numpy()
        features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    features = features.numpy().reshape(len(rows), -1, text.shape[-1])
    where = np.array([int(np.flatnonzero(r == image_id)[0]) for r in ids])
    return inputs, ids, mask, text, features, where


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
@pytest.mark.parametrize("size", [(112, 112), (84, 140)], ids=["112x112", "84x140"])
def test_positions_without_anchors_equal_get_rope_index(qwen, questions, size):
    model = qwen[0]
    inputs, ids, mask, text, features, where = _inputs(qwen, questions, *size)
    want, want_deltas = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    merged = rt.ImageGrid(*size).merged_hw
    for mode in ("t2i", "i2t"):
        gather, out_mask = anchor_insert(text, features, mask, where, np.float32(2.0), mode=mode)
        got = rt.mrope_position_ids(gather, out_mask, mask, where, merged, mode)
        assert got.shape == tuple(want.shape)
        np.testing.assert_array_equal(got, want.numpy())  # padding included (0 on both sides)
        np.testing.assert_array_equal(rt.rope_deltas(got, out_mask), want_deltas.numpy().ravel())


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
@pytest.mark.parametrize(("mode", "threshold", "budget"), [
    ("t2i", 0.1, None), ("t2i", 0.2, None), ("t2i", 0.1, 3), ("i2t", 0.15, None), ("i2t", 0.1, 4),
])
def test_positions_with_anchors_follow_the_contract(qwen, questions, mode, threshold, budget):
    inputs, ids, mask, text, features, where = _inputs(qwen, questions, 84, 140)
    gather, out_mask = anchor_insert(text, features, mask, where, np.float32(threshold), mode=mode, max_anchors=budget)
    inserted = out_mask.sum(1) - (mask.sum(1) - 1 + 15)
    assert inserted.sum() > 0, "the case must insert anchors"
    got = rt.mrope_position_ids(gather, out_mask, mask, where, (3, 5), mode)
    want = contract_positions(gather, out_mask, mask, where, (3, 5), mode)
    np.testing.assert_array_equal(got, want)
    # Without the copies the row is the unanchored prompt, at exactly get_rope_index's positions.
    plain_gather, plain_mask = anchor_insert(text, features, mask, where, np.float32(2.0), mode=mode)
    plain = rt.mrope_position_ids(plain_gather, plain_mask, mask, where, (3, 5), mode)
    for r in range(len(questions)):
        original = [j for j in np.flatnonzero(out_mask[r]) if j not in _copy_slots(gather[r], out_mask[r], ids.shape[1], mode)]
        np.testing.assert_array_equal(got[:, r, original], plain[:, r, np.flatnonzero(plain_mask[r])])
    # Decode: the first new token at the largest prompt position + 1, counted through the copies.
    deltas = rt.rope_deltas(got, out_mask)
    grown = np.concatenate([out_mask, np.ones((len(questions), 1), np.int64)], axis=1)
    np.testing.assert_array_equal(rt.decode_position_ids(deltas, grown), decode_positions(got, out_mask, 0))
    grown = np.concatenate([grown, np.ones((len(questions), 1), np.int64)], axis=1)
    np.testing.assert_array_equal(rt.decode_position_ids(deltas, grown), decode_positions(got, out_mask, 1))


def _copy_slots(gather_row, mask_row, num_text, mode):
    """Slots of one row holding an inserted copy (t2i: text inside the image block; i2t: images after the M-th)."""
    slots = np.flatnonzero(mask_row)
    values = gather_row[slots]
    is_image = values >= num_text
    if mode == "i2t":
        return set(slots[is_image & (np.cumsum(is_image) > 15)].tolist())
    last_image = np.flatnonzero(is_image)[-1]
    first_image = np.flatnonzero(is_image)[0]
    block = slots[first_image:last_image + 1][~is_image[first_image:last_image + 1]].tolist()
    tail = values[last_image + 1:]  # copies of the last patch (ascending ids) then the text after the image
    split = next((k for k in range(1, len(tail)) if tail[k] <= tail[k - 1]), 0)
    return set(block + slots[last_image + 1:last_image + 1 + split].tolist())


def test_decode_positions_equal_generate_without_anchors(qwen):
    """transformers' generate feeds step k at (its prompt's largest position) + 1 + k on every axis,
    whatever the left padding: rope_deltas + decode_position_ids give the same numbers."""
    model = qwen[0]
    inputs, ids, mask, text, features, where = _inputs(qwen, QUESTIONS)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    finally:
        hook.remove()
    gather, out_mask = anchor_insert(text, features, mask, where, np.float32(2.0))
    positions = rt.mrope_position_ids(gather, out_mask, mask, where, (4, 4))
    deltas = rt.rope_deltas(positions, out_mask)
    step_mask = out_mask
    for k in (1, 2):
        step_mask = np.concatenate([step_mask, np.ones((3, 1), np.int64)], axis=1)
        hf = seen[k].numpy()
        hf = hf[1:] if hf.shape[0] == 4 else hf  # [4, B, 1] when transformers prepends its text positions
        np.testing.assert_array_equal(rt.decode_position_ids(deltas, step_mask), hf)


def test_check_config_refuses_what_the_graphs_do_not_build(qwen):
    import copy

    config = copy.deepcopy(qwen[0].config)
    fam.check_config(config)
    config.text_config.rope_parameters["mrope_section"] = [2, 3, 2]
    from attanchor_export.errors import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match=r"mrope_section \[2, 3, 2\] must sum to head_dim / 2 = 8"):
        fam.check_config(config)
