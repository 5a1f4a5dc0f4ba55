"""JSONL files of image + text records (`--data` questions, `--calib` prompts), read one way.

Each non-empty line is a JSON object holding an "image" path (relative paths are relative to the
file) and the string fields the caller names. Bad lines fail with one line naming file:line.
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
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
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
