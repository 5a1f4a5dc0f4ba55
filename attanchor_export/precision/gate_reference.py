"""The accuracy gate's PyTorch reference: the source model teacher-forced on each form's own greedy tokens.

Where the fp32 decoder graph is over the memory budget (and in `check`, after the fp32 graphs are gone),
the gate's reference is the PyTorch source model with its decoder layers streamed from the checkpoint
(one layer's weights in memory at a time, load/streamed.py). Run through the decode loop it re-read
every layer for every token (31 times the 13 GB of fp16 weights at 7B). Here it runs two kinds of
forward, each over all rows and all their positions at once, so each reads every layer once:

- `TorchReference.__init__` (gate.source_model_baseline, before any form runs): the prefill over the
  gate set's prompts; it keeps the prompt positions' logits and the KV cache;
- `continuation(tokens)` (gate.evaluate, once per form): one cached forward over the form's own greedy
  tokens, which the form's graphs chose in the runtime's decode loop; their logits are the ones the
  step-by-step loop would have produced fed the same tokens.

Positions after the prompt are the runtime family's (`Step.advance`: 1-D for LLaVA, M-RoPE for
Qwen2.5-VL), the tokens' embeddings the artifact's table (`Pipeline.embed`), as the decode loop feeds them.
The KV cache is fp32 (2.6 GB for the 4 x 632-token gate set at LLaVA-1.5-7B), held until the gate ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from attanchor_export.source_model import TorchBackend


class TorchReference:
    """PyTorch logits for the gate: the prompts' now, any continuation's later (one forward each).
    `inputs`: (inputs_embeds [B, L, H], attention_mask [B, L], position_ids) of the gate set, left padded;
    `family`: the runtime family (first_step / advance); `embed`: token ids [B] -> [B, 1, H]."""

    def __init__(self, loaded, manifest, family, embed: Callable[[np.ndarray], np.ndarray], inputs: tuple):
        embeds, mask, positions = inputs
        self.embed = embed
        self.layout = TorchBackend(loaded, manifest)  # the prompt's logits as the artifact's graph returns them
        self.all_positions = TorchBackend(loaded, manifest, last_logits_only=False)
        self.step = family.first_step(mask, positions)
        t0 = time.perf_counter()
        logits, self.cache = self.layout.decode(embeds, self.step.attention_mask, self.step.position_ids,
                                                self.layout.empty_cache(len(embeds)))
        self.prefill_seconds = time.perf_counter() - t0
        self.continuation_seconds = 0.0
        self.continuations = 0
        valid = np.asarray(mask[:, -logits.shape[1]:], bool)
        self.counts = valid.sum(axis=1)  # prompt positions per row whose logits are compared
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.prompt_logits = np.empty((int(self.offsets[-1]), logits.shape[-1]), logits.dtype)  # one copy, not two
        for b in range(len(valid)):
            self.prompt_logits[self.offsets[b]:self.offsets[b + 1]] = logits[b, np.flatnonzero(valid[b])]
        del logits

    @property
    def rows(self) -> int:
        return len(self.counts)

    def prompt(self, row: int) -> np.ndarray:
        """Logits [k, V] at row `row`'s compared prompt positions (its last predicts the first new token)."""
        return self.prompt_logits[self.offsets[row]:self.offsets[row + 1]]

    def continuation(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [B, n - 1, V] after the prompt, fed tokens [B, n] but the last: at step i, the logits
        that predict tokens[:, i + 1] given the prompt and tokens[:, :i + 1]. One cached forward."""
        tokens = np.asarray(tokens, np.int64)
        if tokens.shape[0] != self.rows:
            raise ValueError(f"gate reference: {tokens.shape[0]} rows of tokens for {self.rows} prompts")
        fed = tokens.shape[1] - 1
        if fed <= 0:
            return np.zeros((self.rows, 0, self.prompt_logits.shape[-1]), np.float32)
        step, positions = self.step, []
        for _ in range(fed):  # the decode loop's own positions and mask, step by step
            step = step.advance()
            positions.append(step.position_ids)
        embeds = np.concatenate([self.embed(tokens[:, i]) for i in range(fed)], axis=1)
        t0 = time.perf_counter()
        logits, _ = self.all_positions.decode(embeds, step.attention_mask, np.concatenate(positions, axis=-1),
                                              self.cache)
        self.continuation_seconds += time.perf_counter() - t0
        self.continuations += 1
        return logits

    def choices(self, tokens: np.ndarray, continuation: np.ndarray) -> np.ndarray:
        """PyTorch's greedy choice [B, n] at each of `tokens`' positions, given the same prefix."""
        first = np.array([self.prompt(b)[-1].argmax() for b in range(self.rows)], np.int64)[:, None]
        return np.concatenate([first, continuation.argmax(-1).astype(np.int64)], axis=1)[:, :tokens.shape[1]]


__all__ = ["TorchReference"]
