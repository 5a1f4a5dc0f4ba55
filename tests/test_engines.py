"""attanchor_runtime.engines: engine.json written and read by one module, engine folder choice and refusal."""

from __future__ import annotations

import json

import pytest
from attanchor_runtime.engines import (
    ENGINE_FORMAT_VERSION,
    EngineMeta,
    check_sources,
    engine_dir_name,
    engine_mismatch,
    engine_record,
    find_engine_dir,
    onnxruntime_record,
    open_engine_dir,
    read_engine_meta,
    select_profile,
    sm_string,
)
from attanchor_runtime.errors import ArtifactError
from attanchor_runtime.manifest import Manifest
from helpers import tiny_manifest


def meta(**kw) -> EngineMeta:
    fields = dict(tensorrt="10.3.0.30", gpu="Orin", sm="87", compute_capability="8.7", gpu_memory_bytes=8 << 30,
                  built_at="2026-12-01T00:00:00+00:00", build_seconds=1.0, plan={"options": {"empty_past": "zero"}},
                  engines={})
    return EngineMeta(**{**fields, **kw})


def write(root, name, m: EngineMeta):
    (root / "engines" / name).mkdir(parents=True)
    m.write(root / "engines" / name)


def test_engine_json_round_trip(tmp_path):
    record = engine_record(file="decoder.plan", onnx="decoder.onnx", sources={"decoder.onnx": "ab"},
                           profiles=[{"name": "prefill"}], precision="fp16", tf32=False, nbytes=10,
                           build_seconds=0.5)
    m = meta(engines={"decoder": record, "embedding": onnxruntime_record(onnx="embedding.onnx", reason="K")},
             plan={"options": {"empty_past": "masked-slot"}})
    m.write(tmp_path)
    data = json.loads((tmp_path / "engine.json").read_text())
    assert data["format"] == "attanchor-engines" and data["format_version"] == ENGINE_FORMAT_VERSION
    assert "gate" not in data  # written only once the gate ran
    back = read_engine_meta(tmp_path)
    assert back == m
    assert back.on_tensorrt("decoder") and not back.on_tensorrt("embedding") and not back.on_tensorrt("vision")
    assert back.empty_past == "masked-slot" and not back.gate_failed
    m.gate = {"passed": False, "checks": []}
    m.write(tmp_path)
    assert read_engine_meta(tmp_path).gate_failed


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "cannot read"),
    (json.dumps({"format": "attanchor-engines", "format_version": 99}), "not an engine.json this runtime reads"),
    (json.dumps({"format": "attanchor-engines", "format_version": ENGINE_FORMAT_VERSION, "sm": "87"}),
     "lacks build_seconds, built_at"),
])
def test_unreadable_engine_json_is_one_line(tmp_path, text, message):
    (tmp_path / "engine.json").write_text(text)
    with pytest.raises(ArtifactError, match=message) as info:
        read_engine_meta(tmp_path)
    assert "\n" not in str(info.value)


def test_engine_refusal(tmp_path):
    assert engine_mismatch(meta(), "87", "10.3.0.30") is None
    assert "sm87" in engine_mismatch(meta(), "89", "10.3.0.30")
    assert "TensorRT 10.3.0.30" in engine_mismatch(meta(), "87", "11.5.0")
    failed = meta(gate={"passed": False})
    assert "gate" in engine_mismatch(failed, "87", "10.3.0.30")
    assert engine_mismatch(failed, "87", "10.3.0.30", require_gate=False) is None
    with pytest.raises(ArtifactError, match="no TensorRT engines in .*attanchor-export build"):
        find_engine_dir(tmp_path, "87", "10.3.0.30")


def test_find_engine_dir_picks_this_gpu_and_tensorrt(tmp_path):
    write(tmp_path, "orin-sm87-trt10.3.0.30", meta())
    write(tmp_path, "orin-sm87-trt11.5.0", meta(tensorrt="11.5.0"))
    write(tmp_path, ".orin-sm87-trt11.5.0.partial-x1", meta(tensorrt="11.5.0"))  # a build in progress
    write(tmp_path, "rtx-sm89-trt11.5.0.failed", meta(sm="89", tensorrt="11.5.0", gate={"passed": False}))
    path, found = find_engine_dir(tmp_path, "87", "11.5.0")
    assert path.name == "orin-sm87-trt11.5.0" and found.tensorrt == "11.5.0"
    assert find_engine_dir(tmp_path, "87", "10.3.0.30")[0].name == "orin-sm87-trt10.3.0.30"
    with pytest.raises(ArtifactError) as info:
        find_engine_dir(tmp_path, "89", "11.5.0")
    message = str(info.value)
    assert "failed its accuracy gate" in message and "built for sm87" in message and ".partial" not in message
    assert f"rebuild with `attanchor-export build {tmp_path}`" in message and "\n" not in message


def _files(data_digest: str) -> Manifest:
    return tiny_manifest(files={"decoder.onnx": {"bytes": 1, "sha256": "aa"},
                                "decoder.onnx.data": {"bytes": 1, "sha256": data_digest}})


def test_check_sources(tmp_path):
    m = meta(engines={"decoder": {"sources": {"decoder.onnx": "aa", "decoder.onnx.data": "bb"}}})
    check_sources(m, _files("bb"), tmp_path)
    with pytest.raises(ArtifactError, match="built from another decoder.onnx.data"):
        check_sources(m, _files("cc"), tmp_path)


def test_the_records_accessors():
    profiles = [{"name": "prefill", "dims": {"total_len": [1, 64, 64]}, "shapes": {}},
                {"name": "decode", "dims": {"total_len": [2, 96, 128]}, "shapes": {}}]
    record = engine_record(file="decoder.plan", onnx="decoder.onnx", sources={}, profiles=profiles,
                           precision="fp32", tf32=False, nbytes=1, build_seconds=0.1)
    m = meta(engines={"decoder": record})
    assert m.engine_file("decoder") == "decoder.plan" and m.profiles("decoder") == profiles
    assert m.max_dim("decoder", "total_len") == 128


def test_open_engine_dir(tmp_path):
    sources = {"decoder": {"backend": "tensorrt", "sources": {"decoder.onnx": "aa"}}}
    write(tmp_path, "orin-sm87-trt10.3.0.30", meta(engines=sources))
    write(tmp_path, "orin-sm87-trt10.3.0.30.failed", meta(engines=sources, gate={"passed": False}))
    manifest = tiny_manifest(tmp_path, files={"decoder.onnx": {"bytes": 1, "sha256": "aa"}})
    path, found = open_engine_dir(manifest, "87", "10.3.0.30")
    assert path.name == "orin-sm87-trt10.3.0.30" and found.on_tensorrt("decoder")
    # Named explicitly (the build gate does): a failed gate is no reason to refuse, another GPU is.
    failed = tmp_path / "engines" / "orin-sm87-trt10.3.0.30.failed"
    assert open_engine_dir(manifest, "87", "10.3.0.30", failed)[0] == failed
    with pytest.raises(ArtifactError, match="orin-sm87-trt10.3.0.30.failed: built for sm87"):
        open_engine_dir(manifest, "89", "10.3.0.30", failed)
    with pytest.raises(ArtifactError, match="built from another decoder.onnx"):
        open_engine_dir(tiny_manifest(tmp_path, files={"decoder.onnx": {"bytes": 1, "sha256": "bb"}}), "87",
                        "10.3.0.30")


def test_select_profile_is_the_engines_module_s():
    from attanchor_runtime import trt_backend

    assert trt_backend.select_profile is select_profile  # the backend's name for it, tests/test_trt_backend.py


def test_engine_dir_name():
    assert engine_dir_name("Orin", (8, 7), "10.3.0.30") == "orin-sm87-trt10.3.0.30"
    assert engine_dir_name("NVIDIA GeForce RTX 4090", "8.9", "10.7.0") == "nvidia-geforce-rtx-4090-sm89-trt10.7.0"
    assert engine_dir_name("NVIDIA H100 80GB HBM3", "sm_90", "11.5.0") == "nvidia-h100-80gb-hbm3-sm90-trt11.5.0"
    assert sm_string(87) == "87" and sm_string("12.0") == "120"
    with pytest.raises(ValueError):
        sm_string("orin")
