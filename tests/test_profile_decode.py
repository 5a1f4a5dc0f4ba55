"""scripts/profile_decode.py: the per-op-type split of a decode step adds up."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from helpers import load_script


def _script():
    return load_script("profile_decode")


def test_profile_splits_prefill_and_decode_steps(artifact, tmp_path, capsys):
    out = tmp_path / "profile.json"
    before = set(Path(tempfile.gettempdir()).glob("attanchor-profile-*"))
    assert _script().main([str(artifact("clip-t2i")), "--prompt-len", "12", "--steps", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    step, prefill = report["decode_step"], report["prefill"]
    assert report["decode_runs"] == 3
    assert set(Path(tempfile.gettempdir()).glob("attanchor-profile-*")) == before  # its trace folder is removed
    for part in (step, prefill):
        assert 0 < part["kernel_ms"] <= part["wall_ms"]
        assert abs(sum(op["ms"] for op in part["ops"].values()) - part["kernel_ms"]) < 1e-6 * part["kernel_ms"] + 1e-9
        assert part["nodes"] == sum(op["nodes"] for op in part["ops"].values())
    # the same graph runs every call: a decode step runs as many nodes as the prefill
    assert step["nodes"] == prefill["nodes"] and "MatMul" in step["ops"]
    text = capsys.readouterr().out
    assert text.startswith("prefill (12 tokens)") and "decode step (mean of 3" in text
    assert report["levers"] == "all"
    args = [str(artifact("clip-t2i")), "--prompt-len", "12", "--steps", "2", "--levers", "none", "--json", str(out)]
    assert _script().main(args) == 0 and json.loads(out.read_text())["levers"] == "none"


def test_not_an_artifact_is_one_line(tmp_path, capsys):
    assert _script().main([str(tmp_path), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json" in err and err.count("\n") == 1
