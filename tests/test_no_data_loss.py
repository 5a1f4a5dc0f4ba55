"""Nothing of the user's is ever deleted: what --force and the demo may replace, what a killed export
leaves and who removes it, and two writers replacing the same folder at once. Every destructive case
runs on throwaway folders under pytest's tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from attanchor_runtime.atomic_folder import atomic_folder, in_progress, replace_folder
from click.testing import CliRunner

from attanchor_export.artifact import staging_folder
from attanchor_export.cli import main
from attanchor_export.errors import ExportError

HOST = socket.gethostname()


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its content (binary files as a sha256)."""
    import hashlib

    def content(p: Path) -> str:
        data = p.read_bytes()
        try:
            return data.decode()
        except UnicodeDecodeError:
            return hashlib.sha256(data).hexdigest()

    return {p.relative_to(folder).as_posix(): content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- what --force may replace ----------------------------------------------------------------------------
def test_force_refuses_a_folder_that_is_not_an_artifact(checkpoint, tmp_path):
    out = tmp_path / "mine"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')")
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--force")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "--force replaces only a folder holding this tool's artifact" in line and str(out) in line
    assert tree(out) == {"src/main.py": "print('mine')"}


@pytest.mark.parametrize("where", ["cwd", "checkpoint", "checkpoint_parent"])
def test_force_never_replaces_the_checkpoint_or_the_current_directory(checkpoint, tmp_path, monkeypatch, where):
    """`cd proj && attanchor-export ./ck -o . --force`, `-o` = the checkpoint, `-o` = its parent: refused
    in one line before anything loads, every file still there."""
    proj = tmp_path / "proj"
    shutil.copytree(checkpoint("clip-llama"), proj / "ck")
    (proj / "src").mkdir()
    (proj / "src" / "train.py").write_text("x = 1")
    before = tree(proj)
    if where == "cwd":
        monkeypatch.chdir(proj)
        result = run_cli("./ck", "-o", ".", "--force")
        expected = "is the current directory"
    elif where == "checkpoint":
        monkeypatch.chdir(tmp_path)
        result = run_cli(proj / "ck", "-o", proj / "ck", "--force")
        expected = "is the source checkpoint"
    else:
        monkeypatch.chdir(tmp_path)
        result = run_cli(proj / "ck", "-o", proj, "--force")
        expected = "contains the source checkpoint"
    assert result.exit_code == 1
    assert expected in one_error_line(result)
    assert tree(proj) == before


def test_force_replaces_an_earlier_artifact_or_an_empty_folder_only(artifact, tmp_path):
    earlier = tmp_path / "earlier"
    shutil.copytree(artifact("clip-t2i"), earlier)
    (earlier / "engines" / "x-sm87-trt10").mkdir(parents=True)  # built engines belong to the artifact
    with staging_folder(earlier, force=True) as staging:
        (staging.path / "new.txt").write_text("new")
    assert tree(earlier) == {"new.txt": "new"}

    empty = tmp_path / "empty"
    empty.mkdir()
    with staging_folder(empty, force=True) as staging:
        (staging.path / "new.txt").write_text("new")
    assert tree(empty) == {"new.txt": "new"}

    extra = tmp_path / "extra"
    shutil.copytree(artifact("clip-t2i"), extra)
    (extra / "notes.txt").write_text("my notes")
    with pytest.raises(ExportError, match="notes.txt is not part of the artifact"), staging_folder(extra, force=True):
        pass
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ExportError, match="not written by this tool"), staging_folder(foreign, force=True):
        pass
    assert (extra / "notes.txt").read_text() == "my notes" and (foreign / "manifest.json").is_file()


def test_a_users_folder_under_the_failed_name_is_refused_up_front(tmp_path):
    (tmp_path / "out.failed").mkdir()
    (tmp_path / "out.failed" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"out.failed exists and is not an earlier failed export"):
        with staging_folder(tmp_path / "out"):
            pass
    assert (tmp_path / "out.failed" / "keep.txt").read_text() == "mine"


# ---- the demo replaces only what it wrote ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo.png", "anchors.png", "artifact"])
def test_demo_never_overwrites_the_users_files(tmp_path, name):
    out = tmp_path / "demo"
    out.mkdir()
    if name == "artifact":
        (out / "artifact").mkdir()
        (out / "artifact" / "model.py").write_text("mine")
    else:
        (out / name).write_text("mine")
    before = tree(out)
    result = run_cli("demo", "-o", out)
    assert result.exit_code == 1
    assert "was not written by the demo" in one_error_line(result)
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == [name]


# ---- what a killed export leaves, and who removes it ----------------------------------------------------
def test_staging_records_its_owner_and_stale_ones_are_removed(tmp_path):
    final = tmp_path / "out"
    gone = dead_pid()
    stale = [tmp_path / f".out.partial-{gone}@{HOST}-abc123", tmp_path / f".out.old-{gone}@{HOST}"]
    kept = [tmp_path / f".out.partial-{os.getpid()}@{HOST}-live12",  # a running export (this process)
            tmp_path / f".out.partial-{gone}@another-host-x1y2z3",  # another machine's: not ours to judge
            tmp_path / ".out.partial-k3l4m5",  # an older version's, without an owner
            tmp_path / f".other.partial-{gone}@{HOST}-abc123"]  # another output's
    for folder in stale + kept:
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x" * 1000)
    with atomic_folder(final) as staging:
        assert staging.path.name.startswith(f".out.partial-{os.getpid()}@{HOST}-") and in_progress(staging.path)
        (staging.path / "a.txt").write_text("a")
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in kept)
    assert tree(final) == {"a.txt": "a"}


def test_an_old_folder_that_could_not_be_removed_is_removed_by_the_next_writer(tmp_path):
    """replace_folder's `.NAME.old-PID@HOST` leaks when the old output cannot be deleted (here its owner
    fails to); once that process is gone, the next write to the same place removes it."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "new.txt").write_text("new")
    code = textwrap.dedent("""
        import shutil, sys
        from pathlib import Path
        from attanchor_runtime import atomic_folder
        atomic_folder.shutil.rmtree = lambda *a, **k: None  # the old folder cannot be removed
        atomic_folder.replace_folder(Path(sys.argv[1]), Path(sys.argv[2]))
    """)
    from attanchor_export.artifact import remove_stale_staging

    subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(final)], check=True)
    leaked = list(tmp_path.glob(".out.old-*"))
    assert len(leaked) == 1 and (leaked[0] / "old.txt").read_text() == "old"
    assert remove_stale_staging(final) == leaked and not leaked[0].exists()
    assert tree(final) == {"new.txt": "new"}


def test_free_disk_error_names_unfinished_exports(checkpoint, tmp_path, monkeypatch):
    import attanchor_export.exporter as exporter

    running = tmp_path / f".out.partial-{os.getpid()}@{HOST}-live12"
    stale = tmp_path / f".out.partial-{dead_pid()}@{HOST}-dead12"
    for folder in (running, stale):
        folder.mkdir()
        (folder / "decoder.onnx.data").write_bytes(b"\0" * (3 << 20))
    monkeypatch.setattr(exporter, "free_disk_bytes", lambda folder: 1 << 10)
    result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "out")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "not enough free disk" in line and f"{running} (3.0 MiB)" in line
    assert not stale.exists() and str(stale) not in line  # its export is gone: removed, not named


# ---- two writers replacing the same folder at once -----------------------------------------------------
RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from attanchor_runtime import atomic_folder
    dst, src, sync, role = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    real_replace = os.replace
    def replace_then_wait(a, b):
        real_replace(a, b)
        if Path(b).name.startswith(f".{dst.name}.old-"):  # the old folder is aside, the new not yet in
            (sync / "a-in-window").touch()
            deadline = time.time() + 10
            while time.time() < deadline and not (sync / "b-started").exists():
                time.sleep(0.01)
            time.sleep(0.5)  # B's chance to rename into the gap
    if role == "A":
        atomic_folder.os.replace = replace_then_wait
    else:
        deadline = time.time() + 60
        while time.time() < deadline and not (sync / "a-in-window").exists():
            time.sleep(0.01)
        (sync / "b-started").touch()
    atomic_folder.replace_folder(src, dst)
""")


def test_two_writers_replacing_at_once_both_finish(tmp_path):
    """Exporter A has moved the old folder aside and not yet renamed its own in when exporter B
    finishes: without a lock B renames into the gap and A then fails with ENOTEMPTY."""
    dst, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    dst.mkdir()
    (dst / "who.txt").write_text("old")
    for role in "AB":
        (tmp_path / f"src{role}").mkdir()
        (tmp_path / f"src{role}" / "who.txt").write_text(role)
    procs = {role: subprocess.Popen([sys.executable, "-c", RACER, str(dst), str(tmp_path / f"src{role}"),
                                     str(sync), role], stderr=subprocess.PIPE, text=True) for role in "AB"}
    errors = {role: p.communicate(timeout=120)[1] for role, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), errors
    assert tree(dst) in ({"who.txt": "A"}, {"who.txt": "B"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sync"]  # no source, no .out.old-* left


def test_replace_refuses_a_target_that_appeared_meanwhile(tmp_path):
    """Checked up front and again at the rename: a folder that appeared while an export ran is kept."""
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="appeared"):
        replace_folder(tmp_path / "src", tmp_path / "out", may_replace=lambda existing: False)
    assert tree(tmp_path / "out") == {"mine.txt": "mine"} and (tmp_path / "src").is_dir()
