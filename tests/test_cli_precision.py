"""Reduced precision through the CLI: gated quantized exports, `check` on them, and --trt without a GPU."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner
from helpers import read_manifest

from attanchor_export.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _decoder_bytes(folder):
    return sum(r["bytes"] for n, r in read_manifest(folder)["files"].items() if n.startswith("decoder.onnx"))


def test_int4_export_is_gated_and_checkable(checkpoint, artifact, tmp_path):
    out = tmp_path / "q4"
    result = run_cli(checkpoint("siglip-qwen2"), "-o", out, "--quant", "int4", "--block-size", "32", "--json")
    assert result.exit_code == 0, result.output
    precision = read_manifest(out)["precision"]
    assert precision["quant"] == "int4" and precision["gate"]["passed"] is True
    assert precision["backends"]["ort"]["decoder"] == "decoder.onnx"
    assert precision["backends"]["trt"]["decoder"] == "decoder.trt.onnx"
    assert _decoder_bytes(out) < _decoder_bytes(artifact("siglip-t2i-k4"))
    check = run_cli("check", out, "--json")
    assert check.exit_code == 0, check.output
    rows = json.loads(check.stdout)["checks"]
    assert any(r["graph"] == "accuracy-gate" for r in rows)
    run = run_cli("run", out, "--image", tmp_path / "none.png", "--prompt", "x")
    assert run.exit_code == 1 and "cannot decode image" in run.stderr


def test_int4_8bit_option_is_parsed_before_any_work(checkpoint, tmp_path):
    out = tmp_path / "q4"
    result = run_cli(checkpoint("siglip-qwen2"), "-o", out, "--quant", "int4", "--int4-8bit", "q_proj,,down_proj")
    assert result.exit_code == 2 and "comma-separated linear names" in result.output
    assert not out.exists()


def test_gate_below_floor_fails_and_keeps_failed_folder(checkpoint, tmp_path):
    out = tmp_path / "q8"
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--quant", "int8", "--gate-floor", "cos_mean=0.99999",
                     "--smooth-alpha", "off")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: int8 accuracy gate failed") and "q8.failed" in last
    assert not out.exists()
    precision = read_manifest(tmp_path / "q8.failed")["precision"]
    assert precision["gate"]["passed"] is False
    assert precision["graphs"]["decoder.trt.onnx"]["smoothing"] is None  # --smooth-alpha off reached the quantizer


def test_bad_smooth_alpha_is_a_usage_error(checkpoint, tmp_path):
    for value in ("0", "1.5", "strong"):
        result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "x", "--quant", "int8", "--smooth-alpha", value)
        assert result.exit_code == 2 and "--smooth-alpha" in result.output, result.output
        assert not (tmp_path / "x").exists()


def test_bad_gate_floor_is_a_usage_error(checkpoint, tmp_path):
    result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "x", "--gate-floor", "cos_mean")
    assert result.exit_code == 2 and "METRIC=NUMBER" in result.output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_trt_without_tensorrt_exits_2_after_writing_onnx(checkpoint, tmp_path):
    out = tmp_path / "t"
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--trt", "--quiet")
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "tensorrt" in line and str(out) in line
    assert (out / "manifest.json").is_file(), "the ONNX artifact is complete before engines are attempted"


def test_build_plan_only_needs_no_gpu(artifact):
    result = run_cli("build", artifact("siglip-t2i-k4"), "--plan-only", "--max-batch", "2")
    assert result.exit_code == 0, result.output
    assert "profile prefill" in result.stdout and "profile decode" in result.stdout
    bad = run_cli("build", artifact("siglip-t2i-k4"), "--plan-only", "--max-seq-len", "100000")
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1


def test_lint_command(artifact):
    result = run_cli("lint", artifact("siglip-t2i-k4"), "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) >= {"vision", "embedding", "decoder"}
