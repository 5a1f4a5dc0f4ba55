"""Streaming detokenizer: turn generated ids into text pieces as they arrive, never taking one back."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["StreamDecoder"]


class Detokenizer(Protocol):
    """What a StreamDecoder needs of a text processor (text.TextProcessor is one)."""

    cleans_up_spaces: bool
    special_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def is_byte_token(self, token_id: int) -> bool: ...


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id)`` returns the newly stable text (possibly "").

    Each push decodes the ids so far and emits the part of the text past what was already emitted,
    holding back a trailing U+FFFD (an incomplete UTF-8 sequence from byte-level or byte-fallback
    pieces) and, when clean-up of tokenization spaces is on, everything from the last space (a later
    token may remove it). ``flush()`` returns the rest at the end of generation, so
    ``"".join(pieces) + flush() == decode(all ids)``.
    """

    def __init__(self, processor: Detokenizer, skip_special_tokens: bool = True) -> None:
        self._processor = processor
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._emitted = ""

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._emitted

    def _stable_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        if self._processor.cleans_up_spaces:
            space = text.rfind(" ", 0, end)
            if space >= 0:
                end = space
        return end

    def _open_byte_run(self) -> int:
        """Start of the trailing run of byte-fallback pieces (``<0xNN>``), len(ids) if there is none.

        Byte-fallback decoders turn a whole run of byte pieces into U+FFFD when the run is not valid
        UTF-8, so a later byte can still change the text of earlier ones: the run stays held back.
        Special tokens inside the run are skipped by the decoder, so they do not close it.
        """
        proc = self._processor
        start = len(self.ids)
        i = start - 1
        while i >= 0:
            token_id = self.ids[i]
            if proc.is_byte_token(token_id):
                start = i
            elif not (self.skip_special_tokens and token_id in proc.special_ids):
                break
            i -= 1
        return start

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._processor.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        end = self._stable_end(text)
        run = self._open_byte_run()
        if run < len(self.ids):
            before = self._processor.decode(self.ids[:run], skip_special_tokens=self.skip_special_tokens)
            end = min(end, len(os.path.commonprefix([before, text])))
        if end <= len(self._emitted) or not text.startswith(self._emitted):
            return ""
        piece = text[len(self._emitted) : end]
        self._emitted += piece
        return piece

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """The text held back so far (call once generation has ended)."""
        text = self._processor.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if not text.startswith(self._emitted):
            return ""
        piece = text[len(self._emitted) :]
        self._emitted = text
        return piece
