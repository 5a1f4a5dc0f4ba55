"""A folder written all-or-nothing: built in a hidden sibling, renamed into place only when complete.

    with atomic_folder(final) as staging:    # staging.path is final's sibling .NAME.partial-XXXX
        ... write into staging.path ...
        staging.fail()                      # or: keep it for inspection as NAME.failed instead
    # left without fail(): NAME is the complete folder (a previous NAME replaced only now);
    # left by an exception: nothing is left behind

Artifact folders (attanchor_export.artifact) and engine folders (attanchor_export.trt.build) are
written through it. Every name it makes while working starts with a dot, so a reader that skips
:func:`in_progress` names never picks up a partial or half-replaced folder; a NAME.failed folder is
complete but refused by whoever reads it (engine.json records its failed gate, for instance).
Kept in the runtime package because the runtime reads engine folders and must not import the
exporter; it raises plain OSErrors, which the exporter turns into its own one-line errors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FAILED_SUFFIX", "Staging", "atomic_folder", "failed_path", "in_progress", "replace_folder"]

FAILED_SUFFIX = ".failed"


def in_progress(path) -> bool:
    """A folder being written or replaced (.NAME.partial-XXXX, .NAME.old-PID): never read it."""
    return Path(path).name.startswith(".")


def failed_path(final: Path) -> Path:
    return final.with_name(final.name + FAILED_SUFFIX)


def replace_folder(src: Path, dst: Path) -> None:
    """Move src to dst, replacing a previous dst only after src is complete."""
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


class Staging:
    """The partial folder; `fail()` keeps it for inspection under NAME.failed instead of NAME."""

    def __init__(self, final: Path, tmp: Path):
        self.final, self.path, self.failed_path = final, tmp, None

    def fail(self) -> Path:
        failed = failed_path(self.final)
        if failed.exists():
            shutil.rmtree(failed)
        os.replace(self.path, failed)
        self.failed_path = failed
        return failed


@contextmanager
def atomic_folder(final) -> Iterator[Staging]:
    """Stage `final`'s contents beside it; rename into place on success (see the module docstring).
    The parent folder must exist."""
    final = Path(final).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
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
        replace_folder(tmp, final)
