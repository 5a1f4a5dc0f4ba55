"""Training sets: questions, the images as the model's pixels, and what each patch shows.

A patch label says which (colour, shape) pair covers the patch (more than a quarter of it), or the
background (nothing on it); partly covered patches are left out of the alignment terms (-1). Labels
are read from the pixels / the generator, never from the answers being trained on at stage B.

Validation is carved from train (easy-vqa: a seeded 10% of the train IMAGES with all their questions;
tiny-scenes: its own validation split). No function here reads a test split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -1  # a partly covered patch: left out of the alignment terms


@dataclass
class TaskData:
    name: str
    questions: list  # objects with .question, .answer, .kind, .image_id
    pixels: torch.Tensor  # float32 [N, 3, H, W], the model's image processor applied
    row: dict[int, int]  # image_id -> row of pixels / labels
    labels: torch.Tensor  # long [N, M]: index into pairs, len(pairs) = background, -1 = left out
    pairs: list[tuple[str, str]]  # (colour, shape) for every label index below len(pairs)

    def __len__(self) -> int:
        return len(self.questions)


def pixel_tensor(images, processor, chunk: int = 256) -> torch.Tensor:
    """Images (paths or uint8 HxWx3 arrays) -> float32 [N, 3, H, W] through the image processor."""
    from PIL import Image

    out = []
    for i in range(0, len(images), chunk):
        batch = [Image.open(im).convert("RGB") if isinstance(im, str) else Image.fromarray(np.asarray(im))
                 for im in images[i : i + chunk]]
        out.append(torch.as_tensor(np.asarray(processor(images=batch, return_tensors="np")["pixel_values"])))
    return torch.cat(out)


def labels_from_overlap(overlap: np.ndarray, pair_index: list[int], background: int) -> np.ndarray:
    """overlap float [n_items, M] (share of each patch each item covers) -> long [M] patch labels."""
    best = overlap.argmax(0)
    top = overlap.max(0)
    out = np.full(overlap.shape[1], IGNORE, dtype=np.int64)
    out[top > 0.25] = np.asarray(pair_index)[best[top > 0.25]]
    out[top == 0] = background
    return out


def _subset(questions, image_ids) -> list:
    keep = set(image_ids)
    return [q for q in questions if q.image_id in keep]


def easy_vqa_splits(processor, patch: int, validation_share: float = 0.1, seed: int = 0):
    """(train, validation) TaskData from easy-vqa's TRAIN split; validation = a seeded share of its images."""
    from PIL import Image

    from attanchor_export.load import easy_vqa as ev

    questions = list(ev.questions("train"))
    paths = dict(sorted({q.image_id: q.image for q in questions}.items()))
    ids = list(paths)
    held = set(random.Random(seed).sample(ids, int(len(ids) * validation_share)))
    known = ev.image_labels("train")
    pairs = [(c, s) for c in ev.COLORS for s in ev.SHAPES]
    labels, agree = [], [0, 0]
    for image_id, path in paths.items():
        rgb = np.asarray(Image.open(path).convert("RGB"))
        colour = ev.colour_of(rgb)
        mask = ev.shape_mask(rgb, colour)
        ys, xs = np.nonzero(mask)
        # Shape from how much of its bounding box it fills (rectangle ~1, circle ~pi/4, triangle ~1/2),
        # where the image's questions do not say.
        fill = mask.sum() / max(1, (np.ptp(ys) + 1) * (np.ptp(xs) + 1)) if len(ys) else 0.0
        shape = "rectangle" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        k_colour, k_shape = known.get(image_id, (None, None))
        for k, v in ((k_colour, colour), (k_shape, shape)):
            if k is not None:
                agree[0] += k == v
                agree[1] += 1
        pair = pairs.index((k_colour or colour, k_shape or shape))
        labels.append(labels_from_overlap(ev.patch_overlap(mask, patch)[None], [pair], len(pairs)))
    print(f"easy-vqa train: {len(ids)} images ({len(held)} held out for validation); "
          f"pixel-read labels agree with the questions' {agree[0]}/{agree[1]}", flush=True)
    pixels = pixel_tensor(list(paths.values()), processor)
    row = {i: n for n, i in enumerate(ids)}
    label_tensor = torch.as_tensor(np.stack(labels))
    train_ids = [i for i in ids if i not in held]
    return (TaskData("easy-vqa", _subset(questions, train_ids), pixels, row, label_tensor, pairs),
            TaskData("easy-vqa", _subset(questions, held), pixels, row, label_tensor, pairs))


def scenes_split(split: str, processor, grid: int, limit: int | None = None) -> TaskData:
    """tiny-scenes `split` ("train" or "validation") rendered in memory; `grid` patches per side
    (tiny-vqa's tower: 64 / 8 = 8); `limit`: the first N scenes only (tests)."""
    from attanchor_export.load import scenes as sc

    if split == "test":
        raise ValueError("training code never reads the test split")
    all_scenes = sc.scenes(split)[:limit]
    pairs = [(c, s) for c in sc.COLORS for s in sc.SHAPES]
    labels = [labels_from_overlap(sc.patch_overlap(s, sc.SIZE // grid), [pairs.index((i.colour, i.shape)) for i in s.items],
                                  len(pairs)) for s in all_scenes]
    pixels = pixel_tensor([sc.render(s) for s in all_scenes], processor)
    questions = [q for q in sc.questions(split, with_images=False) if q.image_id < len(all_scenes)]
    return TaskData(sc.NAME, questions, pixels, {s.index: s.index for s in all_scenes},
                    torch.as_tensor(np.stack(labels)), pairs)
