"""decoder.onnx: the language model with explicit position ids and a flat KV cache.

One graph serves prefill (past_len 0) and decode (seq_len 1). The traced module is the source model's
DecoderWithCache, so PyTorch runs exactly what was traced.
"""

from __future__ import annotations

from pathlib import Path

import torch
from attanchor_runtime.manifest import GraphSpec

from attanchor_export.source_model import DecoderWithCache
from attanchor_export.trace.torch_onnx import dynamic_axes, trace_to_onnx


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


def export_decoder(language_model, lm_head, dims, spec: GraphSpec, path: Path, opset: int, streamed=None,
                   steps=None) -> None:
    """`streamed`: the load.streamed.StreamedModel the modules belong to (traced on meta, weights streamed).
    `steps`: the export's progress reporter (trace_to_onnx reports its phases)."""
    module = DecoderWithCache(language_model, lm_head, dims.num_layers, spec.notes.last_logits_only)
    shared: dict = {}  # symbol -> torch Dim, so equal names are equal sizes
    embeds, mask, positions = (n for n in spec.input_names if n not in spec.past_names)
    dynamic_shapes = {
        "inputs_embeds": dynamic_axes(spec, embeds, shared),
        "attention_mask": dynamic_axes(spec, mask, shared),
        "position_ids": dynamic_axes(spec, positions, shared),
        # One tuple of dims for the whole *past argument: dynamic_shapes mirrors the argument structure.
        "past": tuple(dynamic_axes(spec, n, shared) for n in spec.past_names),
    }
    args = example_inputs(dims)
    shape = spec.input(positions).shape
    if len(shape) == 3:  # sections first ([3, B, S], M-RoPE): distinct per section, so none is merged
        args = (args[0], args[1], torch.stack([args[2] + i for i in range(int(shape[0]))]), args[3])
    trace_to_onnx(module, args, dynamic_shapes, spec, path, opset, streamed=streamed, steps=steps,
                  what="decoder graph")


__all__ = ["example_inputs", "export_decoder"]
