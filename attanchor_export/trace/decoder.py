"""decoder.onnx: the language model with explicit position ids and a flat KV cache.

One graph serves prefill (past_len 0) and decode (seq_len 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import Dim

from attanchor_export.load.hf_compat import cache_kwargs
from attanchor_export.trace.specs import BATCH, PAST_LEN, SEQ_LEN, TOTAL_LEN, GraphSpec, kv_names
from attanchor_export.trace.torch_onnx import trace_to_onnx


class DecoderWithCache(torch.nn.Module):
    """inputs_embeds, attention_mask, position_ids, flat past -> logits, flat present."""

    def __init__(self, language_model, lm_head, num_layers: int, last_logits_only: bool = False):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.num_layers = num_layers
        self.last_logits_only = last_logits_only

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers.cache_utils import DynamicCache

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


def example_inputs(dims, batch=2, seq=5, past=3, dtype=torch.float32):
    """Trace inputs whose sizes are all >= 2 and distinct, so no axis is specialised to a constant."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, seq, dims.hidden_size, generator=g, dtype=dtype)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = tuple(
        torch.randn(batch, dims.num_kv_heads, past, dims.head_dim, generator=g, dtype=dtype)
        for _ in range(2 * dims.num_layers)
    )
    return embeds, mask, positions, kv


def export_decoder(language_model, lm_head, dims, spec: GraphSpec, path: Path, opset: int, streamed=None) -> None:
    """`streamed`: the load.streamed.StreamedModel the modules belong to (traced on meta, weights streamed)."""
    module = DecoderWithCache(language_model, lm_head, dims.num_layers, spec.notes.get("last_logits_only", False))
    batch, seq, past, total = Dim(BATCH), Dim(SEQ_LEN), Dim(PAST_LEN, min=0), Dim(TOTAL_LEN)
    dynamic_shapes = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        # One tuple of dims for the whole *past argument: dynamic_shapes mirrors the argument structure.
        "past": tuple({0: batch, 2: past} for _ in range(2 * dims.num_layers)),
    }
    trace_to_onnx(module, example_inputs(dims), dynamic_shapes, spec, path, opset, streamed=streamed)


__all__ = ["DecoderWithCache", "export_decoder", "example_inputs", "kv_names"]
