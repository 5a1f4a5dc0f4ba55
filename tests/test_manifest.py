"""attanchor_runtime.manifest: the typed accessors every reader of manifest.json goes through.

Pure dicts, no export: which ONNX file each backend opens (fp32 and quantized artifacts), the source
checkpoint, precision, anchor and text sections, and the version check on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from attanchor_runtime.errors import ArtifactError
from attanchor_runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, NoGraphForm

GRAPHS = {"vision": {"file": "vision.onnx"}, "embedding": {"file": "embedding.onnx"},
          "decoder": {"file": "decoder.onnx"}}


def manifest(**sections) -> Manifest:
    return Manifest(Path("/artifact"), {"graphs": GRAPHS, **sections})


def int4(**trt) -> dict:
    """What quantize.py writes for an int4 export: MatMulNBits for onnxruntime, QDQ for TensorRT."""
    return {"dtype": "fp16", "quant": "int4",
            "backends": {"ort": {"vision": "vision.onnx", "decoder": "decoder.onnx"},
                         "trt": {"vision": "vision.onnx", "decoder": "decoder.trt.onnx", **trt}}}


def test_an_fp32_artifact_opens_each_graph_s_own_file_on_every_backend():
    m = manifest(precision={"dtype": "fp32", "quant": "none"})
    for backend in ("ort", "trt"):
        assert [m.graph_file(g, backend) for g in GRAPHS] == ["vision.onnx", "embedding.onnx", "decoder.onnx"]
    assert manifest().graph_file("decoder", "trt") == "decoder.onnx"  # no precision section: fp32
    assert m.graph_file("decoder") == "decoder.onnx"  # onnxruntime unless told


def test_a_quantized_artifact_names_a_file_per_backend():
    m = manifest(precision=int4())
    assert m.graph_file("decoder", "ort") == "decoder.onnx"
    assert m.graph_file("decoder", "trt") == "decoder.trt.onnx"
    assert m.graph_file("embedding", "trt") == "embedding.onnx"  # never quantized: not listed
    assert m.path(m.graph_file("decoder", "trt")) == Path("/artifact/decoder.trt.onnx")


def test_no_form_for_a_backend_is_one_line():
    m = manifest(precision=int4(decoder=None))  # forms=("MatMulNBits",): nothing for TensorRT
    with pytest.raises(NoGraphForm, match="no TensorRT form of its decoder graph") as info:
        m.graph_file("decoder", "trt")
    assert isinstance(info.value, ArtifactError) and "\n" not in str(info.value)
    assert "int4 was written for onnxruntime only" in str(info.value)
    assert m.graph_file("decoder", "ort") == "decoder.onnx"
    with pytest.raises(ValueError, match="backend must be one of ort, trt"):
        m.graph_file("decoder", "tensorrt")


def test_precision():
    fp32 = manifest().precision
    assert fp32 == {"dtype": "fp32", "quant": "none"} and not fp32.quantized and fp32.label == "fp32/none"
    assert fp32.backends == {} and fp32.gate is None and not fp32.vision_quantized
    q = manifest(precision={**int4(), "gate": {"floors": {"top1": 0.9}}, "vision_quantized": True}).precision
    assert q.quantized and (q.dtype, q.quant, q.label) == ("fp16", "int4", "fp16/int4")
    assert q.backends["trt"]["decoder"] == "decoder.trt.onnx" and q.gate["floors"] == {"top1": 0.9}
    assert q.vision_quantized and q.get("quant") == "int4"  # still the dict as written
    assert manifest(precision={"dtype": "fp16", "quant": "none"}).precision.quantized
    assert json.loads(json.dumps(q))["dtype"] == "fp16"  # reports embed it as it is


def test_source():
    adapter = {"source": "lora/", "resolved": "/abs/lora", "sha256": {}}
    src = manifest(source={"model": "tiny", "resolved": "/ckpt/tiny", "alias": "tiny", "revision": "main",
                           "commit": "abc", "adapter": adapter}).source
    assert (src.model, src.resolved, src.alias, src.revision, src.commit) == ("tiny", "/ckpt/tiny", "tiny", "main",
                                                                             "abc")
    assert src.adapter == adapter
    empty = manifest().source
    assert empty == {} and empty.model is None and empty.resolved is None and empty.adapter is None
    assert manifest(source={"model": "m", "adapter": None}).source.adapter is None


def test_anchor_and_text():
    m = manifest(anchor={"mode": "i2t", "threshold": 0.25, "max_anchors": 4, "calibration": None},
                 text={"tokenizer_file": "tokenizer.json", "image_token_id": 7, "pad_token_id": 0,
                       "bos_token_id": 1, "eos_token_ids": [2], "chat_template": None})
    assert (m.anchor.mode, m.anchor.threshold, m.anchor.max_anchors, m.anchor.calibration) == ("i2t", 0.25, 4, None)
    assert isinstance(manifest(anchor={"threshold": 1}).anchor.threshold, float)
    assert manifest(anchor={"max_anchors": None}).anchor.max_anchors is None
    assert manifest(anchor={"max_anchors": 0}).anchor.max_anchors is None  # 0: no budget
    text = m.text
    assert (text.tokenizer_file, text.image_token_id, text.pad_token_id, text.bos_token_id) == \
        ("tokenizer.json", 7, 0, 1)
    assert text.eos_token_ids == [2] and text.chat_template is None and text["image_token_id"] == 7


def test_files_and_load_refuses_another_format_version(tmp_path):
    assert manifest().files == {}
    assert manifest(files={"a.onnx": {"bytes": 1, "sha256": "x"}}).files["a.onnx"]["bytes"] == 1
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}, this runtime reads "
                                            f"{FORMAT_VERSION}") as info:
        Manifest.load(tmp_path)
    assert "\n" not in str(info.value)
