"""`attanchor-export MODEL -o DIR` writes a verified artifact, and fails cleanly otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import ARTIFACTS, read_manifest

from attanchor_export.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_artifact_is_validated_and_complete(artifact, name):
    folder = artifact(name)
    manifest = read_manifest(folder)
    family, mode, k = ARTIFACTS[name]
    assert manifest["validation"]["passed"] is True
    kinds = {c["graph"] for c in manifest["validation"]["checks"]}
    assert kinds == {"vision", "embedding", "decoder"}
    anchor = dict(manifest["anchor"])
    assert anchor.pop("excluded_token_ids")  # its content: tests/test_candidates.py
    assert anchor == {"op": "ai.attanchor::AnchorInsert", "op_version": 2, "mode": mode,
                      "threshold": 0.12, "max_anchors": k, "calibration": None}
    for rel, record in manifest["files"].items():
        assert (folder / rel).stat().st_size == record["bytes"]
    for required in ("vision.onnx", "embedding.onnx", "decoder.onnx", "embed_tokens.bin", "tokenizer.json"):
        assert required in manifest["files"]
    assert not list(folder.parent.glob(f".{folder.name}.partial-*"))


@pytest.mark.parametrize("name", ["clip-t2i", "siglip-i2t"])
def test_graph_io_matches_manifest(artifact, name):
    folder = artifact(name)
    manifest = read_manifest(folder)
    for graph in manifest["graphs"].values():
        model = onnx.load(str(folder / graph["file"]), load_external_data=False)
        assert model.ir_version == 10  # what onnxruntime >= 1.18 and TensorRT 10 load
        inputs = {i.name: i for i in model.graph.input}
        for spec in graph["inputs"]:
            dims = inputs[spec["name"]].type.tensor_type.shape.dim
            got = [d.dim_param or d.dim_value for d in dims]
            assert got == spec["shape"], (graph["file"], spec["name"])
        assert [o.name for o in model.graph.output] == [o["name"] for o in graph["outputs"]]


def test_decoder_keeps_explicit_position_ids(artifact):
    model = onnx.load(str(artifact("clip-t2i") / "decoder.onnx"), load_external_data=False)
    consumers = [n for n in model.graph.node if "position_ids" in n.input]
    assert consumers, "position_ids must feed the graph, not be recomputed from the mask"


def test_embedding_with_budget_has_static_length(artifact):
    import onnxruntime as ort

    folder = artifact("siglip-t2i-k4")
    manifest = read_manifest(folder)
    dims = manifest["dims"]
    session = ort.InferenceSession(str(folder / "embedding.onnx"), providers=["CPUExecutionProvider"])
    for width in (5, 9):
        ids = np.full((2, width), 7, np.int64)
        ids[:, 1] = manifest["text"]["image_token_id"]
        mask = np.ones_like(ids)
        feats = np.random.default_rng(0).standard_normal((2, dims["image_tokens"], dims["hidden_size"]))
        for threshold in (-1.0, 2.0):
            out = session.run(None, {"input_ids": ids, "text_attention_mask": mask,
                                     "image_features": feats.astype(np.float32),
                                     "threshold": np.array(threshold, np.float32)})
            assert out[0].shape[1] == width - 1 + dims["image_tokens"] + 4


def test_cli_export_then_check(checkpoint, tmp_path):
    out = tmp_path / "art"
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--last-logits-only", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["folder"] == str(out)
    assert read_manifest(out)["graphs"]["decoder"]["outputs"][0]["shape"][1] == 1
    check = run_cli("check", out, "--json")
    assert check.exit_code == 0, check.output
    checked = json.loads(check.stdout)
    assert checked["passed"] and any(c["graph"] == "end-to-end" for c in checked["checks"])


def test_existing_folder_needs_force(artifact, tmp_path, checkpoint):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--no-validate")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {out.absolute()} already exists: pass --force to replace it"]
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "model, message",
    [
        ("nobody/not-a-cached-model", "not in the local"),
        ("./no/such/folder", "no/such/folder"),
    ],
)
def test_bad_model_is_one_line(tmp_path, model, message):
    result = run_cli(model, "-o", tmp_path / "o", "--offline")  # never ask the real Hub from a test
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=50)).save_pretrained(tmp_path / "llama")
    result = run_cli(tmp_path / "llama", "-o", tmp_path / "o")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "LlamaForCausalLM" in line and "LlavaForConditionalGeneration" in line and "\n" not in line


def test_output_under_a_file_is_one_line(checkpoint, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "file" / "out")
    assert result.exit_code == 1 and "cannot create output folder" in result.stderr


def test_failed_validation_keeps_folder_under_failed_name(checkpoint, tmp_path):
    from attanchor_export.errors import ValidationFailed
    from attanchor_export.exporter import ExportOptions, export_artifact

    out = tmp_path / "strict"
    with pytest.raises(ValidationFailed) as info:
        export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=out, atol=1e-12))
    assert "validation failed" in str(info.value) and "\n" not in str(info.value)
    assert "same values on a second run" in str(info.value)  # onnxruntime repeats itself: not the flaky side
    assert any(not c.passed for c in info.value.checks)
    assert not out.exists()
    failed = tmp_path / "strict.failed"
    assert read_manifest(failed)["validation"]["passed"] is False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_export_leaves_nothing_under_final_name(checkpoint, tmp_path, sig):
    """Ctrl-C and SIGTERM (`timeout`, `kill`) clean up; SIGKILL cannot, so its staging folder records the
    owner and the next export to the same place removes it once that process is gone."""
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "attanchor_export.cli", str(checkpoint("clip-llama")), "-o", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As a terminal's Ctrl-C finds it: a suite started in the background (`pytest ... &`) passes an
        # ignored SIGINT on to its children, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    # Interrupt mid-write: once the vision graph exists in the partial folder.
    while time.time() < deadline and not list(tmp_path.glob(".interrupted.partial-*/vision.onnx")):
        time.sleep(0.05)
    assert proc.poll() is None, "export finished before it could be interrupted"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert not out.exists()
    partial = list(tmp_path.glob(".interrupted.partial-*"))
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
        assert not partial, "Ctrl-C must clean the partial folder"
    elif sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert stderr.strip().splitlines()[-1].startswith("error: terminated")
        assert not partial, "SIGTERM must clean the partial folder"
    else:
        assert len(partial) == 1 and partial[0].name.startswith(f".interrupted.partial-{proc.pid}@")
        from attanchor_export.artifact import remove_stale_staging

        assert remove_stale_staging(out) == partial  # what the next export to `out` does first
        assert not list(tmp_path.iterdir())


def test_help_lists_verbs():
    """Whole command names from the Commands section ("run" must not pass because "runtime" is printed)."""
    result = run_cli("--help")
    assert result.exit_code == 0, result.output
    section = result.output.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in section.splitlines() if line[:2] == "  " and line[2:3].strip()}
    assert {"run", "check", "build", "bench", "demo", "lint", "eval", "serve"} <= listed, listed


def test_mistral_decoder_exports_and_matches(checkpoint, tmp_path):
    """A third decoder family (LLaVA-1.6-Mistral style): export validation and end-to-end tokens."""
    from attanchor_runtime.manifest import Manifest

    from attanchor_export.checks.parity import validate_end_to_end
    from attanchor_export.exporter import ExportOptions, export_artifact
    from attanchor_export.load.checkpoint import load_checkpoint

    ck = checkpoint("clip-mistral")
    result = export_artifact(str(ck), ExportOptions(output=tmp_path / "mistral"))
    assert result.passed and read_manifest(tmp_path / "mistral")["family"]["model_types"]["text"] == "mistral"
    e2e = validate_end_to_end(load_checkpoint(str(ck)), Manifest.load(tmp_path / "mistral"))
    assert all(r.passed for r in e2e), [r for r in e2e if not r.passed]


def test_manifest_written_once_with_export_cost(checkpoint, tmp_path, monkeypatch):
    """Every file is hashed once, at the end; the torch model is gone before the artifact runs; the manifest
    says how it was validated and what the export cost."""
    import attanchor_export.exporter as exporter_module

    calls, model_at_compare = [], []
    real = exporter_module.write_manifest
    monkeypatch.setattr(exporter_module, "write_manifest", lambda manifest: (calls.append(manifest.folder),
                                                                            real(manifest))[1])
    real_compare, real_source = exporter_module.compare_with_source, exporter_module.source_outputs
    loaded_seen = []
    monkeypatch.setattr(exporter_module, "source_outputs",
                        lambda loaded, *a, **k: (loaded_seen.append(loaded), real_source(loaded, *a, **k))[1])
    monkeypatch.setattr(exporter_module, "compare_with_source",
                        lambda *a, **k: (model_at_compare.append(loaded_seen[0].model), real_compare(*a, **k))[1])
    out = tmp_path / "art"
    result = exporter_module.export_artifact(str(checkpoint("clip-llama")), exporter_module.ExportOptions(output=out))
    assert result.passed and len(calls) == 1
    # PyTorch's outputs first, then the model is dropped before onnxruntime loads the same weights.
    assert model_at_compare == [None]
    assert read_manifest(out)["validation"]["method"] == "pytorch-reference-first"
    cost = read_manifest(out)["export"]
    assert cost["peak_rss_bytes"] > 50 << 20  # the interpreter, torch and onnxruntime at least
    assert cost["parameters"] > 0 and cost["fp32_weight_bytes"] == 4 * cost["parameters"]
    assert cost["checkpoint_weight_bytes"] > 0 and cost["seconds"] > 0
    assert cost["artifact_bytes"] >= sum(r["bytes"] for r in read_manifest(out)["files"].values())
    weights = sum(r["bytes"] for f, r in read_manifest(out)["files"].items() if f.endswith((".data", ".bin")))
    assert weights <= cost["disk_needed_bytes"] <= cost["disk_free_bytes"]


def _refused_before_tracing(monkeypatch, checkpoint, tmp_path, patched: str, value, *options) -> str:
    """Export a tiny checkpoint with `patched` (a name in exporter) replaced by a lambda returning `value`:
    it must fail with exit 1 before any tracing and leave nothing behind; returns its one-line error."""
    import attanchor_export.exporter as exporter_module

    monkeypatch.setattr(exporter_module, patched, lambda *a: value)
    traced = []
    monkeypatch.setattr(exporter_module, "export_decoder", lambda *a, **k: traced.append(a))
    result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "out", *options)
    assert result.exit_code == 1 and not traced
    assert not list(tmp_path.iterdir())
    line = result.stderr.strip()
    assert "\n" not in line
    return line


def test_int8_over_the_memory_budget_fails_before_tracing(checkpoint, tmp_path, monkeypatch):
    """int8's TensorRT form is calibrated on the whole fp32 decoder: over the budget the export says so in
    one line right after the load, instead of running out of memory after the checks (a 7B decoder)."""
    from attanchor_export.export_cost import INT8_CALIBRATION_FACTOR, int8_calibration_problem

    gib = 1 << 30
    assert int8_calibration_problem(10 * gib, int(INT8_CALIBRATION_FACTOR * 10 * gib)) is None
    assert "about 39.00 GiB" in int8_calibration_problem(26 * gib, 22 * gib)  # sized from the decoder
    line = _refused_before_tracing(monkeypatch, checkpoint, tmp_path, "memory_budget_bytes", 1 << 10, "--quant", "int8")
    assert "--quant int8" in line and "1.0 KiB budget" in line and "--quant int4" in line


def test_too_little_disk_fails_before_tracing(checkpoint, tmp_path, monkeypatch):
    """The disk check runs right after the load: a one-line error naming the need and the free space,
    and no staging folder, instead of a disk-full error after the trace."""
    line = _refused_before_tracing(monkeypatch, checkpoint, tmp_path, "free_disk_bytes", 1 << 10, "--dtype", "fp16")
    assert "not enough free disk" in line and "fp16" in line and "1.0 KiB is free" in line
