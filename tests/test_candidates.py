"""Anchors are words: the tokenizer's special tokens (and whitespace-only tokens) are never candidates.

The excluded ids are recomputed here from the artifact's tokenizer.json with the `tokenizers` library
alone (not the transformers path the exporter uses), and the embedding graph is run on prompts full of
them at threshold -1, where every candidate becomes an anchor.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from attanchor_graphs.specification import anchor_insert, anchor_pairs, candidate_mask_from_ids
from helpers import read_manifest


def _independent_exclusions(folder) -> tuple[set[int], set[int]]:
    """(special ids, whitespace-only ids) read from tokenizer.json directly."""
    from tokenizers import Tokenizer

    data = json.loads((folder / "tokenizer.json").read_text())
    special = {t["id"] for t in data["added_tokens"] if t["special"]}
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    whitespace = set()
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([i], skip_special_tokens=False)
        if text and not text.strip():
            whitespace.add(i)
    return special, whitespace - special


@pytest.mark.parametrize("name", ["clip-t2i", "siglip-i2t"])
def test_manifest_excludes_the_special_and_whitespace_tokens(artifact, name):
    folder = artifact(name)
    anchor = read_manifest(folder)["anchor"]
    special, whitespace = _independent_exclusions(folder)
    assert anchor["op_version"] == 2
    assert special and whitespace  # the test tokenizer has both, so the comparison means something
    assert set(anchor["excluded_token_ids"]) == special | whitespace
    manifest = read_manifest(folder)
    assert {manifest["text"]["image_token_id"], manifest["text"]["pad_token_id"]} <= special


@pytest.mark.parametrize("name", ["clip-t2i", "siglip-i2t"])
def test_embedding_graph_never_anchors_an_excluded_token(artifact, name):
    folder = artifact(name)
    manifest = read_manifest(folder)
    excluded = sorted(manifest["anchor"]["excluded_token_ids"])
    dims, mode = manifest["dims"], manifest["anchor"]["mode"]
    rng = np.random.default_rng(5)
    words = [i for i in range(dims["vocab_size"]) if i not in set(excluded)]
    # After the image: words interleaved with every kind of excluded id (BOS/EOS, pad, image, whitespace).
    image_token_id = manifest["text"]["image_token_id"]
    others = [i for i in excluded if i != image_token_id]
    after = [int(v) for pair in zip(rng.choice(words, len(others)), others, strict=True) for v in pair]
    ids = np.asarray([[*rng.choice(words, 3), image_token_id, *after]], np.int64)
    mask = np.ones_like(ids)
    feats = rng.standard_normal((1, dims["image_tokens"], dims["hidden_size"])).astype(np.float32)
    session = ort.InferenceSession(str(folder / "embedding.onnx"), providers=["CPUExecutionProvider"])
    gi, om = session.run(["gather_index", "attention_mask"], {
        "input_ids": ids, "text_attention_mask": mask, "image_features": feats, "threshold": np.asarray(-1.0, np.float32)})
    pairs = anchor_pairs(gi, om, ids.shape[1], mode)[0]
    anchored = {int(ids[0, n]) for n, _ in pairs}
    assert anchored and not anchored & set(excluded)
    if mode == "t2i":  # at -1 every candidate is an anchor: exactly the words after the image
        assert anchored == {int(v) for v in after if v not in set(excluded)}
    # The graph is the reference with the manifest's ids as candidate_mask ...
    table = np.fromfile(folder / "embed_tokens.bin", dtype=manifest["embed_table"]["dtype"]).reshape(
        manifest["embed_table"]["shape"]).astype(np.float32)
    want = anchor_insert(table[ids], feats, mask, np.array([3]), -1.0, mode=mode,
                         max_anchors=manifest["anchor"]["max_anchors"],
                         candidate_mask=candidate_mask_from_ids(ids, excluded))
    np.testing.assert_array_equal(gi, want[0])
    # ... and version 1 (no mask) would have anchored the excluded ids: the exclusion is what changed.
    v1 = anchor_pairs(*anchor_insert(table[ids], feats, mask, np.array([3]), -1.0, mode=mode), ids.shape[1], mode)[0]
    assert {int(ids[0, n]) for n, _ in v1} & set(excluded)


def test_excluded_ids_of_a_chatml_tokenizer():
    """ChatML markers, BOS/EOS, pad and image tokens out; template words ("assistant") and "?" stay in."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from attanchor_export.trace.candidates import excluded_token_ids, special_token_ids

    vocab = {"<|endoftext|>": 0, "user": 1, "assistant": 2, "Ċ": 3, "Ġ": 4, "red": 5, "?": 6, "ĠĠ": 7, "Ġred": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<image>", "<pad>"])
    tok.add_tokens(["<not_special>"])  # an added token NOT flagged special stays a candidate
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<|endoftext|>")
    ids = {t: fast.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<image>", "<pad>", "<not_special>")}
    assert set(special_token_ids(fast)) == {0, ids["<|im_start|>"], ids["<|im_end|>"], ids["<image>"], ids["<pad>"]}
    excluded = set(excluded_token_ids(fast))
    assert {3, 4, 7} <= excluded  # "\n", " ", "  ": whitespace only
    assert not {1, 2, 5, 6, 8, ids["<not_special>"]} & excluded
    assert set(excluded_token_ids(fast, whitespace=False)) == set(special_token_ids(fast))
