"""Which prompt tokens may become anchors: words, never the tokenizer's special tokens.

AttAnchor copies the prompt's words next to the image patches they describe. A chat template also puts
control tokens after the image (ChatML's <|im_end|> and <|im_start|>, Llama's <|eot_id|>, BOS/EOS, pad,
image/vision markers); when they were candidates they took anchor slots next to patches they do not
describe and spent the anchor rate that `--threshold auto` targets. So every id the tokenizer marks
special (its special tokens and every added token flagged special) is excluded: the ids are recorded in
the manifest (anchor.excluded_token_ids) and applied inside embedding.onnx (AnchorInsert version 2's
candidate_mask). Ordinary text of the template ("assistant", "user") stays a candidate.

Whitespace-only tokens ("\\n", runs of spaces) are also excluded (WHITESPACE_EXCLUDED): measured on
tiny-vqa (docs/CONTRACTS.md, "Anchor candidates"), they took a share of the anchors with no word behind
them. The same function decides candidates in training (attanchor_export.train) and at export, so the
layout a model is trained on is the one it is served with.
"""

from __future__ import annotations

WHITESPACE_EXCLUDED = True


def special_token_ids(tokenizer) -> list[int]:
    """Ids the tokenizer marks special: all_special_ids plus every added token flagged special."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(i))
    return sorted(ids)


def whitespace_token_ids(tokenizer) -> list[int]:
    """Ids whose text is whitespace only (newlines, spaces, tabs), special tokens aside."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return [i for i, text in enumerate(texts) if text and not text.strip()]


def excluded_token_ids(tokenizer, whitespace: bool = WHITESPACE_EXCLUDED) -> list[int]:
    """The ids that are never anchor candidates, sorted (the manifest's anchor.excluded_token_ids)."""
    ids = set(special_token_ids(tokenizer))
    if whitespace:
        ids.update(whitespace_token_ids(tokenizer))
    return sorted(ids)
