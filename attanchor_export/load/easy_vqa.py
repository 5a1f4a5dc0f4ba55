"""The easy-vqa data set (PyPI `easy-vqa`, MIT): questions, answers, images and where the shape is.

Each 64x64 image holds one shape (circle, rectangle, triangle) in one of 8 colours on a light random
background. The package gives questions and answers only; each image's colour and shape are read
back from its own questions, and the shape's pixels from the image (closer to the shape's colour
than to the background's, which is the most common colour), so anchor localisation can be scored.

Splits: `train` and `test` are the package's; `validation` is a seeded 10% of the TRAIN images with all
their questions (VALIDATION_SHARE, VALIDATION_SEED), the images the training script holds out. It is
what the quantization gate's task part grades, so the gate never shares a question with `eval`'s default
(test), and calibration (`--calib easy-vqa`) draws from train without those images. `train` stays the
package's whole train split (validation included), as the training code reads it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from attanchor_export.errors import CheckpointError

COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (4, 130, 130), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
SHAPES = ("circle", "rectangle", "triangle")
SPLITS = ("train", "validation", "test")
VALIDATION_SHARE, VALIDATION_SEED = 0.1, 0  # held-out train images (see the module docstring)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Question:
    image: str  # path of the PNG
    image_id: int
    question: str
    answer: str
    kind: str  # "yes/no", "color" or "shape"


def question_kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "color" if answer in COLORS else "shape"


def _require():
    try:
        import easy_vqa
    except ImportError:
        raise CheckpointError("the easy-vqa data set is not installed: pip install easy-vqa==1.0") from None
    return easy_vqa


@lru_cache(maxsize=3)
def questions(split: str = "test") -> tuple[Question, ...]:
    if split not in SPLITS:
        raise ValueError(f"easy-vqa has splits {', '.join(SPLITS)}, not {split!r}")
    if split == "validation":
        held = validation_image_ids()
        return tuple(q for q in questions("train") if q.image_id in held)
    ev = _require()
    qs, answers, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    return tuple(
        Question(paths[i], int(i), q, a, question_kind(a)) for q, a, i in zip(qs, answers, ids, strict=True)
    )


@lru_cache(maxsize=1)
def validation_image_ids() -> frozenset[int]:
    """The train images held out for validation: a seeded VALIDATION_SHARE of the train image ids, drawn
    from their sorted list (random.Random(VALIDATION_SEED).sample), the same rule the training script uses."""
    ids = sorted({q.image_id for q in questions("train")})
    return frozenset(random.Random(VALIDATION_SEED).sample(ids, int(len(ids) * VALIDATION_SHARE)))


@lru_cache(maxsize=3)
def image_labels(split: str = "test") -> dict[int, tuple[str, str]]:
    """image id -> (colour, shape), from the answers to that image's colour and shape questions.

    Every image in both splits has at least one colour or shape question; where one is missing it is
    inferred from yes/no questions ("is there a red shape?" -> yes).
    """
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q in questions(split):
        words = set(_WORD.findall(q.question))
        if q.kind == "color":
            colour[q.image_id] = q.answer
        elif q.kind == "shape":
            shape[q.image_id] = q.answer
        elif (q.answer == "yes") != ("not" in words or "no" in words):  # the question's claim holds
            for c in COLORS:
                if c in words:
                    colour.setdefault(q.image_id, c)
            for s in SHAPES:
                if s in words:
                    shape.setdefault(q.image_id, s)
    return {i: (colour.get(i), shape.get(i)) for i in set(colour) | set(shape)}


def colour_of(rgb: np.ndarray) -> str:
    """The shape's colour read off the pixels: the palette colour with the most (near-)exact pixels
    (the fill is an exact palette colour; anti-aliased edges and the light background are not)."""
    flat = rgb.reshape(-1, 3).astype(np.int32)
    return max(COLORS, key=lambda c: int((np.abs(flat - np.asarray(COLORS[c])).sum(-1) <= 12).sum()))


def shape_mask(rgb: np.ndarray, colour: str) -> np.ndarray:
    """bool [H, W]: pixels closer to `colour` than to the background (the image's most common colour)."""
    flat = rgb.reshape(-1, 3).astype(np.int32)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    background = values[counts.argmax()]
    target = np.asarray(COLORS[colour], dtype=np.int32)
    d_shape = ((flat - target) ** 2).sum(-1)
    d_bg = ((flat - background) ** 2).sum(-1)
    return (d_shape < d_bg).reshape(rgb.shape[:2])


def patch_overlap(mask: np.ndarray, patch: int) -> np.ndarray:
    """float [H/patch * W/patch]: fraction of each patch's pixels on the shape, row-major like ViT patches."""
    h, w = mask.shape
    grid = mask[: h - h % patch, : w - w % patch].reshape(h // patch, patch, w // patch, patch)
    return grid.mean(axis=(1, 3)).reshape(-1)


def words_of(question: str) -> set[str]:
    return set(_WORD.findall(question))
