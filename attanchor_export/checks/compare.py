"""How two sets of outputs are compared, in one place: max |diff|, cosine per row, the logits bound, and
the one-row result every check reports (graph parity, end-to-end tokens, engine and accuracy gates)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class CheckResult:
    graph: str
    case: str
    metric: str
    value: float
    limit: float
    passed: bool

    def to_json(self) -> dict:
        return asdict(self)


def max_diff(a, b, mask=None) -> float:
    """max |a - b| in float64, over `mask` when given (0 for nothing to compare)."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is not None:
        diff = diff[mask]
    return float(diff.max()) if diff.size else 0.0


def cosine_rows(a: np.ndarray, b: np.ndarray, zero_row: float = 0.0) -> np.ndarray:
    """Cosine similarity of matching rows of a and b [N, D] (float64; a zero row scores `zero_row`)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dots = (a * b).sum(-1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), zero_row)


LOGITS_RTOL = 1e-5  # ~80 float32 ulps of the largest value


def scaled_limit(atol: float, ref: np.ndarray) -> float:
    """atol + LOGITS_RTOL * max|ref|: the fp32 bound on logits and on each layer's present K / V.
    Trained models with tied embeddings (SmolLM2 in tiny-vqa) reach logits in the tens, where
    reassociation over 30 layers alone moves them by ~3e-4, and keys near 20; an absolute 1e-4 would
    fail correct exports of them, and a broken graph is off by far more than either bound."""
    peak = float(np.abs(ref).max()) if ref.size else 0.0
    return float(atol + LOGITS_RTOL * peak)




def token_check(graph: str, case: str, tokens: np.ndarray, ref: np.ndarray, what: str) -> CheckResult:
    """Greedy tokens against reference tokens: the count of positions that differ (rows padded with -1)."""
    width = max(tokens.shape[1], ref.shape[1])
    a = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=-1)
    b = np.pad(ref, ((0, 0), (0, width - ref.shape[1])), constant_values=-1)
    mismatches = int((a != b).sum()) if a.shape == b.shape else a.size
    return CheckResult(graph, case, f"token_mismatch {what}", mismatches, 0, mismatches == 0)


__all__ = ["CheckResult", "LOGITS_RTOL", "cosine_rows", "max_diff", "scaled_limit", "token_check"]
