"""scripts/measure_scenes.py's statistics and table (the measurement itself runs outside CI)."""

from __future__ import annotations

import pytest
from helpers import load_script

from attanchor_export.checks.task_accuracy import TaskItem


@pytest.fixture(scope="module")
def measure():
    return load_script("measure_scenes")


def test_wilson_interval(measure):
    lo, hi = measure.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = measure.wilson(0, 20)  # never below 0, and not a zero-width interval
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert measure.wilson(20, 20)[1] == 1.0


def test_exact_mcnemar(measure):
    assert measure.mcnemar(0, 10) == pytest.approx(2 / 1024)
    assert measure.mcnemar(5, 5) == 1.0
    assert measure.mcnemar(0, 0) == 1.0
    assert measure.mcnemar(3, 12) == pytest.approx(measure.mcnemar(12, 3))
    assert measure.mcnemar(3, 12) == pytest.approx(0.03516, abs=1e-5)


def test_table_and_paired_rows(measure):
    items = [TaskItem("x.png", "q", "red", kind) for kind in ("color", "color", "count", "count")]
    a = {"label": "tiny-scenes", "format": "fp32", "items": items, "correct": [True, True, True, False],
         "anchors_per_question": 1.5, "localisation": {"on_shape": 0.8, "chance": 0.1, "word_anchors": 6}}
    b = {"label": "tiny-scenes-noanchor", "format": "fp32", "items": items, "correct": [False, True, False, False],
         "anchors_per_question": 0.0}
    refused = {"label": "tiny-scenes", "format": "int8", "refused": "error: gate failed"}
    text = measure.table([a, b, refused], items)
    assert "| tiny-scenes | fp32 | 4 | 0.750 [" in text and "80.0% (10.0%), 6 words" in text
    assert "refused: error: gate failed" in text
    (line,) = measure.paired([a, b])
    assert "difference +0.500" in line and "only with anchors 2, only without 0" in line
