"""The AttAnchor training layout: what the exported embedding graph computes, with answers appended.

Each row is the prompt's ids followed by the answer's; the answer tokens are never anchor candidates
(candidate_mask 0), nor is any id the candidate rule excludes (attanchor_export.trace.candidates), so
the indices are exactly those of AnchorInsert version 2 on the prompt, and the answer ends each row.
Indices come from the numpy specification (attanchor_graphs.specification); gradients flow through the
gather into the text rows and the image features.

Positions are a function of the layout (`positions=`): `sequential_positions` is what LLaVA-family
decoders and embedding.onnx use (cumsum of the mask - 1). A family with 3-D positions (M-RoPE) passes
its own function of the same Layout (which slot holds which image patch is in gather_index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from attanchor_graphs.specification import anchor_insert, position_ids_from_mask


@dataclass
class Layout:
    embeds: torch.Tensor  # [B, L, D] left padded
    mask: torch.Tensor  # [B, L] 1 = real slot
    gather_index: np.ndarray  # [B, L] into concat(text, image): text n -> n, image m -> T + m
    num_text: int  # T: the width of the padded id rows
    num_image: int  # M
    ids: np.ndarray  # [B, T] the padded id rows (prompt + answer)
    answer_lengths: list[int]  # per row; the answer is the last tokens of the row
    anchors: int  # anchors inserted in the batch
    candidates: int  # candidates (tokens that could have been anchors)
    positions: torch.Tensor | None = None  # filled by anchored_layout


def sequential_positions(layout: Layout) -> torch.Tensor:
    """1-D position ids [B, L]: cumsum(mask) - 1, and 1 on padding (HF and embedding.onnx)."""
    return torch.from_numpy(position_ids_from_mask(layout.mask.numpy()))


def anchored_layout(
    embed: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    features: torch.Tensor,
    threshold: float,
    image_token_id: int,
    pad_token_id: int,
    excluded_token_ids: Sequence[int],
    positions: Callable[[Layout], torch.Tensor] = sequential_positions,
) -> Layout:
    """Left-padded anchored rows of prompt + answer; `features` [B, M, D] are the image features."""
    rows = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    t = max(map(len, rows))
    ids = np.full((len(rows), t), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    allowed = np.zeros((len(rows), t), dtype=np.int64)
    excluded = np.asarray(sorted(set(excluded_token_ids)) or [-1], dtype=np.int64)
    for i, (r, a) in enumerate(zip(rows, answers, strict=True)):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
        allowed[i, t - len(r) : t - len(a)] = 1  # the prompt; answer tokens are never candidates
    allowed &= ~np.isin(ids, excluded)
    text = embed(torch.from_numpy(ids))
    where = (ids == image_token_id).argmax(1)
    index, out_mask = anchor_insert(
        text.detach().float().numpy(), features.detach().float().numpy(), mask, where,
        np.float32(threshold), mode="t2i", candidate_mask=allowed,
    )
    both = torch.cat([text, features.to(text.dtype)], dim=1)
    embeds = torch.gather(both, 1, torch.from_numpy(index)[..., None].expand(-1, -1, both.shape[-1]))
    m = features.shape[1]
    anchors = int((out_mask.sum(1) - mask.sum(1) + 1 - m).sum())
    after_image = np.arange(t)[None, :] > where[:, None]
    layout = Layout(embeds, torch.from_numpy(out_mask), index, t, m, ids, [len(a) for a in answers],
                    anchors, int((allowed.astype(bool) & after_image & mask.astype(bool)).sum()))
    layout.positions = positions(layout)
    return layout


def answer_slots(layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns) of the slots that predict each answer token, and the target ids."""
    length = layout.embeds.shape[1]
    rows, cols, targets = [], [], []
    for r, n in enumerate(layout.answer_lengths):
        for j in range(n):
            rows.append(r)
            cols.append(length - n + j - 1)
            targets.append(int(layout.ids[r, layout.num_text - n + j]))
    return torch.as_tensor(rows), torch.as_tensor(cols), torch.as_tensor(targets)
