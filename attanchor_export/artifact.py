"""Writing an artifact folder all-or-nothing: the exporter's checks and errors around
:func:`attanchor_runtime.atomic_folder.atomic_folder`.

Everything goes into a hidden sibling `.NAME.partial-PID@HOST-XXXX` and is renamed to NAME only once
it is complete and validated, so an interrupted or failed export never leaves a folder that looks good.

What `--force` may replace (`foreign_file` says why not): an empty folder, or a folder that holds this tool's
artifact and nothing else (a manifest.json it wrote, the files that manifest lists, engines/). Never a
folder that is or contains the source checkpoint, the adapter or the current directory (`protected`).
An earlier NAME.failed is replaced by the next failed export under the same rules.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from attanchor_runtime.atomic_folder import (
    Staging,
    TargetAppeared,
    atomic_folder,
    failed_path,
    remove_stale,
)

from attanchor_export.errors import ExportError

__all__ = ["Staging", "check_target", "foreign_file", "remove_stale_staging", "staging_folder", "staging_leftovers"]

MANIFEST = "manifest.json"
ENGINES = "engines"


def foreign_file(folder: Path) -> str | None:
    """Why `folder` is not (only) this tool's artifact, or None when --force may replace it."""
    folder = Path(folder)
    entries = list(folder.iterdir())
    if not entries:
        return None  # an empty folder holds nothing to lose
    from attanchor_runtime.errors import ArtifactError
    from attanchor_runtime.manifest import listed_files

    try:
        listed = listed_files(folder)
    except ArtifactError:
        return "its manifest.json was not written by this tool"
    if listed is None:
        return "it holds no manifest.json of this tool"
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() or rel == MANIFEST or rel == ENGINES or rel.startswith(ENGINES + "/") or rel in listed:
            continue
        return f"{rel} is not part of the artifact"
    return None


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def check_target(final: Path, force: bool, protected: Iterable[tuple[str, Path]] = (),
                 foreign: Callable[[Path], str | None] = foreign_file) -> None:
    """Refuse, in one line, an output that may not be written: it exists without --force, it is not a
    folder of this tool (with --force; `foreign` says why not), it is or holds one of the `protected`
    (what, path) pairs or the current directory."""
    final = Path(final).absolute()
    guarded = [("the current directory", Path.cwd()), *((what, Path(p)) for what, p in protected if p)]
    for what, path in guarded:
        if _contains(final, path):
            where = "is" if final.resolve() == path.resolve() else "contains"
            raise ExportError(f"the output {final} {where} {what} ({path}): choose another -o")
    if final.exists() and not final.is_dir():
        raise ExportError(f"{final} exists and is not a folder")
    if final.exists() and not force:
        raise ExportError(f"{final} already exists: pass --force to replace it")
    if final.exists():
        why = foreign(final)
        if why:
            raise ExportError(f"--force replaces only a folder holding this tool's artifact and nothing else: "
                              f"{final} is not one ({why}); choose another -o or move it away")
    failed = failed_path(final)
    if failed.exists():
        why = foreign(failed) if failed.is_dir() else "it is not a folder"
        if why:
            raise ExportError(f"{failed} exists and is not an earlier failed export ({why}): a failed export "
                              "would be kept under that name; move it away")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create output folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"output folder {parent} is not writable")


def remove_stale_staging(final) -> list[Path]:
    """Remove the staging / half-replaced folders of `final` that killed exports left (owner gone)."""
    final = Path(final).absolute()
    return remove_stale(final) if final.parent.is_dir() else []


def staging_leftovers(parent: Path) -> list[tuple[Path, int]]:
    """(folder, bytes) of every hidden .NAME.partial-* / .NAME.old-* folder in `parent`, largest first."""
    found = []
    for pattern in (".*.partial-*", ".*.old-*"):
        for path in Path(parent).glob(pattern):
            if path.is_dir():
                found.append((path, sum(f.stat().st_size for f in path.rglob("*") if f.is_file())))
    return sorted(found, key=lambda item: -item[1])


@contextmanager
def staging_folder(final, force: bool = False, protected: Iterable[tuple[str, Path]] = (),
                   foreign: Callable[[Path], str | None] = foreign_file):
    """atomic_folder(final) once `final` may be written (check_target); a full disk is one ExportError."""
    final = Path(final).absolute()
    check_target(final, force, protected, foreign)
    try:
        with atomic_folder(final, may_replace=lambda existing: force and foreign(existing) is None) as staging:
            yield staging
    except TargetAppeared as e:
        raise ExportError(f"{e}: nothing was replaced; export again with another -o") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing {final}: free space and try again") from None
        raise
