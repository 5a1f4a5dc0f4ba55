"""Data sets the checks and the precision stage both read: task questions with answers, and image +
prompt samples for calibration and the accuracy gate.

Task questions (`load_task`): `easy-vqa` (the PyPI data set) or `tiny-scenes` (generated; a fixed random
subset of `limit` questions of a split), or a JSONL file of {"image", "question", "answer"[, "kind"]} rows.
Answered by `eval` (default split: test) and by the gate's task part (GATE_SPLIT: validation; easy-vqa's
is held-out train images), so the two never share a question (checks.task_accuracy, precision.gate).

Samples (`Sample`: an image and a prompt, no answer), so the graphs see real decoder inputs:
- `builtin_samples()`: a small default set that needs no network: images synthesised procedurally
  (gradients, discs, boxes, stripes, checkers, noise) from fixed seeds, and VQA-style prompts. It is
  enough to set activation ranges and to catch broken quantization; a set of real photos and the
  questions users ask (`--calib`) is better for int8 activation ranges.
- `gate_samples()`: the fixed set the accuracy gate uses: other seeds and other prompts than the
  calibration set, so a gate never grades the data it was calibrated on.
- `load_calibration_set(calib)`: `--calib DIR_OR_JSONL`: a folder of images (prompts cycled from the
  built-in list), a JSONL file of {"image": path, "prompt": text} lines (paths relative to the file), or
  "easy-vqa" (its train split without the validation images: the gate grades validation, eval test),
  or "tiny-scenes" (its train split; validation and test are other scenes).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attanchor_export.errors import ExportError
from attanchor_export.load import easy_vqa
from attanchor_export.load.image_jsonl import read_image_jsonl

# ---- task questions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskItem:
    image: str
    question: str
    answer: str
    kind: str = "other"
    image_id: int | None = None
    source: str | None = None  # "FILE.jsonl:LINE" for a JSONL row: how a skipped row is named
    split: str | None = None  # tiny-scenes: the split its image_id indexes


# The split of a named data set the quantization gate's task part answers: never eval's default (test).
GATE_SPLIT = "validation"
CALIBRATION_QUESTIONS, CALIBRATION_TASK_SEED = 256, 1


def load_task(data: str, split: str = "test", limit: int | None = None, seed: int = 0) -> list[TaskItem]:
    """`easy-vqa` (the PyPI data set; splits train, validation (held-out train images), test), `tiny-scenes`
    (generated, attanchor_export/load/scenes.py; splits train, validation, test) (a fixed random subset of
    `limit` questions of `split`), or a JSONL file of {"image", "question", "answer"[, "kind"]} rows (image
    paths relative to the file; no splits: the first `limit` rows)."""
    if data in ("easy-vqa", "tiny-scenes"):
        if data == "easy-vqa":
            source = easy_vqa
        else:
            from attanchor_export.load import scenes as source
        try:
            questions = source.questions(split)
        except ValueError as e:
            raise ExportError(f"--data {data}: {e}") from None
        rows = [TaskItem(q.image, q.question, q.answer, q.kind, q.image_id,
                         split=split if data == "tiny-scenes" else None) for q in questions]
        if limit and limit < len(rows):
            rows = random.Random(seed).sample(rows, limit)
        return rows
    path = Path(data).expanduser()
    if not path.is_file():
        raise ExportError(f"--data {data}: neither easy-vqa nor an existing JSONL file")
    rows = []
    for lineno, image, rec in read_image_jsonl(path, ("question", "answer"), what="", strings=False):
        for key in ("question", "answer"):
            value = rec[key]
            # An answer may be a number ("how many": 3); null, true or a list is a broken row, not "None".
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ExportError(f'{path}:{lineno}: "{key}" is {json.dumps(value)}: expected a string')
        rows.append(TaskItem(str(image), str(rec["question"]), str(rec["answer"]), str(rec.get("kind", "other")),
                             source=f"{path}:{lineno}"))
    if not rows:
        raise ExportError(f"{path}: no questions")
    return rows[:limit] if limit else rows


# ---- image + prompt samples -------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Questions of the kind LLaVA is asked; the calibration and gate lists do not overlap.
CALIBRATION_PROMPTS = (
    "What is in the image?",
    "Describe the image in detail.",
    "What color is the car?",
    "How many people are there?",
    "Is there a dog in the picture?",
    "What is on the table?",
    "Which object is on the left?",
    "Is it day or night?",
)
GATE_PROMPTS = (
    "Describe this picture briefly.",
    "What is shown in the photo?",
    "Where is the cat sitting?",
    "What animal is this?",
)
CALIBRATION_SEED, GATE_SEED = 0, 1000
DEFAULT_CALIBRATION_SIZE = 8
DEFAULT_GATE_SIZE = 4


@dataclass(frozen=True)
class Sample:
    """One image + prompt. `image` is anything the runtime's image preprocessor takes (path, PIL, uint8 HWC)."""

    image: object
    prompt: str
    label: str = ""


def synthetic_image(seed: int, size: int = 256) -> np.ndarray:
    """A deterministic uint8 [size, size, 3] picture: a colour gradient with a few discs, boxes,
    stripes or a checker pattern and mild noise. Not a photo, but it has edges, flat regions and
    colour, which is what spreads a vision tower's activations."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
    img = (1 - t) * c0 + t * c1
    for _ in range(int(rng.integers(2, 6))):
        color = rng.uniform(0, 255, 3)
        kind = int(rng.integers(0, 4))
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
        if kind == 0:  # disc
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        elif kind == 1:  # box
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r * rng.uniform(0.3, 1.0))
        elif kind == 2:  # stripes inside a box
            period = rng.uniform(0.02, 0.1)
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r) & (((xx + yy) / period).astype(int) % 2 == 0)
        else:  # checker patch
            cell = rng.uniform(0.02, 0.08)
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r) & (
                ((xx / cell).astype(int) + (yy / cell).astype(int)) % 2 == 0
            )
        img[mask] = color
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def builtin_samples(n: int = DEFAULT_CALIBRATION_SIZE, seed: int = CALIBRATION_SEED,
                    prompts: Sequence[str] = CALIBRATION_PROMPTS) -> list[Sample]:
    return [
        Sample(synthetic_image(seed + i), prompts[i % len(prompts)], f"builtin-{seed + i}") for i in range(n)
    ]


def gate_samples(n: int = DEFAULT_GATE_SIZE) -> list[Sample]:
    """The accuracy gate's fixed set (never the calibration images or prompts)."""
    return builtin_samples(n, seed=GATE_SEED, prompts=GATE_PROMPTS)


def load_calibration_set(calib: str | Path | None, limit: int | None = None) -> list[Sample]:
    """`--calib`: None = the built-in set; "easy-vqa" or "tiny-scenes"; a folder of images; or a JSONL file of {"image", "prompt"}."""
    if calib is None:
        return builtin_samples()
    if calib == "easy-vqa":  # real images and questions: train, without the gate's validation images
        held = easy_vqa.validation_image_ids()
        rows = [q for q in easy_vqa.questions("train") if q.image_id not in held]
        rows = random.Random(CALIBRATION_TASK_SEED).sample(rows, min(len(rows), limit or CALIBRATION_QUESTIONS))
        return [Sample(q.image, q.question, f"easy-vqa:{q.image_id}") for q in rows]
    if calib == "tiny-scenes":  # its train split: the gate grades validation, eval test (other scenes)
        items = load_task(calib, split="train", limit=limit or CALIBRATION_QUESTIONS, seed=CALIBRATION_TASK_SEED)
        return [Sample(it.image, it.question, f"{calib}:{it.image_id}") for it in items]
    path = Path(calib).expanduser()
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ExportError(f"--calib {path}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        samples = [
            Sample(str(p), CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)], p.name) for i, p in enumerate(images)
        ]
    elif path.is_file():
        samples = [Sample(str(image), str(rec["prompt"]), f"{path.name}:{lineno}")
                   for lineno, image, rec in read_image_jsonl(path, ("prompt",), what="--calib ")]
        if not samples:
            raise ExportError(f"--calib {path}: the file has no samples")
    else:
        raise ExportError(f"--calib {path}: no such folder or JSONL file")
    return samples[:limit] if limit else samples


__all__ = ["CALIBRATION_PROMPTS", "GATE_PROMPTS", "GATE_SPLIT", "IMAGE_SUFFIXES", "Sample", "TaskItem", "builtin_samples",
           "gate_samples", "load_calibration_set", "load_task", "synthetic_image"]
