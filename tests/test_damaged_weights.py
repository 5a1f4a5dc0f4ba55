"""Damaged weights never answer: NaN/Inf in a checkpoint stops the export (naming the tensor), `check`
scans every weight of an artifact, fp32 NaN logits point at the weights, and run/eval/bench --verify
sha256 catch a same-size edit that the default size check lets through."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from attanchor_runtime import NumericsError, Pipeline
from attanchor_runtime.manifest import Manifest, write_manifest
from click.testing import CliRunner
from PIL import Image

from attanchor_export.cli import main
from attanchor_export.errors import CheckpointError


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def damaged_checkpoint(checkpoint, tmp_path, key: str, index: tuple, value: float):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(checkpoint("clip-llama"), folder)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors[key][index] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("key, index, value, named", [
    # read when the checkpoint loads (the embedding table is materialised)
    ("language_model.model.embed_tokens.weight", (17, 3), float("nan"), "model.language_model.embed_tokens.weight"),
    # read when the decoder graph's external data is written (streamed)
    ("language_model.model.layers.1.mlp.down_proj.weight", (2, 5), float("inf"),
     "model.language_model.layers.1.mlp.down_proj.weight"),
])
def test_non_finite_checkpoint_weights_stop_the_export(checkpoint, tmp_path, key, index, value, named):
    folder = damaged_checkpoint(checkpoint, tmp_path, key, index, value)
    out = tmp_path / "out"
    result = run_cli(folder, "-o", out, "--quiet")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: the checkpoint is damaged: tensor {named} holds 1 NaN/Inf value(s), the first at index "
        f"{list(index)}; nothing was exported"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no output, no staging folder


def test_a_whole_loaded_checkpoint_is_scanned_too(checkpoint, tmp_path, monkeypatch):
    """Where the model is loaded whole (a LoRA merge, no safetensors), its weights are scanned before tracing."""
    import attanchor_export.exporter as exporter

    folder = damaged_checkpoint(checkpoint, tmp_path, "language_model.model.layers.0.self_attn.q_proj.weight",
                                (0, 0), float("nan"))
    real = exporter.load_checkpoint
    monkeypatch.setattr(exporter, "load_checkpoint", lambda located, **kw: real(located, **{**kw, "streamed": False}))
    with pytest.raises(CheckpointError, match=r"tensor model.language_model.layers.0.self_attn.q_proj.weight holds 1"):
        exporter.export_artifact(str(folder), exporter.ExportOptions(output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def nan_artifact(artifact, tmp_path_factory):
    """An artifact whose embedding row 17 is NaN and whose manifest agrees (as an older exporter wrote
    from a damaged checkpoint): sizes and sha256 all match."""
    folder = tmp_path_factory.mktemp("nan") / "art"
    shutil.copytree(artifact("clip-t2i"), folder)
    manifest = Manifest.load(folder, verify="none")
    entry = manifest.embed_table
    table = np.memmap(folder / entry.file, dtype=entry.dtype, mode="r+", shape=tuple(entry.shape))
    table[17, 3] = np.nan
    table.flush()
    del table
    write_manifest(manifest)  # sizes and sha256 recorded again: they agree with the damaged table
    return folder


def test_check_names_a_non_finite_weight(nan_artifact):
    result = run_cli("check", nan_artifact, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    bad = [c for c in report["checks"] if not c["passed"]]
    assert bad == [{"graph": "embedding.onnx", "case": "embed_tokens.weight", "metric": "non_finite_values",
                    "value": 1, "limit": 0, "passed": False}]
    assert "embed_tokens.weight in embedding.onnx" in report["sections"]["weights"]


def test_nan_logits_of_an_fp32_artifact_point_at_the_weights(nan_artifact):
    pipe = Pipeline.load(nan_artifact)
    size = pipe.manifest.dims.image_size
    ids = np.array([1, pipe.manifest.text.image_token_id, 17, 17, 5], np.int64)
    pixels = np.zeros((1, 3, size, size), np.float32)
    with pytest.raises(NumericsError) as info:
        pipe.generate(input_ids=[ids], pixel_values=pixels, max_new_tokens=2)
    assert "the artifact's weights or this input hold NaN/Inf" in str(info.value)
    assert f"attanchor-export check {nan_artifact}" in str(info.value) and "use an fp32 artifact" not in str(info.value)


@pytest.fixture(scope="module")
def edited(artifact, tmp_path_factory):
    """A same-size edit of decoder.onnx.data: every size still matches the manifest."""
    folder = tmp_path_factory.mktemp("edited") / "art"
    shutil.copytree(artifact("clip-t2i"), folder)
    with open(folder / "decoder.onnx.data", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x40]))
    image = folder.parent / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    return folder, image


def test_run_verify_sha256_catches_a_same_size_edit(edited):
    folder, image = edited
    args = ("run", folder, "--image", image, "--prompt", "what is it?", "--max-new-tokens", "2")
    assert run_cli(*args).exit_code == 0  # the default (size) does not read the bytes: documented
    result = run_cli(*args, "--verify", "sha256")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {folder}: decoder.onnx.data does not match its sha256 in the manifest"]


@pytest.mark.parametrize("verb", ["eval", "bench"])
def test_eval_and_bench_verify_sha256(edited, verb, tmp_path):
    folder, image = edited
    if verb == "eval":
        data = tmp_path / "q.jsonl"
        data.write_text(json.dumps({"image": str(image), "question": "what?", "answer": "a"}) + "\n")
        args = ("eval", folder, "--data", data)
    else:
        args = ("bench", folder, "--max-new-tokens", "2", "--repeats", "1")
    result = run_cli(*args, "--verify", "sha256")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {folder}: decoder.onnx.data does not match its sha256 in the manifest")
