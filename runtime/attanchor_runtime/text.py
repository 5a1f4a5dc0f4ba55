"""`TextProcessor`: the tokenizer, the chat template and the stream decoder of one artifact, together.

It reproduces what transformers does with the same files:

* ``encode(text)`` == ``AutoTokenizer.from_pretrained(folder)(text).input_ids``: the tokenizer.json
  post-processor adds BOS/EOS; loading follows transformers 5 (:mod:`.tokenizer`).
* ``decode(ids)`` == ``tokenizer.decode(ids, skip_special_tokens=True)`` including
  ``clean_up_tokenization_spaces`` (which transformers 5 ignores for BPE models).
* ``format_chat(question)`` == ``processor.apply_chat_template(messages, add_generation_prompt=True)``
  for one user turn with one image (:mod:`.chat_template`).
* ``prompt_ids(question)``: the rendered prompt, encoded, its image placeholder run collapsed to one
  id (:mod:`.image_placeholders`).
* ``chat_ids(messages)``: a whole conversation (system prompt, earlier turns) rendered and encoded with
  the message texts as plain text, so markers typed by a user are never control tokens (the server).
* ``stream_decoder()``: text pieces while generating (:mod:`.detokenize`).

`text_config_from_hf` reads, at export time, what the manifest needs to rebuild a TextProcessor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .chat_template import DEFAULT_IMAGE_TOKEN, PromptFormatter, find_chat_template, template_from_value
from .detokenize import StreamDecoder
from .errors import ArtifactError, RuntimeInputError
from .image_placeholders import check_single_image, collapse_image_runs
from .tokenizer import CLEANUP_BPE_KEY, clean_up_tokenization, load_tokenizer

__all__ = ["TextProcessor", "text_config_from_hf"]


class TextProcessor:
    """Tokenizer (``tokenizers`` library) + chat template + special ids, torch- and transformers-free."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        image_token: str | None = None,
        image_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        clean_up_bpe: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens or {})
        self.image_token = image_token or self.special_tokens.get("image_token") or DEFAULT_IMAGE_TOKEN
        self.formatter = PromptFormatter(chat_template, self.special_tokens, self.image_token)

        def lookup(key: str) -> int | None:
            token = self.special_tokens.get(key)
            return None if token is None else tokenizer.token_to_id(token)

        self.image_token_id = image_token_id if image_token_id is not None else tokenizer.token_to_id(self.image_token)
        self.bos_token_id = bos_token_id if bos_token_id is not None else lookup("bos_token")
        self.pad_token_id = pad_token_id if pad_token_id is not None else lookup("pad_token")
        if eos_token_id is None:
            eos_token_id = lookup("eos_token")
        if eos_token_id is None:
            self.eos_token_ids: tuple[int, ...] = ()
        elif isinstance(eos_token_id, (int, np.integer)):
            self.eos_token_ids = (int(eos_token_id),)
        else:
            self.eos_token_ids = tuple(int(i) for i in eos_token_id)
        self.special_ids = frozenset(
            int(i) for i, token in tokenizer.get_added_tokens_decoder().items() if token.special
        )
        self._byte_token_cache: dict[int, bool] = {}
        self._added: frozenset[int] | None = None
        self._plain = None  # see _plain_tokenizer
        # transformers 5 skips the clean-up for BPE models (it would eat real spaces before punctuation).
        is_bpe = type(tokenizer.model).__name__ == "BPE"
        self.cleans_up_spaces = bool(clean_up_tokenization_spaces) and (not is_bpe or bool(clean_up_bpe))

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        image_token: str | None = None,
        image_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> TextProcessor:
        """Load tokenizer.json (+ tokenizer_config.json, chat template files) from `folder`.

        Keyword arguments override what the folder says (the manifest stores the chat template and the
        special ids; pass them here).
        """
        tokenizer, config, named = load_tokenizer(folder, special_tokens)
        if chat_template is None:
            chat_template = find_chat_template(folder)
        return cls(
            tokenizer,
            chat_template=chat_template,
            special_tokens=named,
            image_token=image_token,
            image_token_id=image_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            clean_up_bpe=bool(config.get(CLEANUP_BPE_KEY, False)),
        )

    # -- text <-> ids ------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.formatter.template

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        """Size including added tokens (``len(hf_tokenizer)``)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def is_byte_token(self, token_id: int) -> bool:
        """Whether `token_id` is a byte-fallback piece ``<0xNN>`` (SentencePiece / Llama vocabularies)."""
        cached = self._byte_token_cache.get(token_id)
        if cached is None:
            token = self.tokenizer.id_to_token(int(token_id)) or ""
            cached = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            self._byte_token_cache[token_id] = cached
        return cached

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))

    def format_chat(self, question: str, with_image: bool = True) -> str:
        """The prompt for one user turn with one image and the generation prompt."""
        return self.formatter.format_chat(question, with_image=with_image)

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """int64 ids, as ``hf_tokenizer(text, add_special_tokens=...).input_ids``."""
        if not isinstance(text, str):
            raise RuntimeInputError(f"text to encode must be a string, got {type(text).__name__}")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int64)

    def prompt_ids(self, question: str, with_image: bool = True) -> np.ndarray:
        """format_chat + encode, as ``processor.apply_chat_template(..., tokenize=True)`` with one image.

        Special tokens are not added again when the rendered prompt already starts with BOS. With an
        image, the row is checked to hold exactly one placeholder run, collapsed to one id.
        """
        text = self.format_chat(question, with_image=with_image)
        bos = self.special_tokens.get("bos_token")
        ids = self.encode(text, add_special_tokens=not (bos is not None and text.startswith(bos)))
        if with_image:
            if self.image_token_id is None:
                raise ArtifactError(f"the tokenizer has no image token {self.image_token!r}")
            ids = collapse_image_runs(ids, self.image_token_id)
            check_single_image(ids, self.image_token_id)
        return ids

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """A conversation rendered with the chat template (and the generation prompt), encoded with every
        message text taken as plain text, its image placeholder run collapsed to one id.

        `messages` as for ``PromptFormatter.format_messages``. Control tokens come only from the template:
        a ``<|im_start|>system`` or ``<image>`` typed inside a message becomes ordinary text tokens, so
        text from a user cannot open a new role or an extra image slot (`prompt_ids` parses them; it is
        for prompts the caller wrote). Where no message text holds such a marker the ids are exactly those
        of encoding the rendered prompt (`prompt_ids(question)` for one user turn with the image first).
        """
        texts: list[str] = []

        def hide(text: Any) -> str:  # each message text becomes a marker the template passes through
            if not isinstance(text, str):
                raise RuntimeInputError(f"message text must be a string, got {type(text).__name__}")
            texts.append(text)
            return f"\ue000{len(texts) - 1}\ue001"

        hidden = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = hide(content)
            else:
                content = [{**p, "text": hide(p["text"])} if p.get("type") == "text" else dict(p) for p in content]
            hidden.append({**message, "content": content})
        rendered = self.formatter.format_messages(hidden)
        pieces = re.split("\ue000([0-9]+)\ue001", rendered)  # template, text index, template, ...
        order = [int(i) for i in pieces[1::2]]
        if sorted(order) != list(range(len(texts))):
            raise ArtifactError("the chat template repeats or drops message text; cannot tokenize it as text")
        sections = [(piece, i % 2 == 1) for i, piece in enumerate(pieces)]  # (text, from a message)
        sections = [(texts[int(t)] if is_text else t, is_text) for t, is_text in sections]
        full = "".join(t for t, _ in sections)
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos is not None and full.startswith(bos))

        encoding = self.tokenizer.encode(full, add_special_tokens=add_special)
        spans, start = [], 0
        for text, is_text in sections:
            if is_text and text:
                spans.append((start, start + len(text)))
            start += len(text)
        control = self._added_ids()
        injected = any(
            token in control and any(s < b and a < e for s, e in spans)
            for token, (a, b) in zip(encoding.ids, encoding.offsets)
        )
        ids = encoding.ids
        if injected:  # encode section by section: message text with its markers as plain text
            ids = [i for text, is_text in sections if text
                   for i in (self._encode_as_text(text) if is_text else self.encode(text, add_special_tokens=False))]
            if add_special:
                prefix, suffix = self._post_processor_ids()
                ids = [*prefix, *ids, *suffix]
        ids = np.asarray(ids, dtype=np.int64)
        if self.image_token_id is None:
            raise ArtifactError(f"the tokenizer has no image token {self.image_token!r}")
        ids = collapse_image_runs(ids, self.image_token_id)
        check_single_image(ids, self.image_token_id)
        return ids

    def _added_ids(self) -> frozenset[int]:
        """Every added token (special or not): the markers a template writes and a user must not."""
        if self._added is None:
            self._added = frozenset(int(i) for i in self.tokenizer.get_added_tokens_decoder())
        return self._added

    def _encode_as_text(self, text: str) -> list[int]:
        """`text` encoded with added tokens read as text. A vocabulary that can also spell a marker from
        plain text (BPE merges that rebuild "</s>") gets that piece spelled character by character."""
        control = self._added_ids()
        encoding = self._plain_tokenizer().encode(text, add_special_tokens=False)
        ids = []
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            if token not in control:
                ids.append(token)
                continue
            spelled = [t.id for char in text[start:end] for t in self.tokenizer.model.tokenize(char)]
            if not spelled or control.intersection(spelled):
                raise RuntimeInputError(f"message text {text[start:end]!r} cannot be encoded without a control token")
            ids += spelled
        return ids

    def _post_processor_ids(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's post-processor puts before and after a text (BOS, EOS, ...)."""
        bare = self.encode("a", add_special_tokens=False).tolist()
        full = self.encode("a", add_special_tokens=True).tolist()
        at = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
        return full[:at], full[at + len(bare):]

    def _plain_tokenizer(self):
        """A copy of the tokenizer that reads added tokens as text (tokenizers' encode_special_tokens)."""
        if self._plain is None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(self.tokenizer.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """As ``hf_tokenizer.decode(ids, skip_special_tokens=...)``."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.cleans_up_spaces:
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, rows: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


# ------------------------------------------------------------------------------------- from transformers


def text_config_from_hf(processor_or_tokenizer: Any) -> dict[str, Any]:
    """What the manifest needs to rebuild a TextProcessor, read from a transformers processor/tokenizer.

    Returns ``{"chat_template", "special_tokens", "image_token", "image_token_id", "bos_token_id",
    "eos_token_id", "pad_token_id"}``. Reads attributes only: transformers is not imported here.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    template = getattr(processor_or_tokenizer, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    template = template_from_value(template, type(processor_or_tokenizer).__name__)
    special = {k: str(v) for k, v in dict(getattr(tokenizer, "special_tokens_map", {}) or {}).items() if v is not None}
    image_token = (
        getattr(processor_or_tokenizer, "image_token", None) or special.get("image_token") or DEFAULT_IMAGE_TOKEN
    )
    image_token_id = getattr(processor_or_tokenizer, "image_token_id", None)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(str(image_token))
        if image_token_id == getattr(tokenizer, "unk_token_id", None):
            image_token_id = None
    return {
        "chat_template": template,
        "special_tokens": special,
        "image_token": str(image_token),
        "image_token_id": None if image_token_id is None else int(image_token_id),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
    }
