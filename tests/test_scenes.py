"""tiny-scenes: seeded, disjoint splits, and every answer re-derived from the rendered PIXELS.

The pixel reading (each palette colour's pixels: centroid, and the shape from how much of its bounding
box it fills) is independent of the generator's own item list, so a wrong answer, a shape drawn as
another, or an ambiguous "left of" fails here.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from attanchor_export.load import scenes

N = 150  # scenes checked per split


def read_pixels(rgb: np.ndarray) -> dict[str, tuple[str, float, float]]:
    """colour -> (shape, centroid x, centroid y) read off an image."""
    out = {}
    flat = rgb.astype(int)
    for name, value in scenes.COLORS.items():
        mask = (np.abs(flat - np.asarray(value)).sum(-1) == 0)
        if mask.sum() < 20:
            continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        out[name] = (shape, xs.mean(), ys.mean())
    return out


def expected(question: str, seen: dict) -> str:
    words = re.findall(r"[a-z]+", question)
    by_shape = Counter(s for s, _, _ in seen.values())

    def ref(rest: list[str]) -> str:  # "the circle" / "the red one" -> a colour
        if rest[-1] == "one":
            return rest[-2]
        (colour,) = [c for c, (s, _, _) in seen.items() if s == rest[-1]]
        return colour

    if question.startswith("what color is the shape left of"):
        x = seen[ref(words[7:])][1]
        (left,) = [c for c, (_, cx, _) in seen.items() if cx < x]
        return left
    if question.startswith("what color is the shape closest to"):
        c0 = ref(words[7:])
        _, x, y = seen[c0]
        return min((c for c in seen if c != c0), key=lambda c: (seen[c][1] - x) ** 2 + (seen[c][2] - y) ** 2)
    if question.startswith("what color is the"):
        (colour,) = [c for c, (s, _, _) in seen.items() if s == words[-1]]
        return colour
    if question.startswith("what shape is the"):
        return seen[words[4]][0]
    if question.startswith("is there"):
        colour, shape = words[-2], words[-1]
        return "yes" if colour in seen and seen[colour][0] == shape else "no"
    if question.startswith("how many"):
        return scenes.COUNTS[by_shape[words[2][:-1]]]
    raise AssertionError(f"unknown question form {question!r}")


@pytest.mark.parametrize("split", list(scenes.SPLITS))
def test_every_answer_follows_from_the_pixels(split):
    questions = [q for q in scenes.questions(split, with_images=False) if q.image_id < N]
    assert {q.kind for q in questions} == set(scenes.KINDS)
    for i in range(N):
        sc = scenes.scene(split, i)
        rgb = scenes.render(sc)
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        seen = read_pixels(rgb)
        assert set(seen) == {it.colour for it in sc.items}, "every item drawn, in its own colour, none hidden"
        assert 2 <= len(seen) <= 4
        for q in (q for q in questions if q.image_id == i):
            assert q.answer == expected(q.question, seen), (split, i, q.question)


def test_no_answers_need_binding():
    """Half-ish of yes/no are "no" with the colour and the shape both in the scene (on different items)."""
    qs = [q for q in scenes.questions("train", with_images=False) if q.kind == "yes/no"][:1000]
    no = [q for q in qs if q.answer == "no"]
    assert 0.35 < len(no) / len(qs) < 0.65
    for q in no:
        sc = scenes.scene("train", q.image_id)
        colour, shape = q.question.rstrip("?").split()[-2:]
        assert colour in {it.colour for it in sc.items} and shape in {it.shape for it in sc.items}


def test_splits_are_seeded_and_disjoint():
    assert scenes.scene("test", 7) == scenes.scene("test", 7)
    assert scenes.questions("validation", with_images=False) == scenes.questions("validation", with_images=False)
    layouts = {split: {sc.items for sc in scenes.scenes(split)[:500]} for split in scenes.SPLITS}
    assert not layouts["train"] & layouts["test"] and not layouts["validation"] & layouts["test"]
    assert not layouts["train"] & layouts["validation"]
    with pytest.raises(ValueError, match="splits"):
        scenes.scene("dev", 0)


def test_answers_are_one_word_with_distinct_first_tokens():
    """Training and its validation score the first answer token: every answer must start differently."""
    answers = {q.answer for q in scenes.questions("validation", with_images=False)}
    assert answers <= {*scenes.COLORS, *scenes.SHAPES, "yes", "no", *scenes.COUNTS}
    assert all(" " not in a for a in answers)


def test_eval_reads_the_test_split_from_png(tmp_path, monkeypatch):
    from PIL import Image

    from attanchor_export.errors import ExportError
    from attanchor_export.load.datasets import load_task

    monkeypatch.setenv("ATTANCHOR_CACHE", str(tmp_path))
    scenes.questions.cache_clear()
    items = load_task("tiny-scenes", split="test", limit=20)
    assert len(items) == 20 and all(it.split == "test" for it in items)
    for it in items[:5]:
        assert np.array_equal(np.asarray(Image.open(it.image).convert("RGB")),
                              scenes.render(scenes.scene("test", it.image_id)))
    assert str(tmp_path) in items[0].image
    with pytest.raises(ExportError, match="splits"):
        load_task("tiny-scenes", split="dev")
    scenes.questions.cache_clear()


def test_word_patches_mark_the_items_of_a_word():
    sc = scenes.scene("test", 3)
    on = scenes.word_patches(sc, 8)
    for item in sc.items:
        cell = (item.y // 8) * 8 + item.x // 8  # the patch under the item's centre
        assert on[item.colour][cell] and on[item.shape][cell]
    assert set(on) == {it.colour for it in sc.items} | {it.shape for it in sc.items}
