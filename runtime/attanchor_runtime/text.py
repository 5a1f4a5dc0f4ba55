"""Tokenizer, chat template and streaming detokenizer without transformers.

`TextProcessor` wraps a ``tokenizers.Tokenizer`` (tokenizer.json) plus the chat template and the
special tokens, and reproduces what transformers does with the same files:

* ``encode(text)`` == ``AutoTokenizer.from_pretrained(folder)(text).input_ids``: the tokenizer.json
  post-processor adds BOS/EOS. On load, as transformers' ``TokenizersBackend`` does, named special
  tokens from tokenizer_config.json that tokenizer.json lacks are added as special tokens,
  truncation/padding stored in tokenizer.json are switched off and ``split_special_tokens`` is honoured.
  ``add_bos_token`` / ``add_eos_token`` in tokenizer_config.json are ignored, as transformers 5 ignores
  them whenever a tokenizer.json exists: the tokenizer.json post-processor alone decides BOS/EOS. Ship the tokenizer.json written by transformers' ``save_pretrained`` (not a raw Hub copy):
  some transformers 5 classes (LlamaTokenizer, ...) rebuild the normalizer / pre-tokenizer / decoder in
  Python when they load, and only the saved file carries that rebuilt pipeline.
* ``decode(ids)`` == ``tokenizer.decode(ids, skip_special_tokens=True)`` including
  ``clean_up_tokenization_spaces`` (which transformers 5 ignores for BPE models).
* ``format_chat(question)`` == ``processor.apply_chat_template(messages, add_generation_prompt=True)``
  for one user turn ``[{"type": "image"}, {"type": "text", "text": question}]``, rendered with the same
  sandboxed jinja2 environment (trim_blocks, lstrip_blocks, loopcontrols, ``{% generation %}``,
  ``raise_exception``, ``strftime_now``, ``tojson``) and the special-token strings as variables.
  Without a saved template the LLaVA-1.5 prompt ``USER: <image>\\n{question}\\nASSISTANT:`` is used.

Module functions `collapse_image_runs` and `check_single_image` validate prompt ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, RuntimeInputError

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "LLAVA_PROMPT",
    "LLAVA_TEXT_PROMPT",
    "PromptFormatter",
    "StreamDecoder",
    "TextProcessor",
    "check_single_image",
    "collapse_image_runs",
    "image_run_keep",
    "image_run_starts",
    "find_chat_template",
    "render_chat_template",
    "text_config_from_hf",
]

DEFAULT_IMAGE_TOKEN = "<image>"
# LLaVA-1.5 / tiny-llava-v1-hf prompts, used when no chat template is saved.
LLAVA_PROMPT = "USER: {image_token}\n{question}\nASSISTANT:"
LLAVA_TEXT_PROMPT = "USER: {question}\nASSISTANT:"

# transformers' SPECIAL_TOKENS_ATTRIBUTES; any other tokenizer_config key ending in "_token" whose value is a
# token (e.g. "image_token") is a model-specific named special token in transformers 5.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEANUP_BPE_KEY = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
_CLEANUP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


# ------------------------------------------------------------------------------------ image placeholders


def collapse_image_runs(ids: Sequence[int] | np.ndarray, image_token_id: int) -> np.ndarray:
    """1-D ids with every run of consecutive ``image_token_id`` replaced by a single one (int64).

    HF processors expand ``<image>`` into M placeholder ids; the exported embedding graph takes one.
    """
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise RuntimeInputError(f"expected a 1-D token id row, got shape {tuple(arr.shape)}")
    return arr[image_run_keep(arr, image_token_id)]


def image_run_keep(arr: np.ndarray, image_token_id: int) -> np.ndarray:
    """Bool mask over a 1-D row: every id except the 2nd, 3rd, ... of each placeholder run."""
    keep = arr != image_token_id
    keep[image_run_starts(arr, image_token_id)] = True
    return keep


def image_run_starts(arr: np.ndarray, image_token_id: int) -> np.ndarray:
    """Indices where a run of consecutive placeholders begins (a run counts as one image)."""
    is_image = arr == image_token_id
    starts = is_image.copy()
    starts[1:] &= ~is_image[:-1]
    return np.flatnonzero(starts)


def check_single_image(ids_row: Sequence[int] | np.ndarray, image_token_id: int) -> int:
    """Check a prompt row holds exactly one image placeholder (one run counts as one); return its index.

    Raises RuntimeInputError naming the count otherwise. The index is that of the run's first id.
    """
    arr = np.asarray(ids_row)
    if arr.ndim != 1:
        raise RuntimeInputError(f"expected a 1-D token id row, got shape {tuple(arr.shape)}")
    starts = image_run_starts(arr, image_token_id)
    if starts.size != 1:
        raise RuntimeInputError(
            f"each prompt needs exactly one image placeholder (token id {image_token_id}), found {starts.size}"
        )
    return int(starts[0])


# ----------------------------------------------------------------------------------------- chat template


def _compile_template(template: str):
    """A jinja2 template compiled the way transformers' chat templates are (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for masks; it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store attribute {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render `template` as transformers' ``apply_chat_template(..., tokenize=False)`` does."""
    variables = {**(special_tokens or {}), **kwargs}
    return _compile_template(template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
    )


def _template_from_value(value: Any, source: str) -> str | None:
    """A chat template string from a tokenizer_config / chat_template.json value (str, list or dict)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):  # [{"name": ..., "template": ...}, ...]
        value = {item["name"]: item["template"] for item in value}
    if isinstance(value, Mapping):
        if "default" in value:
            return value["default"]
        if len(value) == 1:
            return next(iter(value.values()))
        raise ArtifactError(f"{source} has several chat templates ({', '.join(value)}) and none named 'default'")
    raise ArtifactError(f"{source}: unsupported chat_template value of type {type(value).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    return data


def find_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template saved in `folder`, or None.

    Order (processor files first, as transformers' processors resolve them): chat_template.jinja,
    chat_template.json, processor_config.json, tokenizer_config.json.
    """
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            template = _template_from_value(_read_json(path).get("chat_template"), str(path))
            if template is not None:
                return template
    return None


class PromptFormatter:
    """Renders one user turn (optionally with one image) plus the generation prompt.

    ``template=None`` uses the LLaVA-1.5 prompt. ``special_tokens`` are the named special-token strings
    transformers passes to templates (``{"bos_token": "<s>", "eos_token": "</s>", ...}``).
    """

    def __init__(
        self,
        template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
    ) -> None:
        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self.image_token = image_token
        self._compiled = None
        if template is not None:
            try:
                self._compiled = _compile_template(template)
            except Exception as exc:  # jinja2.TemplateSyntaxError
                raise ArtifactError(f"chat template does not compile: {exc}") from exc

    @staticmethod
    def messages(question: str, with_image: bool = True) -> list[dict[str, Any]]:
        """The HF-style conversation `format_chat` renders."""
        content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": question})
        return [{"role": "user", "content": content}]

    def format_chat(self, question: str, with_image: bool = True) -> str:
        if not isinstance(question, str):
            raise RuntimeInputError(f"the question must be a string, got {type(question).__name__}")
        if self._compiled is None:
            if with_image:
                return LLAVA_PROMPT.format(image_token=self.image_token, question=question)
            return LLAVA_TEXT_PROMPT.format(question=question)
        return self._compiled.render(
            messages=self.messages(question, with_image),
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self.special_tokens,
        )


# --------------------------------------------------------------------------------------------- tokenizer


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    """transformers 5 ``special_tokens_map`` from a tokenizer_config.json dict."""
    out: dict[str, str] = {}
    for key in _NAMED_SPECIAL_TOKENS:
        token = _token_content(config.get(key))
        if token is not None:
            out[key] = token
    for key, value in config.items():
        if key.endswith("_token") and key not in out and key not in _NAMED_SPECIAL_TOKENS:
            token = _token_content(value)
            if token is not None:
                out[key] = token
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            token = _token_content(value)
            if token is not None:
                out.setdefault(key, token)
    return out


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id)`` returns the newly stable text (possibly "").

    Each push decodes the ids so far and emits the part of the text past what was already emitted,
    holding back a trailing U+FFFD (an incomplete UTF-8 sequence from byte-level or byte-fallback
    pieces) and, when clean-up of tokenization spaces is on, everything from the last space (a later
    token may remove it). ``flush()`` returns the rest at the end of generation, so
    ``"".join(pieces) + flush() == decode(all ids)``.
    """

    def __init__(self, processor: TextProcessor, skip_special_tokens: bool = True) -> None:
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
        from tokenizers import AddedToken, Tokenizer, processors

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{folder} has no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ArtifactError(f"cannot load {path}: {exc}") from exc
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}

        # What transformers' TokenizersBackend.__init__ / _post_init do to the loaded backend.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        named = _special_tokens_from_config(config)
        if special_tokens:
            named.update(special_tokens)
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        missing = [tok for tok in dict.fromkeys(named.values()) if tok not in added]
        if missing:
            tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in missing])
        if tokenizer.post_processor is None:
            # transformers 5 ignores add_bos_token / add_eos_token from tokenizer_config.json when a
            # tokenizer.json exists and installs a post-processor that adds nothing.
            tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])

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
            clean_up_bpe=bool(config.get(_CLEANUP_BPE_KEY, False)),
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

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """As ``hf_tokenizer.decode(ids, skip_special_tokens=...)``."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.cleans_up_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
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
    template = _template_from_value(template, type(processor_or_tokenizer).__name__)
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
