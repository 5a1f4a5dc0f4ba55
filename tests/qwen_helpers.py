"""Test-side references for the Qwen2.5-VL family, written independently of the code under test.

`contract_positions` places every slot of an AnchorInsert output by the contract's own words, using
the anchor pairs (which text token went after which patch) instead of the layout arithmetic that
attanchor_runtime.families.qwen2_5_vl.mrope_position_ids and the embedding graph use.
"""

from __future__ import annotations

import numpy as np
from attanchor_graphs.specification import anchor_pairs
from PIL import Image


def smooth_image(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """uint8 noise plus gradients: resampling filters see edges and smooth areas."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, channels)).astype(np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (255 * (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2)[..., None]
    return np.clip(0.5 * noise + 0.5 * ramp, 0, 255).astype(np.uint8)


def pil_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(smooth_image(height, width, seed), "RGB")


def contract_positions(gather_index, out_mask, text_mask, image_position, merged_hw, mode="t2i") -> np.ndarray:
    """[3, B, L] positions, slot by slot:
    - the original tokens are numbered as Qwen numbers an unbroken prompt: text before the image
      0..p-1 on all axes, merged patch m at (p, p + m // cols, p + m % cols), text after the image
      from p + max(rows, cols) on;
    - t2i: a copy of text n placed after patch m (anchor pair (n, m)) takes patch m's position;
      i2t: a copy of patch m placed after text n takes text n's position;
    - padding 0."""
    gather_index, out_mask = np.asarray(gather_index), np.asarray(out_mask)
    text_mask = np.asarray(text_mask)
    rows, cols = merged_hw
    m_total = rows * cols
    b, length = gather_index.shape
    t = text_mask.shape[1]
    pairs = anchor_pairs(gather_index, out_mask, t, mode)
    result = np.zeros((3, b, length), np.int64)
    for r in range(b):
        p = int(image_position[r])
        pre = [n for n in range(p) if text_mask[r, n]]
        post = [n for n in range(p + 1, t) if text_mask[r, n]]
        start = len(pre)
        place = {("text", n): (i, i, i) for i, n in enumerate(pre)}
        place.update({("image", m): (start, start + m // cols, start + m % cols) for m in range(m_total)})
        after = start + max(rows, cols)
        place.update({("text", n): (after + k,) * 3 for k, n in enumerate(post)})
        copies = list(pairs[r])  # in output order
        images_seen = 0
        slots = np.flatnonzero(out_mask[r])
        for j in slots:
            v = int(gather_index[r, j])
            if v >= t:
                images_seen += 1
                if mode == "i2t" and images_seen > m_total:  # a patch copy after a word
                    n, m = copies.pop(0)
                    assert m == v - t
                    pos = place[("text", n)]
                else:
                    pos = place[("image", v - t)]
            elif mode == "t2i" and images_seen and copies:
                # The image block holds every text copy (I_0, copies of 0, I_1, ...); the text after the
                # image follows it, so the first len(pairs) text slots after an image are the copies.
                n, m = copies.pop(0)
                assert n == v
                pos = place[("image", m)]
            else:
                pos = place[("text", v)]
            result[:, r, j] = pos
        assert not copies, f"row {r}: anchors {copies} not found in the output"
    return result


def decode_positions(prompt_positions: np.ndarray, out_mask: np.ndarray, step: int) -> np.ndarray:
    """[3, B, 1] position of the step-th new token (0 = the first): largest prompt position + 1 + step."""
    largest = np.where(np.asarray(out_mask)[None].astype(bool), prompt_positions, -1).max(axis=(0, 2))
    return np.broadcast_to((largest + 1 + step)[None, :, None], (3, largest.shape[0], 1)).astype(np.int64)
