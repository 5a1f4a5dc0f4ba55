"""Image placeholder ids in prompt rows: collapse each run to one id, check a prompt holds one image.

A run of consecutive placeholders counts as one image everywhere here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import RuntimeInputError

__all__ = ["check_single_image", "collapse_image_runs", "image_run_keep", "image_run_starts"]


def collapse_image_runs(ids: Sequence[int] | np.ndarray, image_token_id: int) -> np.ndarray:
    """1-D ids with every run of consecutive ``image_token_id`` replaced by a single one (int64).

    HF processors expand ``<image>`` into M placeholder ids; the exported embedding graph takes one.
    """
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise RuntimeInputError(f"expected a 1-D token id row, got shape {tuple(arr.shape)}")
    return arr[image_run_keep(arr, image_token_id)]


def image_run_keep(arr: np.ndarray, image_token_id: int) -> np.ndarray:
    """Bool mask over a 1-D row: every id except the 2nd, 3rd, ... of each placeholder run."""
    keep = arr != image_token_id
    keep[image_run_starts(arr, image_token_id)] = True
    return keep


def image_run_starts(arr: np.ndarray, image_token_id: int) -> np.ndarray:
    """Indices where a run of consecutive placeholders begins (a run counts as one image)."""
    is_image = arr == image_token_id
    starts = is_image.copy()
    starts[1:] &= ~is_image[:-1]
    return np.flatnonzero(starts)


def check_single_image(ids_row: Sequence[int] | np.ndarray, image_token_id: int) -> int:
    """Check a prompt row holds exactly one image placeholder (one run counts as one); return its index.

    Raises RuntimeInputError naming the count otherwise. The index is that of the run's first id.
    """
    arr = np.asarray(ids_row)
    if arr.ndim != 1:
        raise RuntimeInputError(f"expected a 1-D token id row, got shape {tuple(arr.shape)}")
    starts = image_run_starts(arr, image_token_id)
    if starts.size != 1:
        raise RuntimeInputError(
            f"each prompt needs exactly one image placeholder (token id {image_token_id}), found {starts.size}"
        )
    return int(starts[0])
