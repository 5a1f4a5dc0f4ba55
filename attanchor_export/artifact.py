"""Writing an artifact folder all-or-nothing.

Everything goes into a hidden sibling `.NAME.partial-XXXX` and is renamed to NAME only once it is
complete and validated, so an interrupted or failed export never leaves a folder that looks good.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from attanchor_export.errors import ExportError


def check_target(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise ExportError(f"{final} already exists: pass --force to replace it")
    if final.exists() and not final.is_dir():
        raise ExportError(f"{final} exists and is not a folder")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create output folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"output folder {parent} is not writable")


def _replace(src: Path, dst: Path) -> None:
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
        failed = self.final.with_name(self.final.name + ".failed")
        if failed.exists():
            shutil.rmtree(failed)
        os.replace(self.path, failed)
        self.failed_path = failed
        return failed


@contextmanager
def staging_folder(final, force: bool = False):
    final = Path(final).absolute()
    check_target(final, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact is meant to be copied and shared
    staging = Staging(final, tmp)
    try:
        yield staging
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing {final}: free space and try again") from None
        raise
    except BaseException:
        if staging.failed_path is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if staging.failed_path is None:
        _replace(tmp, final)
