"""Engine folders written all-or-nothing and refused when foreign, on a CPU against both fake TensorRT
generations: a rebuild replaces the folder only when complete, a failed gate keeps it aside as
NAME.failed, a failed build leaves nothing, engines from another export, GPU or TensorRT are refused.
The folder mechanics themselves (attanchor_runtime.atomic_folder) are tested first, without TensorRT."""

from __future__ import annotations

import json

import pytest
from attanchor_runtime.atomic_folder import atomic_folder, in_progress
from attanchor_runtime.errors import ArtifactError
from attanchor_runtime.manifest import Manifest
from fake_tensorrt import TRT10, TRT11, FakeCuda, generations_fixture, make_fake_trt

from attanchor_export.artifact import staging_folder
from attanchor_export.errors import ExportError
from attanchor_export.trt import build as trt_build
from attanchor_export.trt.build import build_engines

fake = generations_fixture()


def _engine_json(result) -> dict:
    return json.loads((result.engine_dir / "engine.json").read_text())


# ---- the all-or-nothing folder ---------------------------------------------------------------------------
def test_atomic_folder_renames_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with atomic_folder(final) as staging:
        (staging.path / "a.txt").write_text("new")
        assert in_progress(staging.path) and not final.exists()
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(final) as staging:  # a second write replaces the first only at the end
        (staging.path / "b.txt").write_text("newer")
        assert (final / "a.txt").is_file()
    assert [p.name for p in final.iterdir()] == ["b.txt"]


def test_atomic_folder_leaves_nothing_on_error_and_keeps_a_failed_one(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(final) as staging:
        (staging.path / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError), atomic_folder(final) as staging:
        (staging.path / "a.txt").write_text("bad")
        failed = staging.fail()
        raise RuntimeError("gate failed")
    assert failed == tmp_path / "out.failed" and (failed / "a.txt").read_text() == "bad" and not final.exists()
    assert not in_progress(failed)


def test_staging_folder_refuses_an_existing_target_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match="already exists: pass --force"), staging_folder(tmp_path / "out"):
        pass
    with staging_folder(tmp_path / "out", force=True) as staging:
        (staging.path / "x").write_text("1")
    assert (tmp_path / "out" / "x").is_file()


# ---- engine folders ----------------------------------------------------------------------------------------
def test_rebuild_replaces_the_folder_and_reuses_the_timing_cache(fake, workdir):
    folder = workdir("clip-t2i")
    first = build_engines(folder, max_input_len=64, max_seq_len=96, gate=False)
    cache = (first.engine_dir / "timing.cache").read_bytes()
    second = build_engines(folder, max_input_len=80, max_seq_len=96, gate=False)
    assert second.engine_dir == first.engine_dir
    assert (second.engine_dir / "timing.cache").read_bytes().startswith(cache)  # loaded, then extended
    assert _engine_json(second)["plan"]["options"]["max_input_len"] == 80
    assert [p.name for p in (folder / "engines").iterdir()] == [first.engine_dir.name]


def test_gate_failure_keeps_engines_aside(fake, workdir, monkeypatch):
    from attanchor_runtime.trt_backend import TrtBackend

    trt, cuda = fake
    folder = workdir("clip-t2i")
    real_compare = trt_build.compare

    def pessimist(ref, got, gate, graph, case):
        check = real_compare(ref, got, gate, graph, case)
        return {**check, "passed": graph != "decoder"}

    monkeypatch.setattr(trt_build, "compare", pessimist)
    with pytest.raises(trt_build.GateFailed, match="engine gate check") as info:
        build_engines(folder, max_input_len=64, max_seq_len=96)
    failed = folder / "engines" / f"fake-orin-sm87-trt{trt.__version__}.failed"
    assert str(failed) in str(info.value) and (failed / "engine.json").is_file()
    assert [p.name for p in (folder / "engines").iterdir()] == [failed.name]  # nothing under the real name
    with pytest.raises(ArtifactError, match="failed its accuracy gate"):
        TrtBackend(Manifest.load(folder), trt=trt, cuda=cuda)


def test_a_failed_build_leaves_nothing(fake, workdir, monkeypatch):
    trt, _ = fake
    folder = workdir("clip-t2i")
    monkeypatch.setattr(trt.Builder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(trt_build.EngineBuildError, match=f"TensorRT {trt.__version__} failed to build vision.plan"):
        build_engines(folder, max_input_len=64, max_seq_len=96)
    assert not any((folder / "engines").iterdir())


def test_engines_from_another_export_are_refused(fake, workdir):
    from attanchor_runtime.trt_backend import TrtBackend

    trt, cuda = fake
    folder = workdir("clip-t2i")
    result = build_engines(folder, max_input_len=64, max_seq_len=96, gate=False)
    meta = _engine_json(result)
    meta["engines"]["decoder"]["sources"]["decoder.onnx"] = "0" * 64
    (result.engine_dir / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="built from another decoder.onnx"):
        TrtBackend(Manifest.load(folder), trt=trt, cuda=cuda)
    with pytest.raises(ArtifactError, match="built for sm87"):
        TrtBackend(Manifest.load(folder), trt=trt, cuda=FakeCuda(sm=(8, 9)))
    other = make_fake_trt(cuda, TRT11 if trt.__version__ == TRT10 else TRT10)
    with pytest.raises(ArtifactError, match=f"built with TensorRT {trt.__version__}"):
        TrtBackend(Manifest.load(folder), trt=other, cuda=cuda)
