"""attanchor_runtime.manifest: the typed sections every reader of manifest.json goes through.

No export: which ONNX file each backend opens (fp32 and quantized artifacts), the source checkpoint,
precision, anchor and text sections, the family payload, the writer's round trip, the version check
on load, and that no module outside manifest.py reads manifest data by key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from attanchor_runtime.errors import ArtifactError
from attanchor_runtime.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Family,
    Manifest,
    NoGraphForm,
    Precision,
    Text,
    write_manifest,
)
from helpers import tiny_manifest

GRAPHS = ("vision", "embedding", "decoder")


def int4(**trt) -> dict:
    """What quantize.py writes for an int4 export: MatMulNBits for onnxruntime, QDQ for TensorRT."""
    return {"dtype": "fp16", "quant": "int4",
            "backends": {"ort": {"vision": "vision.onnx", "decoder": "decoder.onnx"},
                         "trt": {"vision": "vision.onnx", "decoder": "decoder.trt.onnx", **trt}}}


def test_an_fp32_artifact_opens_each_graph_s_own_file_on_every_backend():
    m = tiny_manifest(precision={"dtype": "fp32", "quant": "none"})
    for backend in ("ort", "trt"):
        assert [m.graph_file(g, backend) for g in GRAPHS] == ["vision.onnx", "embedding.onnx", "decoder.onnx"]
    assert tiny_manifest().graph_file("decoder", "trt") == "decoder.onnx"  # no precision section: fp32
    assert m.graph_file("decoder") == "decoder.onnx"  # onnxruntime unless told


def test_a_quantized_artifact_names_a_file_per_backend():
    m = tiny_manifest(precision=int4())
    assert m.graph_file("decoder", "ort") == "decoder.onnx"
    assert m.graph_file("decoder", "trt") == "decoder.trt.onnx"
    assert m.graph_file("embedding", "trt") == "embedding.onnx"  # never quantized: not listed
    assert m.path(m.graph_file("decoder", "trt")) == Path("/artifact/decoder.trt.onnx")


def test_no_form_for_a_backend_is_one_line():
    m = tiny_manifest(precision=int4(decoder=None))  # forms=("MatMulNBits",): nothing for TensorRT
    with pytest.raises(NoGraphForm, match="no TensorRT form of its decoder graph") as info:
        m.graph_file("decoder", "trt")
    assert isinstance(info.value, ArtifactError) and "\n" not in str(info.value)
    assert "int4 was written for onnxruntime only" in str(info.value)
    assert m.graph_file("decoder", "ort") == "decoder.onnx"
    with pytest.raises(ValueError, match="backend must be one of ort, trt"):
        m.graph_file("decoder", "tensorrt")


def test_precision():
    fp32 = tiny_manifest().precision
    assert fp32 == Precision() and not fp32.quantized and fp32.label == "fp32/none"
    assert fp32.backends == {} and fp32.gate is None and not fp32.vision_quantized
    q = tiny_manifest(precision={**int4(), "gate": {"format": "int4", "floors": {"top1": 0.9}},
                                 "vision_quantized": True}).precision
    assert q.quantized and (q.dtype, q.quant, q.label, q.format) == ("fp16", "int4", "fp16/int4", "int4")
    assert q.backends["trt"]["decoder"] == "decoder.trt.onnx" and q.gate.floors == {"top1": 0.9}
    assert q.vision_quantized
    assert tiny_manifest(precision={"dtype": "fp16", "quant": "none"}).precision.quantized
    assert json.loads(json.dumps(q.to_json()))["dtype"] == "fp16"  # reports embed it as JSON
    fused = tiny_manifest(precision={**int4(), "graphs": {"decoder.onnx": {
        "graph": "decoder", "dtype": "fp16", "format": "MatMulNBits", "ort_fusions": {"kv_cache": "append"}}}})
    assert fused.precision.kv_cache("decoder.onnx") == "append" and fused.precision.kv_cache("x.onnx") == "concat"


def test_source():
    adapter = {"source": "lora/", "resolved": "/abs/lora", "sha256": "ab", "files": {}}
    src = tiny_manifest(source={"model": "tiny", "resolved": "/ckpt/tiny", "alias": "tiny", "revision": "main",
                                "commit": "abc", "adapter": adapter}).source
    assert (src.model, src.resolved, src.alias, src.revision, src.commit) == ("tiny", "/ckpt/tiny", "tiny", "main",
                                                                             "abc")
    assert (src.adapter.source, src.adapter.resolved, src.adapter.sha256) == ("lora/", "/abs/lora", "ab")
    empty = tiny_manifest().source
    assert empty.model is None and empty.resolved is None and empty.adapter is None
    assert tiny_manifest(source={"model": "m", "adapter": None}).source.adapter is None


def test_anchor_and_text():
    m = tiny_manifest(anchor={"mode": "i2t", "threshold": 0.25, "max_anchors": 4, "calibration": None},
                      text={"tokenizer_file": "tokenizer.json", "image_token_id": 7, "pad_token_id": 0,
                            "bos_token_id": 1, "eos_token_ids": [2], "chat_template": None})
    assert (m.anchor.mode, m.anchor.threshold, m.anchor.max_anchors, m.anchor.calibration) == ("i2t", 0.25, 4, None)
    assert isinstance(tiny_manifest(anchor={"mode": "t2i", "threshold": 1}).anchor.threshold, float)
    assert tiny_manifest(anchor={"mode": "t2i", "threshold": 1, "max_anchors": None}).anchor.max_anchors is None
    assert tiny_manifest(anchor={"mode": "t2i", "threshold": 1, "max_anchors": 0}).anchor.max_anchors is None
    text = m.text
    assert (text.tokenizer_file, text.image_token_id, text.pad_token_id, text.bos_token_id) == \
        ("tokenizer.json", 7, 0, 1)
    assert text.eos_token_ids == (2,) and text.chat_template is None and text.special_ids == {7, 0, 1, 2}
    assert Text(image_token_id=7).pad_or_zero == 0


def test_family_payload_is_the_family_s_own_type():
    from attanchor_runtime.families import family_of
    from attanchor_runtime.families.llava import LlavaPayload

    m = tiny_manifest()
    assert m.family.name == "llava" and m.family.payload_as(LlavaPayload).positions == "sequential"
    assert type(family_of(m)).__name__ == "Llava"
    unknown = tiny_manifest(family={**m.family.to_json(), "name": "nope"})
    with pytest.raises(ArtifactError, match="model family 'nope' is not supported"):
        family_of(unknown)
    assert isinstance(Family.from_json(m.family.to_json()), Family)


def test_a_bad_section_is_one_line_naming_the_field():
    with pytest.raises(ArtifactError, match=r"manifest.dims.hidden_size must be int") as info:
        tiny_manifest(dims={"hidden_size": "wide"})
    assert "\n" not in str(info.value) and "re-export" in str(info.value)
    with pytest.raises(ArtifactError, match=r"manifest.text.image_token_id is missing"):
        tiny_manifest(text={})


def test_the_writer_round_trips_every_section(tmp_path):
    (tmp_path / "vision.onnx").write_bytes(b"x" * 5)
    written = write_manifest(tiny_manifest(tmp_path, precision=int4()))
    assert written.files["vision.onnx"].bytes == 5
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert (data["format"], data["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert "folder" not in data and data["family"]["name"] == "llava"
    assert Manifest.load(tmp_path) == written


def test_files_and_load_refuses_another_format_version(tmp_path):
    assert tiny_manifest().files == {}
    assert tiny_manifest(files={"a.onnx": {"bytes": 1, "sha256": "x"}}).files["a.onnx"].bytes == 1
    for version in (FORMAT_VERSION - 1, FORMAT_VERSION + 1):
        (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": version}))
        with pytest.raises(ArtifactError, match=f"format version {version}, this runtime reads "
                                                f"{FORMAT_VERSION}: re-export") as info:
            Manifest.load(tmp_path)
        assert "\n" not in str(info.value)


# Reads of manifest data by key: manifest[...] / .get(...), a section's ["..."] / .get("...") (sections read
# straight off a manifest, or held in a variable named after them), and manifest.json parsed by hand.
RAW_READ = re.compile(
    r"""\bmanifest(_data)?(\[|\.get\()"""
    r"""|\.data(\[|\.get\()"""
    r"""|\bmanifest\.\w+(\[["']|\.get\(["'])"""
    r"""|(?<![\w.])(dims|text|anchor|precision|source|graphs|embed_table|family|validation|export)(\[["']|\.get\(["'])"""
    r"""|json\.loads?\(.*(manifest|MANIFEST)""")


def test_nothing_outside_manifest_py_reads_manifest_data_by_key():
    """The typed sections are the only way in: packages and scripts alike."""
    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("attanchor_export/**/*.py"), *root.glob("runtime/**/*.py"), *root.glob("graphs/**/*.py"),
             *root.glob("scripts/*.py")]
    offenders = [f"{path.relative_to(root)}:{n}: {line.strip()}"
                 for path in files if path.name != "manifest.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if RAW_READ.search(line)]
    assert not offenders, "\n".join(offenders)
