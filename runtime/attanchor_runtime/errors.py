"""Errors the runtime raises for problems a user can fix; the CLI prints their message as one line.

Both are subclasses of builtin exceptions (ValueError, RuntimeError) so callers that do not know
this module still catch them. Messages are a single line, start lower-case and name the offending
value (file, field, count), e.g. ``cannot decode image 'x.jpg': not a recognised image format``.
"""

from __future__ import annotations

__all__ = ["ArtifactError", "NumericsError", "RuntimeInputError", "one_line"]


def one_line(text: object) -> str:
    """Collapse whitespace (including newlines) so a message prints as one line."""
    return " ".join(str(text).split())


class RuntimeInputError(ValueError):
    """Bad user input: an undecodable image, a prompt without (or with several) image placeholders, ..."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class ArtifactError(RuntimeError):
    """A bad or mismatched artifact folder: missing file, unknown manifest field, shape/dtype mismatch, ..."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class NumericsError(RuntimeError):
    """A graph produced NaN/Inf: names the graph and precision and suggests another one."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))
