"""eval's regression gates and both verbs' JUnit XML, on a tiny random artifact and questions whose
expected answers are made from its own answers (so accuracy is known exactly: 1, or 2/3 after one is
changed). The same commands on the trained tiny-vqa, as docs/CI.md runs them: tests/test_ci_doc.py."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attanchor_export.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def answered(artifact, tmp_path_factory):
    """(artifact, questions.jsonl whose expected answers are the artifact's own, its eval report)."""
    folder = tmp_path_factory.mktemp("gates")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "question": f"what is shown {i}?", "answer": "?", "kind": f"k{i % 2}"})
    first = run_cli("eval", artifact("clip-t2i"), "--data", write_jsonl(folder / "probe.jsonl", rows), "--json")
    assert first.exit_code == 0, first.output
    answers = json.loads(first.stdout)["results"][0]["answers"]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    data = write_jsonl(folder / "q.jsonl", [{**r, "answer": a} for r, a in zip(rows, answers, strict=True)])
    result = run_cli("eval", artifact("clip-t2i"), "--data", data, "--json")
    assert result.exit_code == 0, result.output
    (folder / "report.json").write_text(result.stdout)
    return artifact("clip-t2i"), data, json.loads(result.stdout)


def test_the_report_carries_every_answer_and_its_questions(answered):
    _, data, report = answered
    first = report["results"][0]
    assert report["report_version"] == 1 and report["accuracy"] == first["accuracy"] == 1.0
    assert report["questions"]["count"] == 3 and len(report["questions"]["sha256"]) == 64
    assert report["split"] is None and report["data"] == str(data)  # a JSONL file has no splits
    assert first["by_kind"] == {"k0": {"accuracy": 1.0, "questions": 2}, "k1": {"accuracy": 1.0, "questions": 1}}


def test_a_committed_report_is_a_baseline_answer_by_answer(answered, tmp_path):
    artifact, data, report = answered
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(report))
    junit = tmp_path / "eval.xml"
    result = run_cli("eval", artifact, "--data", data, "--baseline", baseline, "--min-accuracy", "1",
                     "--max-drop", "0", "--min-agreement", "1", "--junit", junit, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["passed"] is True and [g["name"] for g in out["gates"]] == ["min_accuracy", "max_drop", "min_agreement"]
    assert out["results"][0]["baseline"]["same_answers"] == 1.0 and out["results"][0]["baseline"]["accuracy"] == 1.0
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "6" and suite.get("failures") == "0" and suite.get("errors") == "0"
    names = [(c.get("classname"), c.get("name")) for c in suite.iter("testcase")]
    assert names == [("eval.gates", "min-accuracy"), ("eval.gates", "max-drop"), ("eval.gates", "min-agreement"),
                     ("eval.accuracy", "overall"), ("eval.accuracy", "k0"), ("eval.accuracy", "k1")]
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["baseline"] == str(baseline) and props["precision"] == "fp32/none"


def test_each_gate_that_falls_short_is_named_on_one_line(answered, tmp_path):
    """The baseline says 1.0 and other answers; this run now scores 2/3 (one expected answer changed)."""
    artifact, data, report = answered
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    worse = write_jsonl(tmp_path / "q.jsonl", [rows[0], {**rows[1], "answer": rows[1]["answer"] + " not"}, rows[2]])
    for img in data.parent.glob("img*.png"):
        shutil.copy(img, tmp_path / img.name)
    base = run_cli("eval", artifact, "--data", worse, "--json")
    baseline = json.loads(base.stdout)
    baseline["results"][0]["accuracy"] = 1.0
    baseline["results"][0]["answers"][0] = "something else"
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    junit = tmp_path / "eval.xml"
    result = run_cli("eval", artifact, "--data", worse, "--baseline", tmp_path / "baseline.json", "--min-accuracy",
                     "0.9", "--max-drop", "0.01", "--min-agreement", "0.5", "--junit", junit, "--json")
    assert result.exit_code == 1
    assert error_line(result) == (
        "error: eval gate failed: accuracy 0.6667 < --min-accuracy 0.9; accuracy 0.6667 against the baseline's "
        "1.0000: a drop of 0.3333 > --max-drop 0.01")
    out = json.loads(result.stdout)  # the report is still written, with what passed and what did not
    assert out["passed"] is False and [g["passed"] for g in out["gates"]] == [False, False, True]
    assert out["results"][0]["baseline"]["same_answers"] == pytest.approx(2 / 3)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "2"
    failures = [c.find("failure").get("message") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failures == [g["message"] for g in out["gates"][:2]]
    # --min-agreement 0.9: 2 of 3 answers are the baseline's
    result = run_cli("eval", artifact, "--data", worse, "--baseline", tmp_path / "baseline.json", "--min-agreement", "0.9")
    assert error_line(result) == "error: eval gate failed: 66.67% of answers identical to the baseline's < --min-agreement 0.9"


def test_compare_dir_is_a_baseline_too(answered):
    artifact, data, _ = answered
    result = run_cli("eval", artifact, "--data", data, "--compare", artifact, "--max-drop", "0", "--min-agreement",
                     "1", "--json")
    assert result.exit_code == 0, result.output
    gates = json.loads(result.stdout)["gates"]
    assert [(g["name"], g["value"]) for g in gates] == [("max_drop", 0.0), ("min_agreement", 1.0)]


@pytest.mark.parametrize("args, message", [
    (["--min-accuracy", "90"], "error: --min-accuracy 90: expected a fraction between 0 and 1 (a fraction: 0.9 for 90%)"),
    (["--min-accuracy", "-0.1"], "error: --min-accuracy -0.1: expected a fraction between 0 and 1"),
    (["--max-drop", "nan"], "error: --max-drop nan: expected a fraction between 0 and 1"),
    (["--min-agreement", "most"], "error: --min-agreement most: expected a fraction between 0 and 1, e.g. 0.90"),
    (["--max-drop", "0.01"], "error: --max-drop needs a baseline: --baseline REPORT.json or --compare DIR"),
    (["--min-agreement", "0.99"], "error: --min-agreement needs a baseline: --baseline REPORT.json or --compare DIR"),
    (["--baseline", "b.json", "--compare", "."], "error: --baseline and --compare are both baselines: give one"),
])
def test_bad_gate_values_are_one_line(answered, args, message):
    artifact, data, _ = answered
    result = run_cli("eval", artifact, "--data", data, *args)
    assert result.exit_code == 2 and error_line(result) == message


def _baseline_error(artifact, data, baseline, *extra) -> str:
    result = run_cli("eval", artifact, "--data", data, "--baseline", baseline, *extra)
    assert result.exit_code == 1 and "answers" not in result.stdout
    return error_line(result)


def test_a_baseline_that_cannot_be_compared_is_refused_before_answering(answered, tmp_path, monkeypatch):
    import attanchor_export.checks.task_accuracy as task_accuracy

    artifact, data, report = answered
    monkeypatch.setattr(task_accuracy, "answer_items", lambda *a, **k: pytest.fail("answered before refusing"))
    missing = tmp_path / "missing.json"
    assert _baseline_error(artifact, data, missing).startswith(f"error: --baseline {missing}: no such file")
    (tmp_path / "text.json").write_text("accuracy: 0.9\n")
    assert _baseline_error(artifact, data, tmp_path / "text.json").startswith(
        f"error: --baseline {tmp_path / 'text.json'}: not a JSON report (JSONDecodeError")
    old = {k: v for k, v in report.items() if k != "report_version"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert _baseline_error(artifact, data, tmp_path / "old.json") == (
        f"error: --baseline {tmp_path / 'old.json'}: has no per-question answers (report version None, expected 1): "
        "write it again with eval --json")
    # The same file name with other questions (two of the three rows)
    rows = data.read_text().splitlines()
    fewer = tmp_path / "q.jsonl"
    fewer.write_text("\n".join(rows[:2]) + "\n")
    for img in data.parent.glob("img*.png"):
        shutil.copy(img, tmp_path / img.name)
    (tmp_path / "base.json").write_text(json.dumps(report))
    assert _baseline_error(artifact, fewer, tmp_path / "base.json") == (
        f"error: --baseline {tmp_path / 'base.json'} was measured on other questions (3 of {data}) than this run "
        f"(2 of {fewer}): use the --data, --split and --limit it was made with")


def test_a_baseline_of_another_split_is_refused(answered, tmp_path):
    artifact, _, _ = answered
    test = run_cli("eval", artifact, "--data", "easy-vqa", "--limit", "2", "--json")
    assert test.exit_code == 0, test.output
    assert json.loads(test.stdout)["split"] == "test"
    (tmp_path / "test.json").write_text(test.stdout)
    line = _baseline_error(artifact, "easy-vqa", tmp_path / "test.json", "--split", "validation", "--limit", "2")
    assert line == (f"error: --baseline {tmp_path / 'test.json'} was measured on easy-vqa split test, this run "
                    "answers easy-vqa split validation")


def test_check_writes_one_junit_case_per_check(artifact, tmp_path):
    junit = tmp_path / "check.xml"
    result = run_cli("check", artifact("clip-t2i"), "--json", "--junit", junit)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["checks"]
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = list(suite.iter("testcase"))
    assert suite.get("name") == "attanchor-export check" and suite.get("tests") == str(len(rows)) == str(len(cases))
    assert suite.get("failures") == "0" and {c.get("classname") for c in cases} >= {
        "check.vision", "check.embedding", "check.decoder", "check.end-to-end"}
    assert [c.get("name") for c in cases] == [f"{r['case']}: {r['metric']}" for r in rows]


def test_a_check_that_cannot_run_leaves_an_error_case(artifact, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(artifact("clip-t2i"), folder)
    with open(folder / "decoder.onnx", "r+b") as f:  # same size, other bytes: only sha256 sees it
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    junit = tmp_path / "check.xml"
    result = run_cli("check", folder, "--junit", junit)
    assert result.exit_code == 1
    line = error_line(result)
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    assert case.find("error").get("message") == line.removeprefix("error: ") and "sha256" in line


def test_junit_failure_rows():
    from attanchor_export.checks.junit import check_cases

    rows = [{"graph": "decoder", "case": "batch1 prefill", "metric": "logits_max_abs_diff", "value": 3e-4,
             "limit": 1.2e-4, "passed": False},
            {"graph": "accuracy-gate", "case": "int4 decoder.onnx (ort)", "metric": "cos_mean (>= 0.9)",
             "value": 0.95, "limit": 0.9, "passed": True, "higher_is_better": True}]
    failed, passed = check_cases(rows)
    assert failed.failure == "decoder batch1 prefill: logits_max_abs_diff = 0.0003 (limit <= 0.00012)"
    assert passed.failure is None and passed.output == "cos_mean (>= 0.9) = 0.95 (limit >= 0.9)"
