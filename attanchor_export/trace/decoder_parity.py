"""ONNX-vs-ONNX decoder parity: two decoder graphs, same random feeds, in ONNX Runtime CPU.

Used to accept a graph rewrite (the grouped-attention pass, the fused onnxruntime form): prefill then
two cached decode steps, batch 1 (length 11) and batch 3 left-padded (lengths 7, 13, 10), none of them
the traced shapes. Both graphs run through the runtime's decode loop (decode.decoder_calls), each on its
own KV cache carried as its file carries it.
"""

from __future__ import annotations

import numpy as np
from attanchor_graphs.specification import position_ids_from_mask
from attanchor_runtime.batch import left_pad
from attanchor_runtime.decode import SequentialStep, decoder_calls
from attanchor_runtime.manifest import KV_CONCAT
from attanchor_runtime.ort_backend import KVBuffer, OrtDecoder
from attanchor_runtime.sessions import ort_session

CASES = (("batch1", [11]), ("batch3-left-padded", [7, 13, 10]))
DECODE_STEPS = 2


def _cache_arrays(cache) -> list[np.ndarray]:
    """The cache's real positions as arrays (a KVBuffer holds capacity beyond them)."""
    return cache.buffers if isinstance(cache, KVBuffer) else list(cache)


def _case_worst(decoders, hidden: int, lengths: list[int], rng, first_step) -> float:
    """Max |diff| of logits (real query rows) and the KV cache (real positions) over one case."""
    batch = len(lengths)
    _, mask = left_pad([np.zeros(n, np.int64) for n in lengths], 0)
    embeds = rng.standard_normal((batch, mask.shape[1], hidden)).astype(np.float32)
    # One draw per call, the last one included, so each case's inputs stay what they were.
    steps = [rng.standard_normal((batch, 1, hidden)).astype(np.float32) for _ in range(1 + DECODE_STEPS)]
    runs = [decoder_calls(d, first_step(mask, position_ids_from_mask(mask)), embeds,
                          lambda call: steps[call.index] if call.index < DECODE_STEPS else None) for d in decoders]
    worst = 0.0
    for ref, cand in zip(*runs):
        fed = ref.step.attention_mask
        real_rows = fed[:, -ref.logits.shape[1]:].astype(bool)
        worst = max(worst, float(np.abs(ref.logits - cand.logits)[real_rows].max()))
        total = fed.shape[1]
        valid = fed.astype(bool)[:, None, :, None]
        for a, b in zip(_cache_arrays(ref.cache), _cache_arrays(cand.cache)):
            a, b = a[:, :, :total], b[:, :, :total]
            worst = max(worst, float(np.abs(a - b)[np.broadcast_to(valid, a.shape)].max()))
    return worst


def decoder_parity(reference, candidate, dims, seed: int = 7, threads: int | None = None,
                   candidate_kv: str = KV_CONCAT, first_step=SequentialStep.after_prefill) -> dict:
    """Max |diff| of logits and the KV cache between the decoder graphs at `reference` (KV_CONCAT) and
    `candidate` (whose present holds what `candidate_kv` says): {"max_abs_diff": worst, "cases": {case: worst}}.
    first_step: the family's prefill Step (1-D sequential positions by default)."""
    decoders = [OrtDecoder.of_session(ort_session(path, "cpu", threads), dims.max_position_embeddings, kv)
                for path, kv in ((reference, KV_CONCAT), (candidate, candidate_kv))]
    rng = np.random.default_rng(seed)
    cases = {case: _case_worst(decoders, dims.hidden_size, lengths, rng, first_step) for case, lengths in CASES}
    return {"max_abs_diff": max(cases.values()), "cases": cases}


__all__ = ["decoder_parity"]
