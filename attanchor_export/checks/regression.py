"""`eval`'s regression gates for a user's CI: a floor on accuracy, and against a baseline a largest drop
and a smallest share of identical answers; the baseline report they read; their JUnit cases.

A report is what `eval --json` prints (REPORT_VERSION). Beside the figures it carries, per threshold,
every answer in question order (`answers`, one short string each: about 10 KB for 1,000 one-word
answers, small enough to commit) and once the question set it answered (`questions`: the count and a
sha256 over each question's image file name, text and expected answer, in order). A later run compares
its answers with a committed report position by position, and is refused in one line when the report
was measured on another data set, split or set of questions.

Gates (each optional), judged on the first threshold's result (the one `.accuracy` reports):

    --min-accuracy F    accuracy >= F
    --max-drop F        baseline accuracy - accuracy <= F
    --min-agreement F   share of questions whose answer is identical to the baseline's >= F

"Identical" means the same answer text (stripped of surrounding whitespace), not merely both right: two
systems that are both wrong in different words disagree. The baseline is another artifact answering the
same questions now (`--compare DIR`) or a committed report (`--baseline REPORT.json`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from attanchor_export.checks.junit import Case
from attanchor_export.errors import ExportError

REPORT_VERSION = 1
GATES = ("min_accuracy", "max_drop", "min_agreement")  # the order they are judged and listed in
EPSILON = 1e-9  # accuracies are means of 0/1: exact floors must not fail on float rounding


def question_set(items) -> dict:
    """The answered questions' identity: count and sha256 (image file name, question, expected answer)."""
    digest = hashlib.sha256()
    for it in items:
        digest.update(f"{Path(it.image).name}\t{it.question}\t{it.answer}\n".encode())
    return {"count": len(items), "sha256": digest.hexdigest()}


def fraction(option: str, text: str) -> float:
    """A gate's value: a number in [0, 1]; ExportError (one line) otherwise, naming a percentage as such."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ExportError(f"{option} {text}: expected a fraction between 0 and 1, e.g. 0.90") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        hint = f" (a fraction: {value / 100:g} for {value:g}%)" if 1.0 < value <= 100.0 else ""
        raise ExportError(f"{option} {text}: expected a fraction between 0 and 1{hint}")
    return value


def read_baseline(path: Path) -> dict:
    """A committed `eval --json` report, checked to hold what the gates read."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--baseline {path}: no such file (write one with `attanchor-export eval ... --json > FILE`)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"--baseline {path}: not a JSON report ({type(e).__name__}: {e})") from None
    results = report.get("results") if isinstance(report, dict) else None
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise ExportError(f"--baseline {path}: not a report of `attanchor-export eval --json`")
    if report.get("report_version") != REPORT_VERSION or not isinstance(results[0].get("answers"), list) \
            or not isinstance(report.get("questions"), dict):
        raise ExportError(f"--baseline {path}: has no per-question answers (report version "
                          f"{report.get('report_version')}, expected {REPORT_VERSION}): write it again with eval --json")
    return report


def check_same_questions(report: dict, path: Path, data: str, split: str | None, questions: dict) -> None:
    """Refuse a baseline measured on another data set, split or question set (one line)."""
    theirs = f"{report.get('data')}" + (f" split {report['split']}" if report.get("split") else "")
    ours = data + (f" split {split}" if split else "")
    if report.get("split") != split or (split is not None and report.get("data") != data):
        raise ExportError(f"--baseline {path} was measured on {theirs}, this run answers {ours}")
    if report["questions"].get("sha256") != questions["sha256"]:
        raise ExportError(
            f"--baseline {path} was measured on other questions ({report['questions'].get('count')} of {theirs}) "
            f"than this run ({questions['count']} of {ours}): use the --data, --split and --limit it was made with")


def baseline_comparison(report: dict, path: Path, answers: list[str]) -> dict:
    """The baseline's figures beside this run's answers (its first threshold's result)."""
    first = report["results"][0]
    theirs = first["answers"]
    same = sum(a == b for a, b in zip(answers, theirs, strict=True)) / len(answers) if answers else 0.0
    return {"report": str(path), "precision": report.get("precision"), "threshold": first.get("threshold"),
            "accuracy": float(first["accuracy"]), "by_kind": first.get("by_kind"), "same_answers": same}


def judge(result: dict, min_accuracy: float | None = None, max_drop: float | None = None,
          min_agreement: float | None = None) -> list[dict]:
    """One row per gate asked for: name, value, limit, passed, and the line that says it."""
    reference = result.get("baseline") or result.get("compared")
    rows = []
    if min_accuracy is not None:
        value = result["accuracy"]
        rows.append(_row("min_accuracy", value, min_accuracy, value >= min_accuracy - EPSILON,
                         f"accuracy {value:.4f} {{}} --min-accuracy {min_accuracy:g}"))
    if max_drop is not None:
        value = reference["accuracy"] - result["accuracy"]
        rows.append(_row("max_drop", value, max_drop, value <= max_drop + EPSILON,
                         f"accuracy {result['accuracy']:.4f} against the baseline's {reference['accuracy']:.4f}: "
                         f"a drop of {value:.4f} {{}} --max-drop {max_drop:g}", passed_relation="<="))
    if min_agreement is not None:
        value = reference["same_answers"]
        rows.append(_row("min_agreement", value, min_agreement, value >= min_agreement - EPSILON,
                         f"{value:.2%} of answers identical to the baseline's {{}} --min-agreement {min_agreement:g}"))
    return rows


def _row(name: str, value: float, limit: float, passed: bool, template: str, passed_relation: str = ">=") -> dict:
    failed_relation = {">=": "<", "<=": ">"}[passed_relation]
    return {"name": name, "value": float(value), "limit": float(limit), "passed": bool(passed),
            "message": template.format(passed_relation if passed else failed_relation)}


def eval_cases(report: dict) -> list[Case]:
    """`eval --junit`: one case per gate asked for, then one per question type (and overall) of the first
    threshold's result. Question types are reported, not gated (their counts are small: one question of
    fifty is two points); their text names the baseline's figure where there is one."""
    first = report["results"][0]
    reference = first.get("baseline") or first.get("compared")
    cases = [Case("eval.gates", g["name"].replace("_", "-"), failure=None if g["passed"] else g["message"],
                  output=g["message"]) for g in report.get("gates", [])]
    kinds = {"overall": {"accuracy": first["accuracy"], "questions": first["questions"]}, **first["by_kind"]}
    for kind, figures in kinds.items():
        text = f"accuracy {figures['accuracy']:.4f} on {figures['questions']} questions"
        if reference is not None:
            ref = reference["accuracy"] if kind == "overall" else (reference.get("by_kind") or {}).get(kind, {}).get("accuracy")
            if ref is not None:
                text += f"; baseline {ref:.4f}"
        cases.append(Case("eval.accuracy", kind, output=text))
    return cases


__all__ = ["GATES", "REPORT_VERSION", "baseline_comparison", "check_same_questions", "eval_cases", "fraction",
           "judge", "question_set", "read_baseline"]
