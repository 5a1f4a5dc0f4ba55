"""`--threshold auto` and checkpoint-declared AttAnchor defaults, on a tiny random checkpoint; easy-vqa helpers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import read_manifest

from attanchor_export.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_threshold_for_rate_is_the_quantile():
    from attanchor_export.trace.threshold import threshold_for_rate

    scores = np.linspace(0.0, 1.0, 1001)
    t = threshold_for_rate(scores, 0.10)
    assert abs(t - 0.9) < 1e-9 and abs((scores >= t).mean() - 0.10) < 0.002


def test_auto_threshold_recorded_and_used(checkpoint, tmp_path):
    out = tmp_path / "auto"
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--threshold", "auto", "--no-validate", "--quiet")
    assert result.exit_code == 0, result.output
    anchor = read_manifest(out)["anchor"]
    cal = anchor["calibration"]
    assert cal["source"] == "builtin" and cal["candidates"] > 20
    assert abs(cal["rate"] - cal["target_rate"]) < 0.05
    assert anchor["threshold"] == cal["threshold"]
    from attanchor_runtime import Pipeline

    assert Pipeline.load(out).default_threshold == pytest.approx(cal["threshold"])


def test_checkpoint_declares_its_defaults_and_options_win(checkpoint, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(checkpoint("clip-llama"), folder)
    (folder / "attanchor_config.json").write_text(json.dumps({"threshold": 0.33}))
    run_cli(folder, "-o", tmp_path / "declared", "--no-validate", "--quiet")
    assert read_manifest(tmp_path / "declared")["anchor"]["threshold"] == 0.33
    run_cli(folder, "-o", tmp_path / "given", "--threshold", "0.2", "--no-validate", "--quiet")
    assert read_manifest(tmp_path / "given")["anchor"]["threshold"] == 0.2


def test_bad_threshold_is_one_line(checkpoint, tmp_path):
    result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "x", "--threshold", "often")
    assert result.exit_code == 2 and "expected a number or \"auto\"" in result.output
    folder = tmp_path / "ck"
    shutil.copytree(checkpoint("clip-llama"), folder)
    (folder / "attanchor_config.json").write_text("{not json")
    result = run_cli(folder, "-o", tmp_path / "y", "--no-validate")
    assert result.exit_code == 1 and "attanchor_config.json is not valid JSON" in result.stderr
    assert not (tmp_path / "y").exists()


def test_shape_mask_and_patch_overlap():
    from attanchor_export.load.easy_vqa import patch_overlap, shape_mask

    rgb = np.full((16, 16, 3), 240, np.uint8)
    rgb[0:8, 8:16] = (255, 0, 0)  # a red square in the top-right quarter
    rgb[0, 0] = (245, 200, 200)  # an anti-aliased pixel, nearer the background than red
    mask = shape_mask(rgb, "red")
    assert mask.sum() == 64
    assert patch_overlap(mask, 8).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_easy_vqa_labels_cover_the_images():
    from attanchor_export.load.easy_vqa import COLORS, SHAPES, image_labels, questions

    qs = questions("test")
    labels = image_labels("test")
    assert len(qs) == 9673 and len(labels) >= 980
    colour, shape = labels[qs[0].image_id]
    assert colour in COLORS or shape in SHAPES
    assert {q.kind for q in qs} == {"yes/no", "color", "shape"}
