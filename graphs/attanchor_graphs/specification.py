"""``ai.attanchor::AnchorInsert`` in numpy: this module *is* the specification.

Everything else (the ONNX function body, the PyTorch source model's anchored inputs, any fast kernel)
must reproduce :func:`anchor_insert` exactly on the integer outputs. See docs/CONTRACTS.md,
section "AnchorInsert".

The similarity is computed in float32 in a fixed order (matmul dot, ``sqrt(sum(x*x))`` norms,
outer product of the norms, one division) because that is the order the ONNX body uses; any
other order can flip a near-tie and move an anchor.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "MODES",
    "anchor_insert",
    "anchor_pairs",
    "check_budget",
    "check_mode",
    "candidate_mask_from_ids",
    "cosine_scores",
    "output_length",
    "position_ids_from_mask",
]

MODES = ("t2i", "i2t")


# ---------------------------------------------------------------------------------------------
# validation


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def check_budget(max_anchors: object) -> int:
    """Normalise the budget: 0 means "no budget", like the ONNX attribute."""
    if max_anchors is None:
        return 0
    # bool is an int subclass; a True budget is almost certainly a caller bug.
    if isinstance(max_anchors, bool) or not isinstance(max_anchors, numbers.Integral):
        raise ValueError(f"max_anchors must be None or an int >= 0, got {max_anchors!r}")
    if max_anchors < 0:
        raise ValueError(f"max_anchors must be None or an int >= 0, got {max_anchors}")
    return int(max_anchors)


def _check_candidate_mask(candidate_mask, shape) -> np.ndarray:
    """None (version 1: every token after the image is a candidate) -> all ones; else int 0/1 [B, T]."""
    if candidate_mask is None:
        return np.ones(shape, dtype=bool)
    cm = np.asarray(candidate_mask)
    if cm.shape != shape:
        raise ValueError(f"candidate_mask must have shape [B, T] = {shape}, got {cm.shape}")
    if cm.dtype != np.bool_ and not np.issubdtype(cm.dtype, np.integer):
        raise ValueError(f"candidate_mask must be an integer array (int64), got {cm.dtype}")
    if not np.isin(cm, (0, 1)).all():
        raise ValueError("candidate_mask values must be 0 (never an anchor) or 1 (may be an anchor)")
    return cm.astype(bool)


def _check_inputs(text_embeds, image_features, attention_mask, image_position, threshold):
    text = np.asarray(text_embeds)
    image = np.asarray(image_features)
    mask = np.asarray(attention_mask)
    pos = np.asarray(image_position)

    # float32 only: casting here would silently change the rounding the ONNX graph sees.
    for name, arr in (("text_embeds", text), ("image_features", image)):
        if arr.ndim != 3:
            raise ValueError(f"{name} must have shape [B, *, D], got shape {arr.shape}")
        if arr.dtype != np.float32:
            raise ValueError(f"{name} must be float32, got {arr.dtype}")
    b, t, d = text.shape
    if image.shape[0] != b or image.shape[2] != d:
        raise ValueError(
            f"image_features shape {image.shape} does not match text_embeds shape {text.shape} "
            f"(need [B={b}, M, D={d}])"
        )
    m = image.shape[1]
    if b < 1 or t < 1 or m < 1 or d < 1:
        raise ValueError(f"B, T, M and D must all be >= 1, got B={b}, T={t}, M={m}, D={d}")

    if mask.shape != (b, t):
        raise ValueError(f"attention_mask must have shape [B, T] = {(b, t)}, got {mask.shape}")
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"attention_mask must be an integer array (int64), got {mask.dtype}")
    mask = mask.astype(np.int64)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask values must be 0 (padding) or 1 (real token)")

    if pos.shape != (b,):
        raise ValueError(f"image_position must have shape [B] = {(b,)}, got {pos.shape}")
    if not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"image_position must be an integer array (int64), got {pos.dtype}")
    pos = pos.astype(np.int64)
    bad = np.flatnonzero((pos < 0) | (pos >= t))
    if bad.size:
        raise ValueError(f"image_position out of range [0, {t}) in row {int(bad[0])}: {int(pos[bad[0]])}")
    on_pad = np.flatnonzero(mask[np.arange(b), pos] == 0)
    if on_pad.size:
        r = int(on_pad[0])
        raise ValueError(f"image_position {int(pos[r])} of row {r} points at a padding token (mask 0)")

    thr = np.asarray(threshold)
    if thr.ndim != 0:
        raise ValueError(f"threshold must be a scalar, got shape {thr.shape}")
    if thr.dtype == np.bool_ or not (
        np.issubdtype(thr.dtype, np.floating) or np.issubdtype(thr.dtype, np.integer)
    ):
        raise ValueError(f"threshold must be a real number, got dtype {thr.dtype}")
    # The graph input is float32, so compare against the float32 value, not the Python double.
    thr = np.float32(thr)
    return text, image, mask, pos, thr


# ---------------------------------------------------------------------------------------------
# the specification


def cosine_scores(text_embeds: np.ndarray, image_features: np.ndarray) -> np.ndarray:
    """s[b, n, m] = cosine(T_n, I_m) in float32, zero-norm -> 0, NaN -> -inf.  Shape [B, T, M]."""
    text = np.asarray(text_embeds, dtype=np.float32)
    image = np.asarray(image_features, dtype=np.float32)
    dot = np.matmul(text, np.swapaxes(image, 1, 2))
    t_norm = np.sqrt(np.sum(text * text, axis=-1, dtype=np.float32))
    i_norm = np.sqrt(np.sum(image * image, axis=-1, dtype=np.float32))
    denom = t_norm[:, :, None] * i_norm[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # "product == 0" rather than "product > 0": a NaN product must stay NaN so that the
        # next line turns it into -inf (never an anchor) instead of a harmless-looking 0.
        s = np.where(denom == 0, np.float32(0), dot / denom).astype(np.float32)
    s[np.isnan(s)] = -np.inf
    return s


def _is_anchor(score: np.ndarray, thr: np.float32) -> np.ndarray:
    # -inf only ever comes from NaN; excluding it keeps "NaN is never an anchor" true even for
    # threshold = -inf.
    return (score >= thr) & (score > -np.inf)


def _apply_budget(anchor: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Keep the k anchors of highest score, ties to the lower index (one row)."""
    if k == 0:
        return anchor
    idx = np.flatnonzero(anchor)
    # Stable sort on -score: equal scores keep ascending index order, i.e. lower index wins.
    order = idx[np.argsort(-score[idx], kind="stable")]
    keep = np.zeros_like(anchor)
    keep[order[:k]] = True
    return keep


def _row_t2i(s, valid, p, thr, k, num_text, allowed):
    t, m = s.shape
    cand = valid & (np.arange(t) > p) & allowed
    score = s.max(axis=1)
    # First m attaining the max; np.argmax also returns the first, but say it explicitly.
    best = np.argmax(s == score[:, None], axis=1)
    keep = _apply_budget(cand & _is_anchor(score, thr), score, k)

    by_image: list[list[int]] = [[] for _ in range(m)]
    for n in np.flatnonzero(keep):  # ascending n = prompt order inside each image's group
        by_image[best[n]].append(int(n))

    row = [n for n in range(p) if valid[n]]
    for j in range(m):
        row.append(num_text + j)
        row.extend(by_image[j])
    row.extend(n for n in range(p + 1, t) if valid[n])
    return row


def _row_i2t(s, valid, p, thr, k, num_text, allowed):
    t, m = s.shape
    cand = valid & (np.arange(t) > p) & allowed
    row = [n for n in range(p) if valid[n]]
    row.extend(num_text + j for j in range(m))
    if not cand.any():  # no candidate; the text after the image may still be there (version 2)
        return row + [n for n in range(p + 1, t) if valid[n]]
    cidx = np.flatnonzero(cand)
    sc = s[cidx]  # [#candidates, M]
    score = sc.max(axis=0)
    best = cidx[np.argmax(sc == score[None, :], axis=0)]  # first candidate attaining the max
    keep = _apply_budget(_is_anchor(score, thr), score, k)

    copies: dict[int, list[int]] = {}
    for j in np.flatnonzero(keep):  # ascending m
        copies.setdefault(int(best[j]), []).append(num_text + int(j))
    for n in range(p + 1, t):
        if valid[n]:
            row.append(n)
            row.extend(copies.get(n, ()))
    return row


def candidate_mask_from_ids(input_ids, excluded_token_ids) -> np.ndarray:
    """int64 [B, T]: 0 where the id is one of ``excluded_token_ids``, else 1 (what embedding.onnx computes)."""
    ids = np.asarray(input_ids)
    excluded = np.asarray(list(excluded_token_ids), dtype=np.int64)
    return (~np.isin(ids, excluded)).astype(np.int64)


def output_length(num_text: int, num_image: int, max_anchors: int | None, row_lengths=None) -> int:
    """L: static T - 1 + M + K with a budget, else the longest row."""
    k = check_budget(max_anchors)
    if k:
        return num_text - 1 + num_image + k
    if row_lengths is None:
        raise ValueError("without max_anchors the output length depends on the data (row_lengths)")
    return int(max(row_lengths))


def anchor_insert(
    text_embeds,
    image_features,
    attention_mask,
    image_position,
    threshold,
    mode: str = "t2i",
    max_anchors: int | None = None,
    candidate_mask=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference AnchorInsert (version 2; version 1 is ``candidate_mask=None``).

    Returns ``(gather_index, out_mask)``, both int64 [B, L]. ``gather_index`` indexes
    ``concat(text_embeds, image_features, axis=1)``; rows are left padded with index 0, mask 0.
    ``candidate_mask`` int64 [B, T]: 0 marks a token that is never an anchor (version 2: the
    tokenizer's special tokens, computed from the ids by the embedding graph); None = all 1.
    """
    mode = check_mode(mode)
    k = check_budget(max_anchors)
    text, image, mask, pos, thr = _check_inputs(
        text_embeds, image_features, attention_mask, image_position, threshold
    )
    b, t, _ = text.shape
    m = image.shape[1]
    allowed = _check_candidate_mask(candidate_mask, (b, t))
    s = cosine_scores(text, image)
    row_fn = _row_t2i if mode == "t2i" else _row_i2t
    rows = [row_fn(s[i], mask[i].astype(bool), int(pos[i]), thr, k, t, allowed[i]) for i in range(b)]

    length = output_length(t, m, k, [len(r) for r in rows])
    gather_index = np.zeros((b, length), dtype=np.int64)
    out_mask = np.zeros((b, length), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            gather_index[i, length - len(r) :] = r
            out_mask[i, length - len(r) :] = 1
    return gather_index, out_mask


def anchor_pairs(gather_index, out_mask, num_text: int, mode: str) -> list[list[tuple[int, int]]]:
    """Recover the inserted anchors from an AnchorInsert output.

    Per row, ``(text_index, image_index)`` of every anchor in output order; ``text_index`` is a
    position in the row's prompt ([0, T)), ``image_index`` in [0, M).
    """
    mode = check_mode(mode)
    gi = np.asarray(gather_index)
    om = np.asarray(out_mask)
    if gi.ndim != 2 or gi.shape != om.shape:
        raise ValueError(f"gather_index and out_mask must both be [B, L], got {gi.shape} and {om.shape}")
    t = int(num_text)
    result = []
    for i in range(gi.shape[0]):
        seq = [int(v) for v in gi[i][om[i] != 0]]
        result.append(_pairs_t2i(seq, t) if mode == "t2i" else _pairs_i2t(seq, t))
    return result


def _pairs_t2i(seq: list[int], t: int) -> list[tuple[int, int]]:
    img_at = [j for j, v in enumerate(seq) if v >= t]
    if not img_at:
        return []
    pairs = []
    # Text between two image slots can only be an anchor of the earlier image.
    current = None
    for v in seq[img_at[0] : img_at[-1] + 1]:
        if v >= t:
            current = v - t
        else:
            pairs.append((v, current))
    # After the last image: its anchors (ascending n, all > p) then the text after the image
    # (ascending, starting at the first valid index after p, so <= every anchor). The only
    # non-increasing step in the tail is therefore the boundary.
    tail = seq[img_at[-1] + 1 :]
    split = next((j for j in range(1, len(tail)) if tail[j] <= tail[j - 1]), 0)
    pairs.extend((v, current) for v in tail[:split])
    return pairs


def _pairs_i2t(seq: list[int], t: int) -> list[tuple[int, int]]:
    pairs = []
    seen_image = False
    last_text = None  # last text token after the image block
    for v in seq:
        if v >= t:
            if last_text is not None:
                pairs.append((last_text, v - t))
            seen_image = True
        elif seen_image:
            last_text = v
    return pairs


def position_ids_from_mask(mask) -> np.ndarray:
    """HF-style position ids: cumsum(mask) - 1, and 1 where mask == 0. int64, same shape."""
    mask = np.asarray(mask).astype(np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)
