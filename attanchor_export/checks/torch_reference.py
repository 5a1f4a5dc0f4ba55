"""The PyTorch AttAnchor reference: anchored inputs and greedy decoding with the HF model itself.

Anchor indices come from the numpy specification (attanchor_graphs.reference.anchor_insert), so
the only thing this module adds is running the real transformers modules on the result. Parity
checks compare exported graphs against these functions.

Prompts here hold ONE image placeholder per row (the runtime collapses runs before this point);
transformers' own LlavaForConditionalGeneration.generate wants M placeholders instead, and
`expand_image_tokens` converts for comparisons against it.
"""

from __future__ import annotations

import numpy as np
import torch
from attanchor_graphs.reference import anchor_insert, candidate_mask_from_ids, position_ids_from_mask
from transformers import DynamicCache

from attanchor_export.load.hf_compat import cache_kwargs


def _as_long(x) -> torch.Tensor:
    return x.long() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x), dtype=torch.long)


def image_position(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Index of the single image placeholder per row; ValueError unless each row has exactly one."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    bad = (counts != 1).nonzero().flatten()
    if bad.numel():
        r = int(bad[0])
        raise ValueError(
            f"row {r} has {int(counts[r])} image placeholders (id {image_token_id}); the reference needs exactly one"
        )
    return is_image.long().argmax(dim=1)


@torch.no_grad()
def image_features(loaded, pixel_values) -> torch.Tensor:
    """Projected image features [B, M, D] from the adapter's vision module (= model.get_image_features)."""
    vision = loaded.adapter.vision_tower_and_projector(loaded.model)
    dtype = next(vision.parameters()).dtype
    return vision(torch.as_tensor(pixel_values).to(dtype))


@torch.no_grad()
def anchored_inputs(loaded, input_ids, attention_mask, pixel_values, threshold, mode="t2i", max_anchors=None,
                    features=None, excluded_token_ids=()):
    """Prompt ids + image -> (inputs_embeds [B,L,D], attention_mask [B,L], position_ids [B,L], gather_index [B,L]).

    input_ids int64 [B,T], left padded, one image placeholder per row; attention_mask [B,T] (None = all 1).
    Scores are computed in float32 whatever the model dtype, as the exported graph does.
    features: image_features(loaded, pixel_values) computed beforehand (e.g. to time the vision pass
    on its own); None computes them here. excluded_token_ids: ids that are never anchors (the manifest's
    anchor.excluded_token_ids, AnchorInsert version 2); empty = version 1, every token a candidate.
    """
    dims = loaded.adapter.dims
    ids = _as_long(input_ids)
    mask = torch.ones_like(ids) if attention_mask is None else _as_long(attention_mask)
    features = image_features(loaded, pixel_values) if features is None else features
    text = loaded.adapter.embed_tokens(loaded.model)(ids)
    where = image_position(ids, dims.image_token_id)

    gather_index, out_mask = anchor_insert(
        text.float().numpy(), features.float().numpy(), mask.numpy(), where.numpy(),
        np.float32(threshold), mode=mode, max_anchors=max_anchors,
        candidate_mask=candidate_mask_from_ids(ids.numpy(), excluded_token_ids) if len(excluded_token_ids) else None,
    )
    gather_index = torch.from_numpy(gather_index)
    both = torch.cat([text, features.to(text.dtype)], dim=1)  # index space of gather_index: text n -> n, image m -> T + m
    embeds = torch.gather(both, 1, gather_index[..., None].expand(-1, -1, both.shape[-1]))
    position_ids = torch.from_numpy(position_ids_from_mask(out_mask))
    return embeds, torch.from_numpy(out_mask), position_ids, gather_index


def _decoder(loaded):
    a, m = loaded.adapter, loaded.model
    return a.language_model(m), a.lm_head(m), a.embed_tokens(m)


@torch.no_grad()
def greedy_generate(
    loaded, inputs_embeds, attention_mask, position_ids, max_new_tokens, eos_token_id=None, pad_token_id=None,
    on_token=None,
) -> torch.Tensor:
    """Greedy tokens [B, new] from anchored inputs, with the model's own decoder and a DynamicCache.

    Explicit position ids throughout (next = last + 1, as HF generate does); the mask grows by one 1
    per step. eos_token_id (int or list; None = never stop) ends a row, which is then filled with
    pad_token_id (default: the model's pad, else the first eos); decoding stops when every row has
    ended, so `new` can be < max_new_tokens, as with HF generate. on_token(tokens [B]), if given, is
    called as soon as each step's tokens are chosen (a benchmark times the steps with it).
    """
    body, head, embed = _decoder(loaded)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = loaded.adapter.dims.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    eos_t = torch.tensor(eos, dtype=torch.long)

    mask = _as_long(attention_mask)
    positions = _as_long(position_ids)
    embeds = inputs_embeds
    cache = DynamicCache(config=body.config)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool)
    tokens = []
    for _ in range(max_new_tokens):
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                   **cache_kwargs(body, cache))  # the cache is updated in place
        # lm_head on the last position only, as HF generate does (logits_to_keep=1): same matmul shapes.
        logits = head(out.last_hidden_state[:, -1:, :])[:, -1, :].float()
        token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, eos_t)
        if bool(done.all()):
            break
        embeds = embed(token[:, None])
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if not tokens:
        return torch.zeros((inputs_embeds.shape[0], 0), dtype=torch.long)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def reference_logits(loaded, inputs_embeds, attention_mask, position_ids, continuation_ids=None) -> torch.Tensor:
    """Teacher-forced logits [B, L (+ C), V] for an anchored prompt, optionally followed by token ids.

    One forward, no cache. The mask is always passed: without it transformers 5.x reads restarting
    position ids as packed sequences.
    """
    body, head, embed = _decoder(loaded)
    mask, positions, embeds = _as_long(attention_mask), _as_long(position_ids), inputs_embeds
    if continuation_ids is not None:
        cont = _as_long(continuation_ids)
        steps = torch.arange(1, cont.shape[1] + 1)[None, :]
        embeds = torch.cat([embeds, embed(cont)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + steps], dim=1)
        mask = torch.cat([mask, torch.ones_like(cont)], dim=1)
    out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return head(out.last_hidden_state).float()


def expand_image_tokens(input_ids, attention_mask, image_token_id: int, num_image_tokens: int, pad_token_id: int):
    """One placeholder per row -> M placeholders per row, re-left-padded: the input_ids HF LLaVA's generate
    expects (what LlavaProcessor emits). Returns (input_ids, attention_mask) as LongTensors [B, T - 1 + M].
    """
    ids = _as_long(input_ids)
    mask = torch.ones_like(ids) if attention_mask is None else _as_long(attention_mask)
    image_position(ids, image_token_id)  # validates: exactly one per row
    rows = []
    for row, row_mask in zip(ids, mask, strict=True):
        real = row[row_mask.bool()]
        at = int((real == image_token_id).nonzero()[0])
        rows.append(torch.cat([real[:at], torch.full((num_image_tokens,), image_token_id), real[at + 1 :]]))
    width = max(len(r) for r in rows)
    out_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    out_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out_ids[i, width - len(r) :] = r
        out_mask[i, width - len(r) :] = 1
    return out_ids, out_mask
