"""Qwen2.5-VL through the family seam: the tiny random checkpoint exported by the CLI from its folder
(session fixture, once per run), then run by the torch-free Pipeline.

- without anchors the runtime's tokens equal transformers' own `generate` fed what its processor
  returns (input_ids with the pads expanded, pixel_values [sum of patches, 1176], image_grid_thw);
- with anchors they equal an independent reference of the contract (qwen_helpers.contract_reference:
  AnchorInsert's numpy specification with the words-only candidate rule, transformers' embeddings and
  image features, the slot-by-slot positions of contract_positions, HF's text model with a DynamicCache);
- single prompts and a ragged (left-padded) batch; special tokens are never anchors.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from attanchor_runtime.errors import RuntimeInputError
from attanchor_runtime.image_placeholders import collapse_image_runs
from qwen_helpers import (
    NEW_TOKENS,
    QUESTIONS,
    SIDE,
    check_equals_contract,
    check_equals_generate,
    pil_image,
    processor_inputs,
    run,
)


@pytest.fixture(scope="module")
def qwen(qwen_checkpoint, qwen_artifact):
    from attanchor_runtime import Pipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen_checkpoint)
    return model, tokenizer, Pipeline.load(qwen_artifact)


def test_cli_export_writes_the_family(qwen_artifact, qwen_checkpoint):
    manifest = json.loads((qwen_artifact / "manifest.json").read_text())
    family = manifest["family"]
    assert family["name"] == "qwen2_5_vl" and family["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    payload = family["payload"]
    assert payload["image_grid"]["height"] == payload["image_grid"]["width"] == SIDE
    assert payload["positions"] == "mrope" and payload["mrope_section"] == [2, 3, 3] and payload["resize"] == "stretch"
    assert manifest["anchor"]["threshold"] == pytest.approx(0.08)  # the checkpoint declares none: the paper's Qwen value
    assert manifest["anchor"]["op_version"] == 2
    graphs = manifest["graphs"]
    assert graphs["vision"]["inputs"][0]["shape"] == ["batch * 64", 1176]
    assert graphs["decoder"]["inputs"][2]["shape"] == [3, "batch", "seq_len"]
    tokenizer = json.loads((qwen_checkpoint / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    for token in ("<|vision_end|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>"):
        assert special[token] in manifest["anchor"]["excluded_token_ids"], token


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
def test_without_anchors_equals_transformers_generate(qwen, questions):
    check_equals_generate(*qwen, questions)


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
def test_with_anchors_equals_the_contract_reference(qwen, questions):
    check_equals_contract(*qwen, questions)


def test_special_tokens_are_never_anchors(qwen):
    """At a threshold every cosine passes, every word after the image is an anchor and no special token is."""
    _, tokenizer, pipe = qwen
    inputs = processor_inputs(tokenizer, QUESTIONS)
    out = run(pipe, inputs, threshold=-1.0)
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in
                                                ("<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>")}
    ids = inputs["input_ids"].numpy()
    for b, row in enumerate(out.anchors):
        anchored = {int(ids[b, n]) for n, _ in row}
        assert anchored and not anchored & special
        question = set(tokenizer(QUESTIONS[b], add_special_tokens=False).input_ids)
        assert question <= anchored | {t for t in question if not tokenizer.decode([t]).strip()}


def test_chat_stream_and_images(qwen):
    model, tokenizer, pipe = qwen
    image = pil_image(SIDE, SIDE, 5)
    inputs = processor_inputs(tokenizer, QUESTIONS[:1], seed=5)
    np.testing.assert_allclose(pipe.images(image).reshape(-1, 1176), inputs["pixel_values"].numpy(), atol=1e-5)
    ids = inputs["input_ids"].numpy()[0]
    np.testing.assert_array_equal(pipe.prompt_ids(QUESTIONS[0]), collapse_image_runs(ids, model.config.image_token_id))
    stream = pipe.stream(QUESTIONS[0], image, max_new_tokens=NEW_TOKENS)
    text = "".join(stream)
    want = run(pipe, inputs, threshold=None)
    assert stream.output.tokens.tolist() == want.tokens.tolist()
    assert text == pipe.chat(QUESTIONS[0], image, max_new_tokens=NEW_TOKENS)
    assert text == pipe.text.decode(want.tokens[0])


def test_refusals(qwen):
    _, tokenizer, pipe = qwen
    inputs = processor_inputs(tokenizer, QUESTIONS[:2])
    pixels, ids = inputs["pixel_values"].numpy(), inputs["input_ids"].numpy()
    with pytest.raises(RuntimeInputError, match="image_grid_thw is required"):
        pipe.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2)
    with pytest.raises(RuntimeInputError, match=r"differs from the export's grid \[1, 8, 8\]"):
        pipe.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 16]] * 2), max_new_tokens=2)
    with pytest.raises(RuntimeInputError, match="unexpected image inputs"):
        pipe.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=inputs["image_grid_thw"].numpy(),
                      video_grid_thw=np.ones((2, 3), np.int64), max_new_tokens=2)


def test_llava_refuses_image_grid_thw(artifact):
    from attanchor_runtime import Pipeline

    pipe = Pipeline.load(artifact("clip-t2i"))
    ids = pipe.prompt_ids("What is this?")
    with pytest.raises(RuntimeInputError, match="a LLaVA artifact takes pixel_values only"):
        pipe.generate(input_ids=[ids], pixel_values=pipe.images(pil_image(32, 32, 0)),
                      image_grid_thw=np.array([[1, 8, 8]]), max_new_tokens=2)


def test_image_size_option(qwen_checkpoint, tmp_path):
    from click.testing import CliRunner

    from attanchor_export.cli import main

    result = CliRunner().invoke(main, ["export", str(qwen_checkpoint), "-o", str(tmp_path / "a"), "--image-size", "100x112"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("error: --image-size 100x112: both sides must be")
    assert not (tmp_path / "a").exists()


def _mrope_first_step(mask, positions):
    """Text-only positions on all three axes (M-RoPE with t = h = w is plain RoPE), advanced as the family does."""
    from attanchor_runtime.families.qwen2_5_vl import MropeStep

    return MropeStep.after_prefill(mask, np.broadcast_to(positions[None], (3, *positions.shape)))


def test_ort_fusions_leave_the_mrope_rotary_alone(qwen_artifact, tmp_path):
    """RotaryEmbedding takes one position per row and token; M-RoPE picks t, h or w per frequency section,
    so the onnxruntime form must keep the traced rotary (and still fuse the norms and the attention)."""
    import shutil

    from attanchor_runtime.manifest import Manifest

    from attanchor_export.precision.ort_fusions import fuse_decoder_file
    from attanchor_export.trace.decoder_parity import decoder_parity

    dims = Manifest.load(qwen_artifact).dims
    for f in ("decoder.onnx", "decoder.onnx.data"):
        shutil.copy(qwen_artifact / f, tmp_path / f)
    report = fuse_decoder_file(tmp_path / "decoder.onnx", dims)
    assert report["fused"]["RotaryEmbedding"] == 0
    assert report["fused"]["SkipSimplifiedLayerNormalization"] == 2 * dims.num_layers
    assert report["attention_in_place"] == dims.num_layers
    parity = decoder_parity(qwen_artifact / "decoder.onnx", tmp_path / "decoder.onnx", dims,
                            candidate_kv=report["kv_cache"], first_step=_mrope_first_step)
    assert parity["max_abs_diff"] < 1e-4, parity


def test_int4_export_passes_its_gate(qwen_artifact_int4, qwen):
    from attanchor_runtime import Pipeline
    from attanchor_runtime.manifest import Manifest

    manifest = Manifest.load(qwen_artifact_int4)
    gate = manifest.precision.gate
    assert gate.format == "int4" and gate.passed and len(gate.results) == 2  # onnxruntime and TensorRT forms
    fusions = manifest.precision.graphs["decoder.onnx"].ort_fusions
    assert fusions["fused"]["RotaryEmbedding"] == 0 and fusions["attention_in_place"] == manifest.dims.num_layers
    _, tokenizer, _ = qwen
    out = run(Pipeline.load(qwen_artifact_int4), processor_inputs(tokenizer, QUESTIONS), threshold=0.1)
    assert out.tokens.shape[0] == len(QUESTIONS) and all(out.anchors)


def test_check_and_show_anchors(qwen_artifact, tmp_path):
    """`check` (graph parity, end-to-end tokens vs the source model and transformers' generate, lint) passes;
    `run --show-anchors` draws on the merged-patch grid."""
    from click.testing import CliRunner
    from PIL import Image

    from attanchor_export.cli import main

    result = CliRunner().invoke(main, ["check", str(qwen_artifact)])
    assert result.exit_code == 0, result.output
    assert "end-to-end" in result.output and re.search(r"all \d+ checks passed", result.output), result.output
    pil_image(SIDE, SIDE, 3).save(tmp_path / "in.png")
    result = CliRunner().invoke(main, ["run", str(qwen_artifact), "--image", str(tmp_path / "in.png"), "--prompt",
                                       QUESTIONS[0], "--threshold", "0.1", "--max-new-tokens", "2",
                                       "--show-anchors", str(tmp_path / "anchors.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "anchors.png").size[0] == 512


def test_llava_refuses_image_size(checkpoint, tmp_path):
    from click.testing import CliRunner

    from attanchor_export.cli import main

    result = CliRunner().invoke(main, ["export", str(checkpoint("clip-llama")), "-o", str(tmp_path / "a"),
                                       "--image-size", "224x224"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("error: --image-size does not apply to LlavaForConditionalGeneration")
    assert not (tmp_path / "a").exists()
