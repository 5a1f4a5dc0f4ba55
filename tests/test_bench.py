"""attanchor_export.bench on a tiny exported artifact: keys, values, torch comparison, chart."""

from __future__ import annotations

import json
import math

import pytest

from attanchor_export.bench import format_report, run_bench, write_chart

SMALL_BUFFER = 16 << 20  # the bandwidth probe: tiny models need no 1 GiB buffer

RUNTIME_KEYS = (
    "ttft_s", "vision_s", "embedding_s", "prefill_s", "decode_tokens_per_s", "decode_step_s",
    "anchor_insert_s", "anchor_insert_share_of_ttft", "embedding_share_of_ttft", "python_overhead_share",
    "python_overhead_per_step_s", "peak_rss_bytes", "load_s", "ttft_min_s",
)
BANDWIDTH_KEYS = ("bytes_per_s", "bytes_per_token", "decoder_weight_bytes", "embedding_row_bytes",
                  "decode_bound_tokens_per_s", "achieved_fraction")


@pytest.fixture(scope="module")
def bench_artifact(artifact):
    """conftest's tiny clip-llama t2i artifact (run_bench only reads it)."""
    return artifact("clip-t2i")


@pytest.fixture(scope="module")
def result(bench_artifact):
    return run_bench(bench_artifact, max_new_tokens=5, threads=1, repeats=2, threshold="auto",
                     bandwidth_bytes=SMALL_BUFFER)


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_documented_keys_positive_and_finite(result):
    for key in RUNTIME_KEYS:
        assert _positive(result["runtime"][key]), key
    for key in BANDWIDTH_KEYS:
        assert _positive(result["bandwidth"][key]), key
    rt = result["runtime"]
    assert rt["ttft_s"] >= rt["vision_s"] + rt["embedding_s"] + rt["prefill_s"] - 1e-9
    assert 0 <= rt["python_overhead_share"] < 1
    assert rt["anchor_insert_share_of_ttft"] < 1
    assert {t["name"] for t in result["targets"]} >= {"decode_fraction_of_bandwidth_bound",
                                                     "anchor_insert_share_of_ttft",
                                                     "python_overhead_share_per_step"}
    json.dumps(result)  # JSON-able as it is


def test_prompts_and_auto_threshold(result):
    assert len(result["prompts"]) == 2
    for prompt in result["prompts"]:
        assert prompt["text_tokens"] > 10
        assert prompt["sequence_length"] >= prompt["text_tokens"] - 1 + result["dims"]["image_tokens"]
    assert result["settings"]["threshold_mode"] == "auto"
    assert sum(p["anchors"] for p in result["prompts"]) >= 1  # ~10% of the text tokens
    assert len(result["runs"]["runtime"]) == 2 * 2


def test_compare_torch(bench_artifact):
    res = run_bench(bench_artifact, max_new_tokens=4, threads=1, repeats=1, compare_torch=True,
                    bandwidth_bytes=SMALL_BUFFER, prompts=["What is in the image?"])
    for key in ("ttft_s", "vision_s", "embedding_s", "prefill_s", "decode_tokens_per_s", "load_s"):
        assert _positive(res["torch"][key]), key
    ratios = res["ratios"]
    for key in ("decode_speedup", "ttft_ratio", "prefill_ratio"):
        assert _positive(ratios[key]), key
    assert ratios["tokens_match"] is True  # fp32: the runtime's greedy tokens equal transformers'
    speedup = {t["name"]: t for t in res["targets"]}["decode_speedup_vs_torch"]
    assert speedup["value"] == ratios["decode_speedup"] and speedup["passed"] is (speedup["value"] >= 1.3)
    text = format_report(res)
    assert "torch eager" in text and "decode tokens/s" in text and "targets" in text


@pytest.mark.parametrize("torch_dtype", ["fp32", "bf16"])
def test_compare_torch_on_qwen(qwen_artifact, torch_dtype):
    """Qwen2.5-VL (M-RoPE positions, patch-row pixels) beside transformers eager in fp32 (same greedy tokens)
    or bf16 (--torch-dtype: half the memory beside the runtime; Qwen's tower keeps its rotary tables in
    the model's dtype)."""
    import torch

    from attanchor_export.bench.runners import TorchRunner

    res = run_bench(qwen_artifact, max_new_tokens=4, threads=1, repeats=1, compare_torch=True,
                    torch_dtype=torch_dtype, bandwidth_bytes=SMALL_BUFFER, prompts=["What is in the image?"])
    assert res["torch"]["dtype"] == torch_dtype and f"torch eager {torch_dtype}" in format_report(res)
    for key in ("ttft_s", "vision_s", "embedding_s", "prefill_s", "decode_tokens_per_s"):
        assert _positive(res["torch"][key]), key
    if torch_dtype == "fp32":
        assert res["ratios"]["tokens_match"] is True
    else:
        from attanchor_runtime.manifest import Manifest

        runner = TorchRunner(Manifest.load(qwen_artifact), threads=1, dtype=torch_dtype)
        assert {p.dtype for p in runner.loaded.model.parameters()} == {torch.bfloat16}
        assert res["runs"]["torch"][0]["sequence_length"] == res["runs"]["runtime"][0]["sequence_length"]


def test_targets_pass_and_miss_at_their_limits():
    """Each target's verdict on either side of its limit (on the limit passes); unmeasured is None, not a pass."""
    from attanchor_export.bench.summary import targets

    result = {"runtime": {"anchor_insert_share_of_ttft": 0.005, "python_overhead_share": 0.051},
              "ratios": {"decode_speedup": 1.29, "ttft_ratio": 1.0}, "bandwidth": {"achieved_fraction": 0.85}}
    assert {t["name"]: t["passed"] for t in targets(result)} == {
        "decode_speedup_vs_torch": False, "decode_fraction_of_bandwidth_bound": True, "ttft_ratio_vs_torch": True,
        "anchor_insert_share_of_ttft": True, "python_overhead_share_per_step": False}
    result = {"runtime": {}, "ratios": {"decode_speedup": 1.31}, "bandwidth": {}}
    verdicts = {t["name"]: t["passed"] for t in targets(result)}
    assert verdicts.pop("decode_speedup_vs_torch") is True and set(verdicts.values()) == {None}


def test_chart_is_a_png(result, tmp_path):
    from PIL import Image

    path = write_chart(result, tmp_path / "chart" / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300


def test_report_text(result):
    text = format_report(result)
    for needle in ("time to first token", "AnchorInsert alone", "Python overhead per step", "decode bound",
                   "peak RSS"):
        assert needle in text


def test_rejects_bad_arguments(bench_artifact):
    with pytest.raises(ValueError):
        run_bench(bench_artifact, max_new_tokens=1)
    with pytest.raises(ValueError, match="torch_dtype"):
        run_bench(bench_artifact, compare_torch=True, torch_dtype="int8")
