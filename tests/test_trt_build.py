"""Engine builds and the trt backend end to end on a CPU, against both fake TensorRT generations.

Every build test runs twice, against the 10.x fake (JetPack 6's API) and the 11.x fake (the names
TensorRT 11 removed are absent, see tests/fake_tensorrt.py), so a call that exists in only one
generation fails here. What a machine without tensorrt says is at the end. The engine folder
(replace, keep a failed one aside, refuse a foreign one): tests/test_trt_engine_folder.py; the
backend's decode against onnxruntime: tests/test_trt_backend.py. Real engines: tests/test_trt_gpu.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from attanchor_runtime.manifest import Manifest
from engine_inputs import prompt_rows, random_pixels
from fake_tensorrt import PRECISION_FLAGS, TRT10, TRT11, FakeCuda, generations_fixture, install, make_fake_trt

from attanchor_export.trt import build as trt_build
from attanchor_export.trt.build import build_engines

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
fake = generations_fixture()


def _engine_json(result) -> dict:
    return json.loads((result.engine_dir / "engine.json").read_text())


# ---- the fakes model what each generation has --------------------------------------------------------
def test_the_fakes_differ_where_tensorrt_10_and_11_differ(tmp_path):
    old, new = make_fake_trt(FakeCuda(), TRT10), make_fake_trt(FakeCuda(), TRT11)
    for name in PRECISION_FLAGS:
        assert hasattr(old.BuilderFlag, name)
        with pytest.raises(AttributeError):
            getattr(new.BuilderFlag, name)
    assert hasattr(old.TacticSource, "CUDNN") and not hasattr(new.TacticSource, "CUBLAS")
    assert old.Builder(None).platform_has_fast_fp16 and not hasattr(new.Builder(None), "platform_has_fast_int8")
    assert hasattr(old.Builder(None).create_builder_config(), "int8_calibrator")
    assert not hasattr(new.Builder(None).create_builder_config(), "int8_calibrator")
    old.Builder(None).create_builder_config().int8_calibrator = object()  # 10.x: a property
    with pytest.raises(AttributeError):  # 11.x: assigning the removed property fails, as real bindings do
        new.Builder(None).create_builder_config().int8_calibrator = object()
    # 10.x: weakly typed by default, and a strongly typed network refuses precision flags.
    builder = old.Builder(None)
    assert not builder.create_network(0).strongly_typed
    network = builder.create_network(trt_build.strongly_typed_network_flags(old))
    config = builder.create_builder_config()
    config.set_flag(old.BuilderFlag.FP16)
    assert network.strongly_typed and builder.build_serialized_network(network, config) is None
    # 11.x: strongly typed whatever the flags say.
    assert new.Builder(None).create_network(0).strongly_typed


# ---- builds --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "empty_past"), [("clip-t2i", "zero"), ("siglip-t2i-k4", "masked-slot")])
def test_build_and_generate(fake, workdir, name, empty_past):
    from attanchor_runtime import Pipeline
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.trt_backend import TrtBackend

    trt, cuda = fake
    folder = workdir(name)
    result = build_engines(folder, max_batch=2, max_input_len=64, max_seq_len=96, empty_past=empty_past)
    assert result.engine_dir == folder / "engines" / f"fake-orin-sm87-trt{trt.__version__}"
    meta = _engine_json(result)
    assert meta == result.meta.to_json()
    assert meta["gate"]["passed"], meta["gate"]
    assert {c["case"] for c in meta["gate"]["checks"] if c["graph"] == "decoder"} == {"prefill", "decode step"}
    assert meta["sm"] == "87" and meta["tensorrt"] == trt.__version__ and meta["compute_capability"] == "8.7"
    files = Manifest.load(folder).files
    for record in meta["engines"].values():
        for source, digest in record.get("sources", {}).items():
            assert files[source].sha256 == digest
    assert (result.engine_dir / "timing.cache").is_file()
    # fp32: strongly typed, no precision flag, TF32 (on by default) cleared.
    assert trt.built and all(b["strongly_typed"] and b["flags"] == [] for b in trt.built)
    assert not list((folder / "engines").glob(".*"))  # no staging left behind
    has_k = name.endswith("k4")
    assert (meta["engines"]["embedding"]["backend"] == "tensorrt") is has_k

    manifest = Manifest.load(folder)
    trt_pipe = Pipeline(manifest, TrtBackend(manifest, trt=trt, cuda=cuda))
    ort_pipe = Pipeline(manifest, OrtBackend(manifest))
    ids, pixels = prompt_rows(folder), random_pixels(folder, 2)
    trt.executions.clear()
    got = trt_pipe.generate(ids, pixels, max_new_tokens=6)
    want = ort_pipe.generate(ids, pixels, max_new_tokens=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.anchors == want.anchors
    profiles = [p for graph, p in trt.executions if graph.startswith("decoder")]
    assert profiles[0] == 0 and set(profiles[1:]) == {1}, "prefill profile first, then the decode profile"
    trt_pipe.backend.close()
    assert not cuda.mem, "every device buffer is freed"


def test_a_tensorrt_without_the_strongly_typed_name_still_builds(monkeypatch, workdir):
    """11.0 deprecated STRONGLY_TYPED (every network is strongly typed): a release may drop the name."""
    cuda = FakeCuda()
    trt, _ = install(monkeypatch, make_fake_trt(cuda, TRT11, strongly_typed_flag=False), cuda)
    assert trt_build.strongly_typed_network_flags(trt) == 0
    result = build_engines(workdir("clip-t2i"), max_input_len=64, max_seq_len=96)
    assert result.meta.gate["passed"] and all(b["strongly_typed"] for b in trt.built)


# ---- quantized artifacts: the graphs carry the precision --------------------------------------------
@pytest.fixture(scope="module")
def fp16_int4(checkpoint, tmp_path_factory):
    """An fp16 + int4 export (fp16 vision and decoder with fp32 islands; decoder.trt.onnx with INT4 Q/DQ)."""
    from attanchor_export.exporter import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("fp16-int4") / "art"
    export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=out, dtype="fp16", quant="int4",
                                                                block_size=64, validate=False, max_anchors=4))
    return out


def test_fp16_and_int4_build_strongly_typed_with_no_precision_flag(fake, fp16_int4, tmp_path):
    trt, _ = fake
    folder = tmp_path / "art"
    shutil.copytree(fp16_int4, folder)
    result = build_engines(folder, max_input_len=64, max_seq_len=96)
    records = result.meta.engines
    assert records["decoder"]["onnx"] == "decoder.trt.onnx"
    assert {g: r["precision"] for g, r in records.items()} == {
        "vision": "fp16", "embedding": "fp32", "decoder": "fp16 + int4 QDQ"}
    assert len(trt.built) == 3 and all(b["strongly_typed"] and b["flags"] == [] for b in trt.built)
    gate = result.meta.gate
    assert gate["passed"], gate
    assert {c["metric"] for c in gate["checks"] if c["graph"] != "embedding"} == {"cosine"}


# ---- what a machine without tensorrt says -----------------------------------------------------------
@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here: the missing-tensorrt path cannot run")
def test_build_without_tensorrt_is_one_line(workdir):
    folder = workdir("clip-t2i")
    with pytest.raises(trt_build.TrtUnavailable) as info:
        build_engines(folder, max_input_len=64, max_seq_len=96)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert "tensorrt" in message and "pip install 'attanchor-export[trt]'" in message
    assert "python3-libnvinfer" in message and str(folder) in message and "ONNX graphs are written" in message
    assert not (folder / "engines").exists() or not any((folder / "engines").iterdir())


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here: the missing-tensorrt path cannot run")
def test_cli_build_and_trt_export_exit_2(workdir, checkpoint, tmp_path):
    from click.testing import CliRunner

    from attanchor_export.cli import main

    folder = workdir("clip-t2i")
    runner = CliRunner()
    result = runner.invoke(main, ["build", str(folder), "--max-input-len", "64", "--max-seq-len", "96"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot build TensorRT engines: the tensorrt Python package is not installed")
    assert "Traceback" not in result.output
    out = tmp_path / "exported"
    result = runner.invoke(main, [str(checkpoint("clip-llama")), "-o", str(out), "--trt", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "ONNX graphs are written in" in result.output and str(out) in result.output
    assert (out / "manifest.json").is_file()  # the export itself is complete
