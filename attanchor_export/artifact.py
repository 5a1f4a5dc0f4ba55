"""Writing an artifact folder all-or-nothing: the exporter's checks and errors around
:func:`attanchor_runtime.atomic_folder.atomic_folder`.

Everything goes into a hidden sibling `.NAME.partial-XXXX` and is renamed to NAME only once it is
complete and validated, so an interrupted or failed export never leaves a folder that looks good.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from attanchor_runtime.atomic_folder import Staging, atomic_folder

from attanchor_export.errors import ExportError

__all__ = ["Staging", "check_target", "staging_folder"]


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


@contextmanager
def staging_folder(final, force: bool = False):
    """atomic_folder(final) once `final` may be written (check_target); a full disk is one ExportError."""
    final = Path(final).absolute()
    check_target(final, force)
    try:
        with atomic_folder(final) as staging:
            yield staging
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing {final}: free space and try again") from None
        raise
