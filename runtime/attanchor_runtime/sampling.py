"""Next-token choice: greedy by default; temperature, top-k and top-p sampling when asked."""

from __future__ import annotations

import numpy as np

from .errors import RuntimeInputError


class Sampler:
    def __init__(self, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=None):
        if do_sample and temperature <= 0:
            raise RuntimeInputError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise RuntimeInputError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise RuntimeInputError(f"top_k must be >= 0, got {top_k}")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.greedy = not do_sample  # the decode loop may let the decoder graph choose (decode.greedy_in_graph)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B]. Greedy takes the first maximum, as torch.argmax does."""
        if not self.do_sample:
            return logits.argmax(axis=-1).astype(np.int64)
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(scores, axis=-1)[:, -min(self.top_k, scores.shape[-1])][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= self.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([self.rng.choice(p.shape[-1], p=p) for p in probs], np.int64)
