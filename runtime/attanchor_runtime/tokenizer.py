"""Load tokenizer.json with the ``tokenizers`` library the way transformers 5's TokenizersBackend does.

On load, named special tokens from tokenizer_config.json that tokenizer.json lacks are added as
special tokens, truncation/padding stored in tokenizer.json are switched off and
``split_special_tokens`` is honoured. ``add_bos_token`` / ``add_eos_token`` in tokenizer_config.json
are ignored, as transformers 5 ignores them whenever a tokenizer.json exists: the tokenizer.json
post-processor alone decides BOS/EOS. Ship the tokenizer.json written by transformers'
``save_pretrained`` (not a raw Hub copy): some transformers 5 classes (LlamaTokenizer, ...) rebuild
the normalizer / pre-tokenizer / decoder in Python when they load, and only the saved file carries
that rebuilt pipeline.

Also here: ``clean_up_tokenization_spaces``, the text clean-up transformers' ``decode`` applies
(and skips for BPE models).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .chat_template import read_json_object
from .errors import ArtifactError

__all__ = ["CLEANUP_BPE_KEY", "clean_up_tokenization", "load_tokenizer", "special_tokens_from_config"]

# transformers' SPECIAL_TOKENS_ATTRIBUTES; any other tokenizer_config key ending in "_token" whose value is a
# token (e.g. "image_token") is a model-specific named special token in transformers 5.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CLEANUP_BPE_KEY = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
_CLEANUP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, str]:
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


def load_tokenizer(
    folder: str | os.PathLike, special_tokens: Mapping[str, str] | None = None
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """``(tokenizer, tokenizer_config, named special tokens)`` from `folder`.

    `special_tokens` override the named special tokens tokenizer_config.json gives.
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
    config = read_json_object(config_path) if config_path.is_file() else {}

    # What transformers' TokenizersBackend.__init__ / _post_init do to the loaded backend.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if hasattr(tokenizer, "encode_special_tokens"):
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
    named = special_tokens_from_config(config)
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
    return tokenizer, config, named


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space before punctuation and contractions."""
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text
