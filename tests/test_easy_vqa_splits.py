"""easy-vqa as the checks read it: which split the gate, eval and calibration each use (never the same
questions), and where the shape is, read from the pixels (the localisation metric's mask)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from attanchor_export.load import easy_vqa as ev
from attanchor_export.load.datasets import GATE_SPLIT, load_calibration_set, load_task


def test_validation_is_a_tenth_of_the_train_images_with_all_their_questions():
    train, validation = ev.questions("train"), ev.questions("validation")
    held = ev.validation_image_ids()
    train_images = {q.image_id for q in train}
    assert len(held) == len(train_images) // 10 == 400 and held <= train_images
    assert {q.image_id for q in validation} == held
    assert len(validation) == sum(q.image_id in held for q in train)  # every question of a held-out image
    # The rule the training script applies (attanchor_export/train on the method branch): a seeded sample
    # of the sorted train image ids. Written out here so a change to either side fails.
    import random

    assert held == set(random.Random(0).sample(sorted(train_images), 400))


def test_the_gate_eval_and_calibration_never_share_a_question():
    gate = load_task("easy-vqa", split=GATE_SPLIT, limit=200)
    evaluated = load_task("easy-vqa", limit=1000)  # eval's default split and README's 1,000
    calibration = load_calibration_set("easy-vqa")
    assert GATE_SPLIT == "validation" and len(gate) == 200 and len(calibration) == 256
    held = ev.validation_image_ids()
    gate_images = {it.image for it in gate}
    assert all(it.image_id in held for it in gate)
    assert gate_images.isdisjoint(it.image for it in evaluated)  # train images vs test images
    calibration_ids = {int(s.label.split(":")[1]) for s in calibration}
    assert calibration_ids.isdisjoint(held) and gate_images.isdisjoint(s.image for s in calibration)


def test_a_split_easy_vqa_lacks_is_one_line():
    import pytest

    from attanchor_export.errors import ExportError

    with pytest.raises(ExportError, match=r"^--data easy-vqa: easy-vqa has splits train, validation, test, not 'val'$"):
        load_task("easy-vqa", split="val")


def test_the_shape_colour_comes_from_the_pixels():
    """colour_of reads every test image's colour as its own questions state it; a question's first colour
    word (what the localisation metric used to take) is another colour for half of README's images."""
    labels = ev.image_labels("test")
    paths = {q.image_id: q.image for q in ev.questions("test")}
    read, first_word = {}, {}
    for it in load_task("easy-vqa", limit=1000):  # README's 1,000 questions, in the order eval answers them
        first_word.setdefault(it.image_id, next((c for c in ev.COLORS if c in ev.words_of(it.question)), None))
    for image_id, path in paths.items():
        rgb = np.asarray(Image.open(path).convert("RGB"))
        read[image_id] = ev.colour_of(rgb)
        mask = ev.shape_mask(rgb, read[image_id])
        assert 20 <= mask.sum() <= 0.6 * mask.size, (image_id, int(mask.sum()))  # a shape, not nothing or all
    known = {i: c for i, (c, _) in labels.items() if c is not None}
    assert len(known) > 800 and all(read[i] == c for i, c in known.items())
    wrong = sum(w is not None and w != read[i] for i, w in first_word.items())
    assert len(first_word) == 633 and wrong > 0.4 * len(first_word)  # 317 masks the old rule mis-coloured
