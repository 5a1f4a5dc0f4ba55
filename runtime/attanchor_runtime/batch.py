"""Prompt rows -> one left-padded batch: what the embedding graph is fed, and where each token came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import RuntimeInputError
from .image_placeholders import image_run_keep, image_run_starts


def left_pad(rows: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of different lengths -> (ids [B, W] padded on the left, mask [B, W])."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class PreparedBatch:
    """input_ids left-padded to one width, one placeholder per row, and where each row came from."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    # source_index[b][j] = index in the caller's row b of the token now at padded column j
    source_index: list[np.ndarray]


def prepare_input_ids(input_ids, image_token_id: int, pad_token_id: int, attention_mask=None,
                      vocab_size: int | None = None) -> PreparedBatch:
    """Accept [B, T] or a list of 1-D rows; collapse placeholder runs; left-pad. vocab_size: refuse ids
    outside 0..vocab_size - 1 (a negative id would wrap around in the table lookup, one past the table
    fails inside onnxruntime)."""
    if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != input_ids.shape:
            raise RuntimeInputError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
        rows = [np.asarray(r)[np.asarray(m).astype(bool)] for r, m in zip(input_ids, mask)]
        offsets = [int(np.argmax(m)) if np.asarray(m).any() else 0 for m in mask]
    elif isinstance(input_ids, (str, bytes)):
        raise RuntimeInputError("input_ids must be token ids (int64 [B, T] or a list of 1-D arrays), not text")
    elif isinstance(input_ids, Sequence) or (isinstance(input_ids, np.ndarray) and input_ids.ndim == 1):
        rows = [np.asarray(r) for r in (input_ids if not isinstance(input_ids, np.ndarray) else [input_ids])]
        offsets = [0] * len(rows)
    else:
        raise RuntimeInputError("input_ids must be an int64 [B, T] array or a list of 1-D arrays")
    if not rows:
        raise RuntimeInputError("input_ids is empty")
    kept_rows, sources = [], []
    for b, row in enumerate(rows):
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise RuntimeInputError(f"input_ids row {b} must be a 1-D integer array, got {row.dtype} {row.shape}")
        # A run of placeholders (newer HF processors expand <image> to M tokens) counts as one.
        runs = image_run_starts(row, image_token_id).size
        if runs != 1:
            raise RuntimeInputError(f"input_ids row {b} has {runs} image placeholder runs, expected exactly 1")
        if vocab_size is not None:
            _check_token_ids(row, b, vocab_size)
        keep = image_run_keep(row, image_token_id)
        kept_rows.append(row[keep].astype(np.int64))
        sources.append(np.flatnonzero(keep) + offsets[b])
    ids, mask = left_pad(kept_rows, pad_token_id)
    width = ids.shape[1]
    source_index = [np.concatenate([np.full(width - len(row), -1), src]) for row, src in zip(kept_rows, sources)]
    return PreparedBatch(ids, mask, source_index)


def _check_token_ids(row: np.ndarray, b: int, vocab_size: int) -> None:
    if row.size and row.min() < 0:
        raise RuntimeInputError(f"input_ids row {b} holds token id {int(row.min())}: ids must be >= 0")
    if row.size and row.max() >= vocab_size:
        raise RuntimeInputError(f"input_ids row {b} holds token id {int(row.max())}, outside the vocabulary of "
                                f"{vocab_size} (ids 0..{vocab_size - 1})")


__all__ = ["PreparedBatch", "left_pad", "prepare_input_ids"]
