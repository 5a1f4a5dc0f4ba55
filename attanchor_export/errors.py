"""Errors the CLI reports as one line (no traceback): the message names the offending value and says
what to do next. Messages are collapsed to a single line whatever the caller passes.
"""

from __future__ import annotations

from attanchor_runtime.errors import one_line

__all__ = ["CheckpointError", "ExportError", "UnsupportedArchitecture", "ValidationFailed", "one_line"]


class ExportError(RuntimeError):
    """An export cannot proceed: output folder exists, is not writable, disk full, ..."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class CheckpointError(Exception):
    """A checkpoint cannot be resolved or loaded: missing folder, files, cache entry or support."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class UnsupportedArchitecture(CheckpointError):
    """The checkpoint's architecture (or its vision tower / text model) has no adapter."""


class ValidationFailed(RuntimeError):
    """Exported graphs disagree with the PyTorch source; `checks` holds the per-check results."""

    def __init__(self, message: object = "", checks=None) -> None:
        super().__init__(one_line(message))
        self.checks = list(checks or [])
