"""The trt backend on a CPU: optimization-profile choice, KV buffers, no-tensorrt error, and decode
against onnxruntime over the fake TensorRT of both generations (binding, the device KV cache, an
uploaded numpy cache). Builds and generation end to end: tests/test_trt_build.py."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from attanchor_runtime.errors import ArtifactError, RuntimeInputError
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.trt_backend import KVCache, kv_buffer_bytes, select_profile
from fake_tensorrt import FakeCuda, generations_fixture

from attanchor_export.trt.build import build_engines

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
fake = generations_fixture()


def test_select_profile(artifact):
    from attanchor_export.trt.plan import BuildOptions, make_plan

    plan = make_plan(artifact("clip-t2i"), BuildOptions(max_batch=2, max_input_len=64, max_seq_len=128))
    profiles = [json.loads(json.dumps(p.__dict__)) for p in plan.engines["decoder"].profiles]
    kv = {f"past_key_values.{i}.{k}": None for i in range(2) for k in ("key", "value")}

    def shapes(batch, seq, past):
        return {"inputs_embeds": (batch, seq, 64), "attention_mask": (batch, past + seq),
                "position_ids": (batch, seq), **{n: (batch, 2, past, 16) for n in kv}}

    assert select_profile(profiles, shapes(1, 30, 0)) == 0
    assert select_profile(profiles, shapes(2, 1, 0)) == 0  # a one-token prompt is still a prefill
    assert select_profile(profiles, shapes(2, 1, 127)) == 1
    with pytest.raises(RuntimeInputError, match="max-seq-len"):
        select_profile(profiles, shapes(1, 1, 128), "decoder")
    with pytest.raises(RuntimeInputError, match="prefill: batch 1..2"):
        select_profile(profiles, shapes(3, 4, 0), "decoder")


def test_kv_cache_buffers():
    assert kv_buffer_bytes(1, 4, 2048, 64, 4) == 2 << 20  # TinyLlama: 2 MiB per K or V per side at batch 1
    cuda = FakeCuda()
    cache = KVCache(cuda, 4, batch=2, heads=2, head_dim=8, capacity=16, dtype=np.float32, slot=1)
    assert len(cuda.mem) == 8 and all(len(b) == 2 * 2 * 16 * 8 * 4 for b in cuda.mem.values())
    assert cache.length == 1 and cache.side == 0
    arrays = [np.full((2, 2, 3, 8), i, np.float32) for i in range(4)]
    cache.upload(arrays)
    assert cache.length == 4
    for a, b in zip(cache.to_numpy(), arrays):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeInputError, match="max_seq_len"):
        cache.upload([np.zeros((2, 2, 16, 8), np.float32)] * 4)
    cache.close()
    assert not cuda.mem


def test_decode_matches_onnxruntime_and_cache_round_trips(fake, workdir):
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.trt_backend import TrtBackend

    trt, cuda = fake
    folder = workdir("clip-t2i")
    build_engines(folder, max_batch=2, max_input_len=64, max_seq_len=96)
    manifest = Manifest.load(folder)
    backend = TrtBackend(manifest, trt=trt, cuda=cuda, full_logits=True)
    ref = OrtBackend(manifest)
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((2, 7, manifest.dims.hidden_size)).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    pos = np.tile(np.arange(7), (2, 1))
    logits, cache = backend.decode(embeds, mask, pos, backend.empty_cache(2))
    want, past = ref.decode(embeds, mask, pos, ref.empty_cache(2))
    np.testing.assert_allclose(logits, want, atol=1e-5)
    for a, b in zip(cache.to_numpy(), past):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Feed OrtBackend's numpy cache to the trt backend (upload path) and step once more.
    step = embeds[:, :1]
    mask2 = np.ones((2, 8), np.int64)
    got, _ = backend.decode(step, mask2, pos[:, -1:] + 1, past)
    want, _ = ref.decode(step, mask2, pos[:, -1:] + 1, past)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(RuntimeInputError, match="attention_mask has shape"):
        backend.decode(step, mask, pos[:, -1:], backend.empty_cache(2))
    with pytest.raises(RuntimeInputError, match="no TensorRT optimization profile fits"):
        backend.decode(embeds[:, :3], np.ones((2, 10), np.int64), pos[:, :3], past)  # chunked prefill
    backend.close()


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_trt_backend_without_tensorrt(artifact):
    from attanchor_runtime import Pipeline

    with pytest.raises(ArtifactError, match="pip install 'attanchor-export\\[trt\\]'"):
        Pipeline.load(artifact("clip-t2i"), backend="trt")
