"""JSONL files of image + text records (`--data` questions, `--calib` prompts), read one way.

Each non-empty line is a JSON object holding an "image" path (relative paths are relative to the
file) and the string fields the caller names. The file is UTF-8 text (a leading byte-order mark is
skipped); a gzip-compressed file, a line that is not UTF-8 and every other bad line fail with one
line naming file:line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from attanchor_export.errors import ExportError


def read_image_jsonl(path: Path, fields: tuple[str, ...], what: str, strings: bool = True
                     ) -> Iterator[tuple[int, Path, dict]]:
    """Yields (line number, existing image path, record) for each record; `what` prefixes messages.
    strings: the fields must be JSON strings too (else only "image" must be; callers convert the rest)."""
    wanted = ", ".join(f'"{f}"' for f in ("image", *fields))
    for lineno, line in _text_lines(Path(path), what):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            values = [record[f] for f in ("image", *fields)]
        except (ValueError, KeyError, TypeError):
            raise ExportError(f"{what}{path}:{lineno}: expected a JSON object with {wanted}") from None
        checked = values if strings else values[:1]
        if not all(isinstance(v, str) for v in checked):
            names = wanted if strings else '"image"'
            raise ExportError(f"{what}{path}:{lineno}: {names} must be strings")
        image = Path(values[0]).expanduser()
        if not image.is_absolute():
            image = Path(path).parent / image
        if not image.is_file():
            raise ExportError(f"{what}{path}:{lineno}: image {image} does not exist")
        yield lineno, image, record


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, BOM skipped; gzip and non-UTF-8 bytes are one-line errors."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ExportError(f"{what}{path}: cannot read it: {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        raise ExportError(f"{what}{path} is gzip-compressed: decompress it first (gunzip -k {path.name})")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            yield lineno, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ExportError(f"{what}{path}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                              f"{e.start + 1}): save the file as UTF-8") from None
