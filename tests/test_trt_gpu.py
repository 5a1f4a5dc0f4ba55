"""Real TensorRT engines on a real GPU (`-m gpu`): the build gate and trt-vs-onnxruntime parity.

Skipped, with the reason, when tensorrt, cuda-python or a CUDA GPU is missing. Whatever TensorRT is
installed (10.x or 11.x) is the one tested; the CPU tests against fakes of both generations are in
tests/test_trt_build.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from attanchor_runtime.families import family_of
from attanchor_runtime.manifest import Manifest
from engine_inputs import prompt_rows, random_pixels


@pytest.fixture(scope="module")
def real_gpu():
    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed (pip install 'attanchor-export[trt]' "
                              "or JetPack's python3-libnvinfer)")
    from attanchor_runtime.cuda_util import Cuda, CudaUnavailable

    try:
        cuda = Cuda()
    except CudaUnavailable as e:
        pytest.skip(f"no CUDA for TensorRT: {e}")
    return trt, cuda


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "empty_past"), [("clip-t2i", "zero"), ("siglip-t2i-k4", "zero"),
                                                   ("clip-t2i", "masked-slot")])
def test_real_engines_match_onnxruntime(real_gpu, workdir, name, empty_past):
    from attanchor_runtime import Pipeline
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.trt_backend import TrtBackend

    from attanchor_export.trt.build import build_engines

    folder = workdir(name)
    result = build_engines(folder, max_batch=2, max_input_len=64, max_seq_len=128, workspace_mib=512,
                           empty_past=empty_past)
    gate = result.meta.gate
    assert gate["passed"], gate
    assert all(r["precision"] == "fp32" for r in result.meta.engines.values() if r["backend"] == "tensorrt")
    manifest = Manifest.load(folder)
    backend = TrtBackend(manifest, full_logits=True)
    ref = OrtBackend(manifest)
    ids, pixels = prompt_rows(folder), random_pixels(folder, 2)
    trt_out = Pipeline(manifest, backend).generate(ids, pixels, max_new_tokens=8)
    ort_out = Pipeline(manifest, ref).generate(ids, pixels, max_new_tokens=8)
    assert trt_out.anchors == ort_out.anchors
    np.testing.assert_array_equal(trt_out.tokens, ort_out.tokens)
    family = family_of(manifest)
    vision_feeds = family.vision_feeds(pixels, len(pixels))
    feats = ref.vision(vision_feeds)
    np.testing.assert_allclose(backend.vision(vision_feeds), feats, atol=1e-3)
    embedded = ref.embed(family.embedding_feeds(family.prepare_batch(ids), feats, 0.12, vision_feeds))
    logits, _ = backend.decode(embedded["inputs_embeds"], embedded["attention_mask"], embedded["position_ids"],
                               backend.empty_cache(2))
    want, _ = ref.decode(embedded["inputs_embeds"], embedded["attention_mask"], embedded["position_ids"],
                         ref.empty_cache(2))
    assert np.max(np.abs(logits - want)) <= 1e-3
    backend.close()


@pytest.mark.gpu
def test_real_fp16_int4_engines_pass_their_gate(real_gpu, checkpoint, tmp_path):
    """Strongly typed from the graphs' own types: fp16 with fp32 islands, INT4 weight-only Q/DQ (opset 21)."""
    from attanchor_export.exporter import ExportOptions, export_artifact
    from attanchor_export.trt.build import build_engines

    folder = tmp_path / "fp16-int4"
    export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=folder, dtype="fp16", quant="int4",
                                                                block_size=64, validate=False, max_anchors=4))
    result = build_engines(folder, max_batch=2, max_input_len=64, max_seq_len=128, workspace_mib=512)
    assert result.meta.engines["decoder"]["precision"] == "fp16 + int4 QDQ"
    assert result.meta.gate["passed"], result.meta.gate
