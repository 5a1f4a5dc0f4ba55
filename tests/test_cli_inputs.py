"""eval and the CLI on bad input: unreadable rows skipped and named, JSONL encodings and fields one line
each with the line number, output paths checked before the work, one meaning of --json, help on every
option, and a mistyped verb answered with the verb."""

from __future__ import annotations

import gzip
import json

import click
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


@pytest.fixture
def questions(tmp_path):
    """Three JSONL rows with real images; write(path, rows) writes more."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        image = tmp_path / f"img{i}.png"
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
        rows.append({"image": image.name, "question": f"what is shown {i}?", "answer": "a"})
    return rows


def jsonl(path, rows, encoding="utf-8"):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


def test_eval_skips_an_unreadable_image_and_names_its_line(artifact, tmp_path, questions):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((1, 5000), np.uint8)).save(thin)
    rows = [questions[0], {"image": "broken.png", "question": "q?", "answer": "a"}, questions[1],
            {"image": "thin.png", "question": "q?", "answer": "a"}, questions[2]]
    data = jsonl(tmp_path / "q.jsonl", rows)
    result = run_cli("eval", artifact("clip-t2i"), "--data", data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["results"][0]["questions"] == 3
    assert [s["row"] for s in report["skipped"]] == [f"{data}:2", f"{data}:4"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: {data}:2: cannot decode image") and warnings[0].endswith("; skipped")
    assert f"{data}:4: image" in warnings[1] and "more elongated" in warnings[1]
    table = run_cli("eval", artifact("clip-t2i"), "--data", data)
    assert table.exit_code == 0 and "(2 unreadable skipped)" in table.stdout


@pytest.mark.parametrize("case", ["gzip", "latin-1", "null answer", "list question"])
def test_eval_jsonl_problems_are_one_line_with_the_line_number(artifact, tmp_path, questions, case):
    data = tmp_path / "q.jsonl"
    if case == "gzip":
        data.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in questions)))
        expected = f"error: {data} is gzip-compressed: decompress it first (gunzip -k q.jsonl)"
    elif case == "latin-1":
        rows = [*questions[:2], {**questions[2], "question": "qu'est-ce que c'est, ça?"}]
        jsonl(data, rows, encoding="latin-1")
        expected = f"error: {data}:3: not UTF-8 text (byte 0xe7 at column "
    elif case == "null answer":
        jsonl(data, [questions[0], {**questions[1], "answer": None}])
        expected = f'error: {data}:2: "answer" is null: expected a string'
    else:
        jsonl(data, [{**questions[0], "question": ["a", "b"]}])
        expected = f'error: {data}:1: "question" is ["a", "b"]: expected a string'
    result = run_cli("eval", artifact("clip-t2i"), "--data", data)
    assert result.exit_code == 1
    assert error_line(result).startswith(expected)


def test_eval_reads_a_utf8_bom_and_numbers_as_answers(artifact, tmp_path, questions):
    data = tmp_path / "q.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in [*questions[:2], {**questions[2], "answer": 3}])
    data.write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = run_cli("eval", artifact("clip-t2i"), "--data", data, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["questions"] == 3


@pytest.mark.parametrize("value, message", [(",,", "holds no number"), ("0.3,nan", "must be finite numbers"),
                                            ("0.3,x", "expected numbers separated by commas")])
def test_eval_thresholds_are_checked(artifact, tmp_path, questions, value, message):
    data = jsonl(tmp_path / "q.jsonl", questions)
    result = run_cli("eval", artifact("clip-t2i"), "--data", data, "--thresholds", value)
    assert result.exit_code == 2 and message in result.output and "internal error" not in result.output


@pytest.mark.parametrize("where", ["nodir/x.png", "."])
def test_run_checks_the_show_anchors_path_before_answering(artifact, tmp_path, questions, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("run", artifact("clip-t2i"), "--image", questions[0]["image"], "--prompt", "what?",
                     "--show-anchors", where)
    assert result.exit_code == 1 and result.stdout == ""  # refused before any answer was printed
    line = error_line(result)
    assert line.startswith(f"error: --show-anchors {where}") and "internal error" not in line


def test_bench_json_is_a_flag_and_json_out_a_path(artifact, tmp_path, monkeypatch):
    import attanchor_export.bench as bench

    real = bench.run_bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: real(*a, **{**k, "bandwidth_bytes": 16 << 20}))
    out = tmp_path / "bench.json"
    result = run_cli("bench", artifact("clip-t2i"), "--max-new-tokens", "2", "--repeats", "1", "--json",
                     "--json-out", out)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["schema"] == "attanchor-bench/1" and json.loads(out.read_text()) == printed
    missing = run_cli("bench", artifact("clip-t2i"), "--json-out", tmp_path / "no" / "b.json")
    assert missing.exit_code == 1 and "folder" in error_line(missing) and "does not exist" in error_line(missing)


@pytest.mark.parametrize("verb", ["export", "run", "check", "lint", "bench", "eval", "build", "demo"])
def test_every_option_has_help(verb):
    command = main.commands[verb]
    undocumented = [p.opts[0] for p in command.params
                    if isinstance(p, click.Option) and not p.help and p.opts[0] not in ("--help",)]
    assert undocumented == [], f"{verb}: {undocumented}"


@pytest.mark.parametrize("typo, verb", [("chek", "check"), ("evl", "eval"), ("rnu", "run"), ("bech", "bench")])
def test_a_mistyped_verb_is_answered_with_the_verb(tmp_path, monkeypatch, typo, verb):
    monkeypatch.chdir(tmp_path)
    result = run_cli(typo, "out/x")
    assert result.exit_code == 2
    assert error_line(result) == f"error: no command {typo!r} (did you mean {verb!r}?) and no model folder of that name"
    (tmp_path / typo).mkdir()  # a folder of that name is a model to export, as before
    assert "did you mean" not in run_cli(typo, "-o", tmp_path / "o", "--offline").output
