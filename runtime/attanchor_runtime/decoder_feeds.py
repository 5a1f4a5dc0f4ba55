"""What the decoder graph is fed, defined once: empty past, prefill, each cached step, greedy decoding.

decoder.onnx (and its engines) take inputs_embeds [B, S, H], attention_mask [B, past + S] (1 = real,
left padding 0), position_ids [B, S] and past_key_values.{i}.key/value [B, kv_heads, past, head_dim];
they return logits and present.{i}.key/value: the whole cache (KV_CONCAT), or only the new positions
(KV_APPEND, the fused onnxruntime form; `next_past` appends them). A step after the prompt feeds one
new embedding per row at position max + 1 and appends a 1 to the mask. Everything that drives a decoder (runtime
backends, export parity, calibration, gates, TensorRT build checks, benchmarks) builds its feeds
here, over any `run(output_names_or_None, feeds) -> list` (an onnxruntime session, a torch wrapper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .manifest import KV_APPEND, KV_CONCAT, kv_names


def past_names(num_layers: int) -> list[str]:
    return kv_names(num_layers, "past_key_values")


def present_names(num_layers: int) -> list[str]:
    return kv_names(num_layers, "present")


def left_pad(rows: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of different lengths -> (ids [B, W] padded on the left, mask [B, W])."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def empty_past(dims: dict, batch: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Zero-length KV cache: one [B, kv_heads, 0, head_dim] array per past input."""
    empty = np.zeros((batch, dims["num_kv_heads"], 0, dims["head_dim"]), dtype)
    return dict.fromkeys(past_names(dims["num_layers"]), empty)


def prefill_feeds(inputs_embeds, attention_mask, position_ids, past: dict) -> dict:
    return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids, **past}


@dataclass
class Step:
    """Mask and positions of the sequence so far; `advance` moves both one token on."""

    attention_mask: np.ndarray  # [B, past + S]
    position_ids: np.ndarray  # [B, 1]: the position of the last fed token

    @classmethod
    def after_prefill(cls, attention_mask: np.ndarray, position_ids: np.ndarray) -> Step:
        # max, not [:, -1]: every row's last real token is the last column (left padding), but a
        # padded row's last column may hold any position id; the max is the last real one.
        return cls(attention_mask, position_ids.max(axis=1, keepdims=True).astype(np.int64))

    def advance(self) -> Step:
        ones = np.ones((self.attention_mask.shape[0], 1), self.attention_mask.dtype)
        return Step(np.concatenate([self.attention_mask, ones], axis=1), self.position_ids + 1)

    def feeds(self, step_embeds: np.ndarray, past_names_: Sequence[str], past: Sequence) -> dict:
        """Feeds for one new token per row over `past` (see next_past)."""
        feeds = {"inputs_embeds": step_embeds, "attention_mask": self.attention_mask,
                 "position_ids": self.position_ids}
        feeds.update(zip(past_names_, past))
        return feeds


def next_past(kv_cache: str, past: Sequence, present: Sequence) -> list:
    """The next call's past: the call's `present` itself (KV_CONCAT), or past + present along the
    positions axis (KV_APPEND: present holds the new positions only). An empty `present` (a run that
    keeps its own cache, ort_backend.BackendRun) gives an empty past."""
    if kv_cache == KV_APPEND and len(present):
        return [np.concatenate([p, n], axis=2) for p, n in zip(past, present)]
    return list(present)


Run = Callable[[Sequence[str] | None, dict], list]


@dataclass
class Greedy:
    tokens: np.ndarray  # [B, new_tokens]: the model's arg-max at each step
    logits: list[np.ndarray]  # per call: [B, S or 1, V] as the graph returned it
    prefill_outputs: list | None = None  # the prefill call's outputs, when asked to keep them


def greedy(run: Run, num_layers: int, prefill: dict, embed: Callable[[np.ndarray], np.ndarray],
           new_tokens: int, forced: np.ndarray | None = None, keep_logits: bool = False,
           prefilled: list | None = None, keep_prefill: bool = False, kv_cache: str = KV_CONCAT) -> Greedy:
    """Prefill `prefill` (its own past, usually `empty_past`), then `new_tokens - 1` cached steps.
    kv_cache: what the decoder's present outputs hold (next_past).

    embed: token ids [B, 1] -> embeddings [B, 1, H] (the runtime's table lookup).
    forced: feed these tokens [B, >= new_tokens - 1] instead of the arg-max (teacher forcing); the
    returned tokens are still the model's own arg-max at every step.
    prefilled: the outputs of an earlier run on the same `prefill` feeds (skips the prefill call: at 7B
    a 600-token prefill is minutes on a CPU); keep_prefill: return this run's, to pass on so."""
    names = past_names(num_layers)
    outs = prefilled if prefilled is not None else run(None, prefill)
    past = next_past(kv_cache, [prefill[n] for n in names if n in prefill], outs[1:])
    first = outs if keep_prefill else None
    logits = [outs[0]] if keep_logits else []
    batch = outs[0].shape[0]
    tokens = np.zeros((batch, new_tokens), np.int64)
    tokens[:, 0] = outs[0][:, -1].argmax(-1)
    step = Step.after_prefill(prefill["attention_mask"], prefill["position_ids"])
    for i in range(1, new_tokens):
        fed = (forced if forced is not None else tokens)[:, i - 1]
        step = step.advance()
        outs = run(None, step.feeds(embed(fed[:, None]), names, past))
        past = next_past(kv_cache, past, outs[1:])
        if keep_logits:
            logits.append(outs[0])
        tokens[:, i] = outs[0][:, -1].argmax(-1)
    return Greedy(tokens, logits, first)


def cosine_rows(a: np.ndarray, b: np.ndarray, zero_row: float = 0.0) -> np.ndarray:
    """Cosine similarity of matching rows of a and b [N, D] (float64; a zero row scores `zero_row`)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dots = (a * b).sum(-1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), zero_row)
