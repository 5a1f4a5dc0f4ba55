"""The trt backend's pure parts on a CPU: optimization-profile choice, KV buffers, no-tensorrt error.
Its binding and execution against fake TensorRT modules: tests/test_trt_build.py."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from attanchor_runtime.errors import ArtifactError, RuntimeInputError
from attanchor_runtime.trt_backend import KVCache, kv_buffer_bytes, select_profile
from fake_tensorrt import FakeCuda

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


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


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_trt_backend_without_tensorrt(artifact):
    from attanchor_runtime import Pipeline

    with pytest.raises(ArtifactError, match="pip install 'attanchor-export\\[trt\\]'"):
        Pipeline.load(artifact("clip-t2i"), backend="trt")
