"""Errors the exporter reports as one line (no traceback): the message names the offending value and
says what to do next. All derive from attanchor_runtime.errors.UserError, like the runtime's.
"""

from __future__ import annotations

from attanchor_runtime.errors import UserError, one_line

__all__ = ["CheckpointError", "ExportError", "StreamingUnavailable", "UnsupportedArchitecture", "ValidationFailed",
           "one_line"]


class ExportError(UserError, RuntimeError):
    """An export cannot proceed: output folder exists, is not writable, disk full, a gate failed, ..."""


class CheckpointError(UserError):
    """A checkpoint cannot be resolved or loaded: missing folder, files, cache entry or support."""


class UnsupportedArchitecture(CheckpointError):
    """The checkpoint's architecture (or its vision tower / text model) has no adapter."""


class ValidationFailed(ExportError):
    """Exported graphs disagree with the PyTorch source; `checks` holds the per-check results."""

    def __init__(self, message: object = "", checks=None) -> None:
        super().__init__(message)
        self.checks = list(checks or [])


class StreamingUnavailable(Exception):
    """This checkpoint cannot be streamed (load/streamed.py; the message says why): load it whole instead.
    Not a UserError: the loader catches it and falls back."""
