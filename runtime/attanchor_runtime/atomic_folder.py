"""A folder written all-or-nothing: built in a hidden sibling, renamed into place only when complete.

    with atomic_folder(final) as staging:    # staging.path is final's sibling .NAME.partial-PID@HOST-XXXX
        ... write into staging.path ...
        staging.fail()                      # or: keep it for inspection as NAME.failed instead
    # left without fail(): NAME is the complete folder (a previous NAME replaced only now);
    # left by an exception: nothing is left behind

Artifact folders (attanchor_export.artifact) and engine folders (attanchor_export.trt.build) are
written through it. Every name it makes while working starts with a dot, so a reader that skips
:func:`in_progress` names never picks up a partial or half-replaced folder; a NAME.failed folder is
complete but refused by whoever reads it (engine.json records its failed gate, for instance).

What a kill leaves, and who removes it: the staging folder's name records its owner (process id and
host), as does the `.NAME.old-PID@HOST` name a replaced folder has while it is deleted. SIGKILL (or a
power cut) leaves them behind; the next atomic_folder for the same NAME removes those whose owner
process is gone from this host (`remove_stale`), and `leftovers` lists the ones that remain. Renames
into NAME and NAME.failed hold an exclusive lock on NAME's parent folder (`folder_lock`), so two
writers finishing at once replace one after the other instead of failing half-way (ENOTEMPTY).
Kept in the runtime package because the runtime reads engine folders and must not import the
exporter; it raises plain OSErrors, which the exporter turns into its own one-line errors.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the runtime's targets, Linux and Jetson, all have it)
    fcntl = None

__all__ = ["FAILED_SUFFIX", "Staging", "TargetAppeared", "atomic_folder", "failed_path", "folder_lock", "in_progress", "leftovers",
           "remove_stale", "replace_folder"]

FAILED_SUFFIX = ".failed"
PARTIAL, OLD = "partial", "old"


class TargetAppeared(FileExistsError):
    """The target exists at the rename and may not be replaced (another writer made it meanwhile)."""


def in_progress(path) -> bool:
    """A folder being written or replaced (.NAME.partial-..., .NAME.old-...): never read it."""
    return Path(path).name.startswith(".")


def failed_path(final: Path) -> Path:
    return final.with_name(final.name + FAILED_SUFFIX)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _parse_owner(tag: str, kind: str) -> tuple[int, str] | None:
    """"PID@HOST" (old) or "PID@HOST-RANDOM" (partial) -> (pid, host); None for names without an owner."""
    pid, sep, host = tag.partition("@")
    if kind == PARTIAL:
        host = host.rpartition("-")[0]
    return (int(pid), host) if sep and pid.isdigit() and host else None


def _owner_gone(tag: str, kind: str) -> bool:
    """True only when the recorded owner is a process of this host that no longer runs."""
    owner = _parse_owner(tag, kind)
    if owner is None:
        return False  # written by an older version, without an owner: never guessed at
    pid, host = owner
    if host != socket.gethostname():
        return False  # another machine's (a shared file system): not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _siblings(final: Path) -> list[tuple[Path, str, str]]:
    """(path, kind, owner tag) of every .NAME.partial-* and .NAME.old-* folder beside `final`."""
    out = []
    for kind in (PARTIAL, OLD):
        prefix = f".{final.name}.{kind}-"
        if final.parent.is_dir():
            out += [(p, kind, p.name[len(prefix):]) for p in final.parent.glob(f"{_glob_escape(prefix)}*")
                    if p.is_dir()]
    return sorted(out)


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def leftovers(final: Path) -> list[Path]:
    """Staging and half-replaced folders of `final` that are still on disk (their owner may be alive)."""
    return [p for p, _, _ in _siblings(Path(final).absolute())]


def remove_stale(final: Path) -> list[Path]:
    """Delete `final`'s staging and replaced folders whose owner process is gone; returns what was removed.
    No lock needed: a folder whose owner is gone is touched by no one else (two cleaners both ignore errors)."""
    removed = []
    for path, kind, tag in _siblings(Path(final).absolute()):
        if _owner_gone(tag, kind):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


@contextmanager
def folder_lock(final: Path) -> Iterator[None]:
    """Exclusive lock for renames beside `final`: flock on its parent folder itself, so nothing is left
    behind; where the file system refuses that (some network mounts), on a hidden `.NAME.lock` file
    beside it instead, which then stays (removing a lock file races with its next user)."""
    final = Path(final).absolute()
    if fcntl is None:
        yield
        return
    handle = os.open(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        os.close(handle)
        handle = os.open(final.with_name(f".{final.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(handle)  # closing the last descriptor releases the lock


def replace_folder(src: Path, dst: Path, may_replace: Callable[[Path], bool] | None = None) -> None:
    """Move src to dst, replacing a previous dst only after src is complete (under dst's lock).

    may_replace(dst) is asked again under the lock, for a dst that appeared while src was being
    written: False raises TargetAppeared and leaves both as they are."""
    dst = Path(dst).absolute()
    with folder_lock(dst):
        if not dst.exists():
            os.replace(src, dst)
            return
        if may_replace is not None and not may_replace(dst):
            raise TargetAppeared(f"{dst} appeared while this one was written and may not be replaced")
        trash = dst.with_name(f".{dst.name}.{OLD}-{_owner()}")
        os.replace(dst, trash)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(trash, dst)  # the old folder goes back: never neither
            raise
        # A folder that cannot be removed now stays hidden under its owner's name: the next writer of
        # dst removes it once this process is gone (remove_stale).
        shutil.rmtree(trash, ignore_errors=True)


class Staging:
    """The partial folder; `fail()` keeps it for inspection under NAME.failed instead of NAME."""

    def __init__(self, final: Path, tmp: Path):
        self.final, self.path, self.failed_path = final, tmp, None

    def fail(self) -> Path:
        failed = failed_path(self.final)
        replace_folder(self.path, failed)
        self.failed_path = failed
        return failed


@contextmanager
def atomic_folder(final, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Staging]:
    """Stage `final`'s contents beside it; rename into place on success (see the module docstring).
    The parent folder must exist. may_replace: asked for an existing `final` at the rename (see
    replace_folder); the caller checks its own rules up front too, before any work is done."""
    final = Path(final).absolute()
    remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{PARTIAL}-{_owner()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; artifacts are meant to be copied and shared
    staging = Staging(final, tmp)
    try:
        yield staging
    except BaseException:
        if staging.failed_path is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if staging.failed_path is None:
        try:
            replace_folder(tmp, final, may_replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
