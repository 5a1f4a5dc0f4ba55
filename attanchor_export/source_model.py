"""The source model in PyTorch, run the way the artifact runs: the other side of every comparison.

- `anchored_inputs`: AnchorInsert from its numpy specification (attanchor_graphs.specification) over the
  model's own token embeddings and image features, position ids from the family;
- `greedy_generate`: greedy decoding with the HF decoder and a DynamicCache, explicit positions: the
  independent reference the runtime's decode loop is checked against (so not that loop itself);
- `teacher_forced_logits`: one forward over a prompt and a continuation;
- `DecoderWithCache`: the decoder with a flat KV cache, what decoder.onnx is traced from;
- `TorchBackend`: all of the above behind decode.Backend, so parity and the accuracy gate drive the
  source model with the runtime's own decode loop and Pipeline.

Prompts here hold ONE image placeholder per row (the runtime collapses runs before this point);
transformers' own LlavaForConditionalGeneration.generate wants M placeholders instead, and
`expand_image_tokens` converts for comparisons against it.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from attanchor_graphs.specification import anchor_insert, candidate_mask_from_ids
from attanchor_runtime.batch import left_pad
from attanchor_runtime.manifest import Manifest
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
    """Projected image features [B, M, D] from the family's vision module (= model.get_image_features)."""
    vision = loaded.family.vision_module(loaded.model)
    dtype = next(vision.parameters()).dtype
    return vision(torch.as_tensor(pixel_values).to(dtype))


@torch.no_grad()
def anchored_inputs(loaded, input_ids, attention_mask, pixel_values, threshold, mode="t2i", max_anchors=None,
                    features=None, excluded_token_ids=()):
    """Prompt ids + image -> (inputs_embeds [B,L,D], attention_mask [B,L], position_ids, gather_index [B,L]).

    input_ids int64 [B,T], left padded, one image placeholder per row; attention_mask [B,T] (None = all 1).
    Scores are computed in float32 whatever the model dtype, as the exported graph does.
    features: image_features(loaded, pixel_values) computed beforehand (e.g. to time the vision pass
    on its own); None computes them here. excluded_token_ids: ids that are never anchors (the manifest's
    anchor.excluded_token_ids, AnchorInsert version 2); empty = version 1, every token a candidate.
    """
    ids = _as_long(input_ids)
    mask = torch.ones_like(ids) if attention_mask is None else _as_long(attention_mask)
    features = image_features(loaded, pixel_values) if features is None else torch.as_tensor(features)
    text = loaded.family.embed_tokens(loaded.model)(ids)
    where = image_position(ids, loaded.tokens.image_token_id)

    gather_index, out_mask = anchor_insert(
        text.float().numpy(), features.float().numpy(), mask.numpy(), where.numpy(),
        np.float32(threshold), mode=mode, max_anchors=max_anchors,
        candidate_mask=candidate_mask_from_ids(ids.numpy(), excluded_token_ids) if len(excluded_token_ids) else None,
    )
    both = torch.cat([text, features.to(text.dtype)], dim=1)  # index space of gather_index: text n -> n, image m -> T + m
    index = torch.from_numpy(gather_index)
    embeds = torch.gather(both, 1, index[..., None].expand(-1, -1, both.shape[-1]))
    position_ids = torch.from_numpy(loaded.family.position_ids(out_mask, gather_index, mask.numpy(), where.numpy(),
                                                                mode))
    return embeds, torch.from_numpy(out_mask), position_ids, index


def _decoder(loaded):
    f, m = loaded.family, loaded.model
    return f.language_model(m), f.lm_head(m), f.embed_tokens(m)


def _next_positions(positions: torch.Tensor) -> torch.Tensor:
    """The next token's positions: the row's last + 1 ([B, S]); with sections first ([3, B, S], M-RoPE),
    the row's largest prompt position + 1 on every axis, then + 1 per step (HF's rope deltas)."""
    if positions.dim() == 2:
        return positions[:, -1:] + 1
    if positions.shape[-1] == 1:  # a decode step: one past the last
        return positions + 1
    largest = positions.amax(dim=(0, 2))  # padding slots hold 0
    return (largest + 1)[None, :, None].expand(positions.shape[0], -1, 1).clone()


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
        pad_token_id = loaded.tokens.pad_token_id
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
        positions = _next_positions(positions)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if not tokens:
        return torch.zeros((inputs_embeds.shape[0], 0), dtype=torch.long)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def teacher_forced_logits(loaded, inputs_embeds, attention_mask, position_ids, continuation_ids=None) -> torch.Tensor:
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
        if positions.dim() == 3:  # M-RoPE: the continuation counts on from the largest prompt position
            after = _next_positions(positions) - 1 + steps[None]
        else:
            after = positions[:, -1:] + steps
        positions = torch.cat([positions, after], dim=-1)
        mask = torch.cat([mask, torch.ones_like(cont)], dim=1)
    out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return head(out.last_hidden_state).float()


def drop_front_weights(loaded) -> None:
    """Put every parameter outside the decoder (the vision tower and projector, and the token embedding
    table unless the lm_head is that table) on the meta device. For a model kept only for decoder forwards
    fed embeddings (the gate's PyTorch reference, held through quantization): at 7B these are gigabytes
    of fp32 that nothing reads any more. The model cannot see images or embed ids after this."""
    family, model = loaded.family, loaded.model
    head = family.lm_head(model)
    keep = {id(p) for m in (family.language_model(model), head) for p in m.parameters()}
    table = family.embed_tokens(model).weight
    if table is not head.weight:
        keep.discard(id(table))
    for sub in model.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta and id(p) not in keep:
                sub._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)


def expand_image_tokens(input_ids, attention_mask, image_token_id: int, num_image_tokens: int, pad_token_id: int):
    """One placeholder per row -> M placeholders per row, re-left-padded: the input_ids HF LLaVA's generate
    expects (what LlavaProcessor emits). Returns (input_ids, attention_mask) as LongTensors [B, T - 1 + M].
    """
    ids = _as_long(input_ids)
    mask = torch.ones_like(ids) if attention_mask is None else _as_long(attention_mask)
    image_position(ids, image_token_id)  # validates: exactly one per row
    rows = []
    for row, row_mask in zip(ids, mask, strict=True):
        real = row[row_mask.bool()].numpy()
        at = int(np.flatnonzero(real == image_token_id)[0])
        rows.append(np.concatenate([real[:at], np.full(num_image_tokens, image_token_id), real[at + 1:]]))
    out_ids, out_mask = left_pad(rows, pad_token_id)
    return torch.from_numpy(out_ids), torch.from_numpy(out_mask)


class DecoderWithCache(torch.nn.Module):
    """inputs_embeds, attention_mask, position_ids, flat past -> logits, flat present (decoder.onnx's IO)."""

    def __init__(self, language_model, lm_head, num_layers: int, last_logits_only: bool = False):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.num_layers = num_layers
        self.last_logits_only = last_logits_only

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **cache_kwargs(self.language_model, cache),
        )
        hidden = out.last_hidden_state
        if self.last_logits_only:
            # Left padding puts every row's last real token at the last slot, so this is the
            # next-token position for the whole batch; it avoids materialising [B, L, vocab].
            hidden = hidden[:, -1:, :]
        present = []
        for layer in cache.layers:  # updated in place: no need for the output's (renamed) cache field
            present += [layer.keys, layer.values]
        return (self.lm_head(hidden), *present)


def decoder_module(loaded, last_logits_only: bool = False) -> DecoderWithCache:
    family, model = loaded.family, loaded.model
    return DecoderWithCache(family.language_model(model), family.lm_head(model), loaded.dims.num_layers,
                            last_logits_only).eval()


class TorchBackend:
    """The source model behind decode.Backend, fp32, the artifact's graph IO names (from `manifest`):
    vision by the family's vision module, embed by anchored_inputs, decode by DecoderWithCache (one
    decoder layer's weights in memory at a time when the model is streamed). The cache is the flat
    list of present arrays, as OrtBackend's. `last_logits_only`: None = as the artifact's decoder graph;
    False returns every fed position's logits (the gate's reference feeds a whole continuation at once)."""

    name = "torch"

    def __init__(self, loaded, manifest: Manifest, last_logits_only: bool | None = None):
        self.loaded, self.manifest = loaded, manifest
        if last_logits_only is None:
            last_logits_only = manifest.graphs.decoder.notes.last_logits_only
        self.decoder = decoder_module(loaded, last_logits_only)

    @cached_property
    def vision_module(self) -> torch.nn.Module:
        """Built on first use: a backend that only decodes (the gate's reference) never needs the tower."""
        return self.loaded.family.vision_module(self.loaded.model).eval()

    @torch.no_grad()
    def vision(self, feeds: dict) -> np.ndarray:
        return self.vision_module(*(torch.from_numpy(np.asarray(feeds[n]))
                                    for n in self.manifest.graphs.vision.input_names)).numpy()

    def embed(self, feeds: dict) -> dict:
        ids, mask, features, threshold = (feeds[n] for n in self.manifest.graphs.embedding.input_names[:4])
        anchor = self.manifest.anchor
        outputs = anchored_inputs(self.loaded, ids, mask, None, float(threshold), anchor.mode, anchor.max_anchors,
                                  features=torch.from_numpy(np.asarray(features)),
                                  excluded_token_ids=anchor.excluded_token_ids)
        names = self.manifest.graphs.embedding.output_names
        return {n: np.asarray(t.detach().float() if t.is_floating_point() else t) for n, t in zip(names, outputs)}

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        dims = self.manifest.dims
        return [np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), np.float32)] * (2 * dims.num_layers)

    def copy_cache(self, cache) -> list[np.ndarray]:
        return list(cache)

    @torch.no_grad()
    def decode(self, inputs_embeds, attention_mask, position_ids, cache):
        outs = self.decoder(torch.from_numpy(np.asarray(inputs_embeds, np.float32)),
                            torch.from_numpy(np.asarray(attention_mask, np.int64)),
                            torch.from_numpy(np.asarray(position_ids, np.int64)),
                            tuple(torch.from_numpy(np.asarray(c)) for c in cache))
        return outs[0].numpy(), [o.numpy() for o in outs[1:]]

    def release(self, *graphs: str) -> None:
        """Nothing to give back: the modules are the loaded model's (OrtBackend.release closes sessions)."""

    def close(self) -> None:
        pass


__all__ = ["DecoderWithCache", "TorchBackend", "anchored_inputs", "decoder_module", "drop_front_weights",
           "expand_image_tokens",
           "greedy_generate", "image_features", "image_position", "teacher_forced_logits"]
