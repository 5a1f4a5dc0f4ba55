"""Qwen2-VL (Qwen2VLForConditionalGeneration) end to end: the tiny random checkpoint of
load/tiny_qwen2_5_vl.make_tiny_qwen2_vl (Qwen2-VL's tower: LayerNorm, quick-GELU MLP, no windows, patch
merger; the same Qwen2 text model with mrope_section [2, 3, 3]) exported once by the CLI from its folder,
then run by the torch-free Pipeline and checked as test_qwen_runtime checks Qwen2.5-VL (qwen_helpers):
tokens equal transformers' `generate` without anchors and the contract reference with anchors, for a
single prompt and a left-padded ragged batch.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import locked
from qwen_helpers import QUESTIONS, SIDE, check_equals_contract, check_equals_generate


@pytest.fixture(scope="module")
def qwen2_vl_checkpoint(shared_dir):
    from attanchor_export.load.tiny_qwen2_5_vl import make_tiny_qwen2_vl

    path = shared_dir / "ck-qwen2_vl"
    with locked(path):
        if not (path / "config.json").is_file():
            make_tiny_qwen2_vl(path)
    return path


@pytest.fixture(scope="module")
def qwen2_vl_artifact(shared_dir, qwen2_vl_checkpoint):
    """`attanchor-export FOLDER -o OUT`: fp32, t2i, the processor's default grid (112x112)."""
    from click.testing import CliRunner

    from attanchor_export.cli import main

    out = shared_dir / "art-qwen2_vl"
    with locked(out):
        if not (out / "manifest.json").is_file():
            result = CliRunner().invoke(main, [str(qwen2_vl_checkpoint), "-o", str(out), "--quiet"])
            assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def qwen2_vl(qwen2_vl_checkpoint, qwen2_vl_artifact):
    from attanchor_runtime import Pipeline
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen2_vl_checkpoint)
    return model, tokenizer, Pipeline.load(qwen2_vl_artifact)


def test_export_validates_and_records_qwen2_vl(qwen2_vl_artifact):
    manifest = json.loads((qwen2_vl_artifact / "manifest.json").read_text())
    family = manifest["family"]
    assert family["name"] == "qwen2_5_vl"  # the same runtime adapter
    assert family["architecture"] == "Qwen2VLForConditionalGeneration"
    assert family["model_types"] == {"vision": "qwen2_vl_vision", "text": "qwen2_vl_text"}
    assert family["payload"]["image_grid"]["height"] == family["payload"]["image_grid"]["width"] == SIDE
    assert family["payload"]["mrope_section"] == [2, 3, 3]
    # the tower's width (embed_dim), not Qwen2VLVisionConfig.hidden_size (the merger's output = the text width)
    assert (manifest["dims"]["vision_hidden_size"], manifest["dims"]["hidden_size"]) == (32, 64)
    validation = manifest["validation"]
    assert validation["passed"] and all(c["passed"] for c in validation["checks"])
    assert {c["graph"] for c in validation["checks"]} >= {"vision", "embedding", "decoder"}


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
def test_without_anchors_equals_transformers_generate(qwen2_vl, questions):
    check_equals_generate(*qwen2_vl, questions)


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["single", "ragged"])
def test_with_anchors_equals_the_contract_reference(qwen2_vl, questions):
    check_equals_contract(*qwen2_vl, questions)


def test_check_reloads_the_source_as_qwen2_vl(qwen2_vl_artifact):
    """`check` reloads the source checkpoint (Qwen2VLForConditionalGeneration) and passes end to end."""
    from click.testing import CliRunner

    from attanchor_export.cli import main

    result = CliRunner().invoke(main, ["check", str(qwen2_vl_artifact)])
    assert result.exit_code == 0, result.output
    assert "end-to-end" in result.output and re.search(r"all \d+ checks passed", result.output), result.output
