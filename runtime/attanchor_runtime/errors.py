"""Errors for problems a user can fix; the CLI prints their message as one line, without a traceback.

Every such error derives from `UserError`, which collapses its message to one line; each also
derives from a builtin (ValueError, RuntimeError) so callers that do not know this module still
catch them. Messages start lower-case and name the offending value (file, field, count), e.g.
``cannot decode image 'x.jpg': not a recognised image format``. The exporter's errors
(attanchor_export.errors) derive from the same base, so the CLI needs one isinstance check.
"""

from __future__ import annotations

__all__ = ["ArtifactError", "NumericsError", "RuntimeInputError", "UserError", "one_line"]


def one_line(text: object) -> str:
    """Collapse whitespace (including newlines) so a message prints as one line."""
    return " ".join(str(text).split())


class UserError(Exception):
    """Base of every error whose message is already a complete one-line explanation."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class RuntimeInputError(UserError, ValueError):
    """Bad user input: an undecodable image, a prompt without (or with several) image placeholders, ..."""


class ArtifactError(UserError, RuntimeError):
    """A bad or mismatched artifact folder: missing file, unknown manifest field, shape/dtype mismatch, ..."""


class NumericsError(UserError, RuntimeError):
    """A graph produced NaN/Inf: names the graph and precision and suggests another one."""
