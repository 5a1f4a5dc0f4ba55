"""ONNX-vs-ONNX decoder parity: two decoder graphs, same random feeds, in ONNX Runtime CPU.

Used to accept a graph rewrite (the grouped-attention pass): prefill then two cached decode steps,
batch 1 (length 11) and batch 3 left-padded (lengths 7, 13, 10), none of them the traced shapes.
The feeds follow attanchor_runtime.decoder_feeds, as every decoder run does.
"""

from __future__ import annotations

import numpy as np
from attanchor_runtime.decoder_feeds import (
    Step,
    empty_past,
    left_pad,
    next_past,
    past_names,
    prefill_feeds,
    present_names,
)
from attanchor_runtime.manifest import KV_CONCAT

CASES = (("batch1", [11]), ("batch3-left-padded", [7, 13, 10]))
DECODE_STEPS = 2


def _dims_dict(dims) -> dict:
    return dims.to_dict() if hasattr(dims, "to_dict") else dict(dims)


def _case_worst(sessions, outputs, dims: dict, lengths: list[int], rng, kv_caches: tuple[str, str]) -> float:
    """Max |diff| of logits (real query rows) and the KV cache (real positions) over one case."""
    batch, hidden = len(lengths), dims["hidden_size"]
    _, mask = left_pad([np.zeros(n, np.int64) for n in lengths], 0)
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)
    embeds = rng.standard_normal((batch, mask.shape[1], hidden)).astype(np.float32)
    names = past_names(dims["num_layers"])
    pasts = [list(empty_past(dims, batch).values())] * 2
    step, rows, worst = Step.after_prefill(mask, positions), mask, 0.0
    for call in range(1 + DECODE_STEPS):
        if call:  # one new token per row; each graph is fed its own cache as its past
            step, rows = step.advance(), np.ones((batch, 1), np.int64)
            feeds = [step.feeds(embeds, names, past) for past in pasts]
        else:
            feeds = [prefill_feeds(embeds, mask, positions, dict(zip(names, past))) for past in pasts]
        results = [s.run(outputs, f) for s, f in zip(sessions, feeds)]
        pasts = [next_past(kv, past, out[1:]) for kv, past, out in zip(kv_caches, pasts, results)]
        (ref, cand), (ref_kv, cand_kv) = results, pasts
        real_rows = rows[:, -ref[0].shape[1]:].astype(bool)
        worst = max(worst, float(np.abs(ref[0] - cand[0])[real_rows].max()))
        valid = np.broadcast_to(feeds[0]["attention_mask"].astype(bool)[:, None, :, None], ref_kv[0].shape)
        for a, b in zip(ref_kv, cand_kv):
            worst = max(worst, float(np.abs(a - b)[valid].max()))
        # Drawn after every call, the last one included, so each case's inputs stay what they were.
        embeds = rng.standard_normal((batch, 1, hidden)).astype(np.float32)
    return worst


def decoder_parity(reference, candidate, dims, seed: int = 7, threads: int | None = None,
                   candidate_kv: str = KV_CONCAT) -> dict:
    """Max |diff| of logits and the KV cache between the decoder graphs at `reference` (KV_CONCAT) and
    `candidate` (whose present holds what `candidate_kv` says): {"max_abs_diff": worst, "cases": {case: worst}}."""
    from attanchor_runtime.sessions import ort_session

    d = _dims_dict(dims)
    sessions = [ort_session(reference, "cpu", threads), ort_session(candidate, "cpu", threads)]
    outputs = ["logits", *present_names(d["num_layers"])]
    rng = np.random.default_rng(seed)
    cases = {case: _case_worst(sessions, outputs, d, lengths, rng, (KV_CONCAT, candidate_kv))
             for case, lengths in CASES}
    return {"max_abs_diff": max(cases.values()), "cases": cases}


__all__ = ["decoder_parity"]
