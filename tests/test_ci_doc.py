"""docs/CI.md's workflow, run as written: its steps' shell commands with this run's session exports
standing in for `out/model` (nothing is exported again): the eval step on the trained tiny-vqa with a
small ci/questions.jsonl of easy-vqa questions and a baseline made with the command the doc gives; the
parity step on the tiny random artifact (the same command; on tiny-vqa it costs minutes of PyTorch
parity that the export tests already spend). The export step's options are parsed by the CLI, not run;
the install step is not run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml  # PyYAML: installed with the [export] extra (transformers and huggingface_hub require it)

DOC = Path(__file__).parents[1] / "docs" / "CI.md"
QUESTIONS = 20


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def workflow_steps() -> list[dict]:
    (workflow,) = blocks("yaml")
    doc = yaml.safe_load(workflow)
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert "pull_request" in triggers and "push" in triggers
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest" and {"MODEL", "REVISION"} <= set(job["env"])
    return job["steps"]


def test_the_workflow_caches_the_model_and_uploads_the_reports():
    steps = workflow_steps()
    uses = {s["uses"].split("@")[0]: s for s in steps if "uses" in s}
    cache = uses["actions/cache"]["with"]
    assert cache["path"] == "~/.cache/huggingface/hub"  # where huggingface_hub keeps models (HF_HUB_CACHE)
    assert "env.MODEL" in cache["key"] and "env.REVISION" in cache["key"]
    upload = uses["actions/upload-artifact"]
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/"
    runs = " ".join(s.get("run", "") for s in steps)
    assert "--baseline ci/baseline.json" in runs and "--junit reports/check.xml" in runs
    assert "--junit reports/eval.xml" in runs and "torch==2.13.0" in runs


def test_the_export_step_parses():
    """The export line's options exist and take the values given (click parses them; nothing runs)."""
    from attanchor_export.cli import main

    (export,) = [s["run"] for s in workflow_steps() if s.get("run", "").startswith('attanchor-export "$MODEL"')]
    args = shlex.split(export.replace('"$MODEL"', "org/model").replace('"$REVISION"', "main"))[1:]
    command = main.get_command(None, "export")
    with command.make_context("export", args) as ctx:
        assert ctx.params["quant"] == "int4" and ctx.params["revision"] == "main"
        assert str(ctx.params["output"]) == "out/model"


def _run(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """A `run:` script as Actions runs it (bash -e -o pipefail), with this interpreter's attanchor-export first on PATH."""
    env = {**os.environ, "MODEL": "org/model", "REVISION": "main",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def job(tiny_vqa_fp32, tmp_path_factory):
    """A checkout: out/model (the session's tiny-vqa fp32 export), ci/questions.jsonl and ci/baseline.json
    made with the doc's own command."""
    from attanchor_export.load.datasets import load_task

    root = tmp_path_factory.mktemp("ci-job")
    (root / "out").mkdir()
    (root / "out" / "model").symlink_to(tiny_vqa_fp32, target_is_directory=True)
    (root / "ci" / "images").mkdir(parents=True)
    rows = []
    for it in load_task("easy-vqa", limit=QUESTIONS):  # images beside the file, as the doc lays them out
        shutil.copy(it.image, root / "ci" / "images" / Path(it.image).name)
        rows.append({"image": f"images/{Path(it.image).name}", "question": it.question, "answer": it.answer,
                     "kind": it.kind})
    (root / "ci" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (make_baseline,) = [line for b in blocks("bash") for line in b.splitlines() if "> ci/baseline.json" in line]
    made = _run(make_baseline, root)
    assert made.returncode == 0, made.stderr
    return root


def _step(name: str) -> str:
    (run,) = [s["run"] for s in workflow_steps() if s.get("name") == name]
    return run


def test_the_workflow_runs_these_steps():
    steps = [s["name"] for s in workflow_steps() if "run" in s and "pip install" not in s["run"]
             and not s["run"].startswith('attanchor-export "$MODEL"')]
    assert steps == ["Parity against PyTorch", "Accuracy against the committed baseline"]


def test_the_parity_step_passes(artifact, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model").symlink_to(artifact("clip-t2i"), target_is_directory=True)
    done = _run(_step("Parity against PyTorch"), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    check = ET.parse(tmp_path / "reports" / "check.xml").getroot().find("testsuite")
    checks = json.loads((tmp_path / "reports" / "check.json").read_text())["checks"]
    assert int(check.get("tests")) == len(checks) > 0 and check.get("failures") == "0" and check.get("errors") == "0"
    assert any(c["graph"] == "end-to-end" for c in checks)


def test_the_eval_step_passes_on_tiny_vqa(job):
    (job / "reports").mkdir()  # the parity step before it makes the folder
    done = _run(_step("Accuracy against the committed baseline"), job)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((job / "reports" / "eval.json").read_text())
    assert report["passed"] is True and report["questions"]["count"] == QUESTIONS
    assert [g["name"] for g in report["gates"]] == ["min_accuracy", "max_drop", "min_agreement"]
    assert report["accuracy"] >= 0.9 and report["results"][0]["baseline"]["same_answers"] == 1.0
    cases = [c.get("name") for c in ET.parse(job / "reports" / "eval.xml").getroot().iter("testcase")]
    assert cases[:4] == ["min-accuracy", "max-drop", "min-agreement", "overall"] and len(cases) > 4


def test_the_eval_step_fails_on_a_baseline_that_answered_otherwise(job):
    """The same step against a baseline whose answers differ on two questions of twenty: 90% agreement
    is under the doc's 0.99, so the step exits non-zero, says so in one line, and JUnit has the failure."""
    step = _step("Accuracy against the committed baseline")
    baseline = json.loads((job / "ci" / "baseline.json").read_text())
    answers = baseline["results"][0]["answers"]
    answers[0], answers[1] = answers[0] + " not", answers[1] + " not"
    other = job / "other"
    (other / "ci").mkdir(parents=True)
    (other / "out").symlink_to(job / "out", target_is_directory=True)
    shutil.copytree(job / "ci" / "images", other / "ci" / "images")
    (other / "ci" / "questions.jsonl").write_text((job / "ci" / "questions.jsonl").read_text())
    (other / "ci" / "baseline.json").write_text(json.dumps(baseline))
    (other / "reports").mkdir()
    done = _run(step, other)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: eval gate failed: 90.00% of answers identical to the baseline's < --min-agreement 0.99")
    suite = ET.parse(other / "reports" / "eval.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1"
    assert json.loads((other / "reports" / "eval.json").read_text())["passed"] is False
