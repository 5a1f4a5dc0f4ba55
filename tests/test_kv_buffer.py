"""The KV cache of the fused onnxruntime decoder form, read in place (ort_backend.KVBuffer, KV_APPEND)."""

from __future__ import annotations

import numpy as np
import pytest
from attanchor_graphs.specification import position_ids_from_mask
from attanchor_runtime.batch import left_pad
from attanchor_runtime.decode import SequentialStep
from attanchor_runtime.errors import RuntimeInputError
from attanchor_runtime.manifest import KV_APPEND, KV_CONCAT, LOGITS_TO_KEEP, NEXT_TOKEN, Manifest
from attanchor_runtime.ort_backend import KVBuffer, OrtBackend
from attanchor_runtime.pipeline import Pipeline

from attanchor_export.exporter import ExportOptions, export_artifact


@pytest.fixture(scope="module")
def int4(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv-buffer") / "int4"
    export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=out, quant="int4"))
    return Manifest.load(out)


def _prefill(dims, rng):
    """A left-padded batch of 3 whose rows start at different positions."""
    _, mask = left_pad([np.zeros(n, np.int64) for n in (5, 9, 7)], 0)
    return rng.standard_normal((3, mask.shape[1], dims.hidden_size)).astype(np.float32), mask, \
        position_ids_from_mask(mask)


def _buffer(manifest, limit, chunk=32, batch=3):
    dims = manifest.dims
    return KVBuffer(batch, 2 * dims.num_layers, dims.num_kv_heads, dims.head_dim, np.float32, limit, chunk)


def _run(backend, cache, dims, steps, seed=0):
    rng = np.random.default_rng(seed)
    embeds, mask, positions = _prefill(dims, rng)
    logits, cache = backend.decode(embeds, mask, positions, cache)
    out, step = [logits[:, -1]], SequentialStep.after_prefill(mask, positions)
    for _ in range(steps):
        step = step.advance()
        logits, cache = backend.decode(rng.standard_normal((3, 1, dims.hidden_size)).astype(np.float32),
                                       step.attention_mask, step.position_ids, cache)
        out.append(logits[:, -1])
    return np.stack(out), cache


def test_manifest_says_the_int4_decoder_appends_to_its_kv_buffer(int4):
    assert int4.precision.kv_cache("decoder.onnx") == KV_APPEND
    assert int4.precision.kv_cache("decoder.trt.onnx") == KV_CONCAT  # TensorRT's form: standard ops
    backend = OrtBackend(int4)
    assert backend.appends_kv and isinstance(backend.empty_cache(2), KVBuffer)


def test_buffer_equals_the_concatenated_cache_across_growth(int4):
    """Same graph, two ways to carry the cache: the past concatenated with each call's new positions
    (exact length), or one buffer read in place, longer than the past, growing 4 positions at a time
    (each growth copies what is there; stale slots after the past are masked out)."""
    dims = int4.dims
    appending = _appending(OrtBackend(int4))
    listed, _ = _run(appending, appending.empty_cache(3), dims, steps=12)
    buffer = _buffer(int4, limit=dims.max_position_embeddings, chunk=4)
    in_place, cache = _run(OrtBackend(int4), buffer, dims, steps=12)
    assert cache is buffer and buffer.capacity >= 9 + 12 and buffer.capacity % 4 == 0
    np.testing.assert_allclose(in_place, listed, atol=1e-5, rtol=0)


def _appending(backend):
    """The backend's arrays path for the fused decoder: its cache a list of arrays, each call's new
    positions appended to the past in numpy instead of written into a KVBuffer."""
    backend.decoder.appends_kv = False
    assert isinstance(backend.empty_cache(3), list)
    return backend


def test_stale_slots_after_the_past_change_nothing(int4):
    """Slots of the buffer the mask does not cover hold garbage (a row reused, a longer earlier run):
    the logits are the same as with zeros there."""
    dims = int4.dims
    clean, _ = _run(OrtBackend(int4), _buffer(int4, limit=64), dims, steps=3)
    dirty = _buffer(int4, limit=64)
    dirty.reserve(32)
    for buffer in dirty.buffers:
        buffer[...] = 1e3  # what a previous, longer sequence might have left
    got, _ = _run(OrtBackend(int4), dirty, dims, steps=3)
    np.testing.assert_allclose(got, clean, atol=1e-5, rtol=0)


def test_context_full_is_one_clear_error_at_the_buffer_end(int4):
    dims = int4.dims
    backend = OrtBackend(int4)
    total = 9 + 6  # prompt width 9, then 6 steps: the last one writes the buffer's last position
    cache = _buffer(int4, limit=total, chunk=4)
    full, _ = _run(backend, cache, dims, steps=6)
    reference = _buffer(int4, limit=dims.max_position_embeddings)
    unbounded, _ = _run(backend, reference, dims, steps=6)
    np.testing.assert_allclose(full, unbounded, atol=1e-5, rtol=0)  # the last slot is as good as any
    assert cache.capacity == total
    with pytest.raises(RuntimeInputError, match=f"context full: {total + 1} positions"):
        _run(backend, _buffer(int4, limit=total), dims, steps=7)


def test_generate_answers_the_same_with_either_cache(int4):
    pipe = Pipeline(int4, OrtBackend(int4))
    ids = [[int4.text.bos_token_id, int4.text.image_token_id, 5, 9, 11]]
    pixels = np.random.default_rng(1).random((1, 3, int4.dims.image_size, int4.dims.image_size), np.float32)
    buffered = pipe.generate(ids, pixels, max_new_tokens=12).tokens
    pipe.backend = _appending(pipe.backend)
    listed = pipe.generate(ids, pixels, max_new_tokens=12).tokens
    np.testing.assert_array_equal(buffered, listed)


def _without_levers(backend):
    """The backend with no runtime lever: every position's logits fetched and argmax'd in numpy, plain
    session.run."""
    backend.decoder.greedy_in_graph = backend.decoder.binds = False
    backend.decoder.logits_to_keep = None
    return backend


def test_io_binding_and_the_graph_choice_change_no_logit_and_no_token(int4):
    """Same decoder, same inputs, three ways: plain run (logits), IO-bound run (logits), IO-bound run
    asking only for next_token. Bound logits equal plain ones; next_token is their argmax at every step,
    across buffer growth (chunk 4: the bound past buffers are rebound when they grow)."""
    assert int4.precision.graphs["decoder.onnx"].ort_fusions["next_token"] == NEXT_TOKEN
    dims = int4.dims
    plain, _ = _run(_without_levers(OrtBackend(int4)), _buffer(int4, dims.max_position_embeddings, 4), dims, 10)
    bound_backend = OrtBackend(int4)
    assert bound_backend.greedy_in_graph and bound_backend.decoder.binds
    bound, cache = _run(bound_backend, _buffer(int4, dims.max_position_embeddings, 4), dims, 10)
    assert cache.binding is not None and cache.binding.session is bound_backend.decoder.session
    np.testing.assert_allclose(bound, plain, atol=1e-6, rtol=0)
    rng = np.random.default_rng(0)  # _run's inputs again, asking for the graph's choice
    embeds, mask, positions = _prefill(dims, rng)
    cache = _buffer(int4, dims.max_position_embeddings, 4)
    chosen, cache = bound_backend.decode_next(embeds, mask, positions, cache)
    got, step = [chosen], SequentialStep.after_prefill(mask, positions)
    for _ in range(10):
        step = step.advance()
        chosen, cache = bound_backend.decode_next(rng.standard_normal((3, 1, dims.hidden_size)).astype(np.float32),
                                                  step.attention_mask, step.position_ids, cache)
        got.append(chosen)
    np.testing.assert_array_equal(np.stack(got), plain.argmax(axis=-1))


def test_generate_answers_the_same_with_and_without_the_runtime_levers(int4):
    """Greedy and sampled generation through the Pipeline: identical tokens with the levers (next_token
    chosen in the graph, IO binding, the prefill's logits for the last position only) and without; greedy
    steps really went through decode_next."""
    ids = [[int4.text.bos_token_id, int4.text.image_token_id, 5, 9, 11]] * 2
    pixels = np.random.default_rng(1).random((2, 3, int4.dims.image_size, int4.dims.image_size), np.float32)
    fast = Pipeline(int4, OrtBackend(int4))
    assert fast.backend.decoder.logits_to_keep == LOGITS_TO_KEEP
    asked = []
    decode_next = fast.backend.decode_next
    fast.backend.decode_next = lambda *a: asked.append(1) or decode_next(*a)
    slow = Pipeline(int4, _without_levers(OrtBackend(int4)))
    greedy = fast.generate(ids, pixels, max_new_tokens=12)
    assert len(asked) == len(greedy.timings["decode_steps"]) + 1
    np.testing.assert_array_equal(greedy.tokens, slow.generate(ids, pixels, max_new_tokens=12).tokens)
    sampled = {"do_sample": True, "temperature": 1.5, "seed": 3}
    np.testing.assert_array_equal(fast.generate(ids, pixels, max_new_tokens=12, **sampled).tokens,
                                  slow.generate(ids, pixels, max_new_tokens=12, **sampled).tokens)
