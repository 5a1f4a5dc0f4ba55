"""decoder.onnx: the language model with explicit position ids and a flat KV cache.

One graph serves prefill (past_len 0) and decode (seq_len 1). The traced module is the source model's
DecoderWithCache, so PyTorch runs exactly what was traced.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from attanchor_runtime.manifest import GraphSpec

from attanchor_export.source_model import DecoderWithCache
from attanchor_export.trace.layer_repeat import (
    TRACED_DEPTH,
    LayerRepeatUnavailable,
    every_layer,
    fewer_layers,
    layer_weights,
    layers_prefix,
    order_io,
    repeat_layer,
    spec_at_depth,
)
from attanchor_export.trace.logits_to_keep import add_logits_to_keep
from attanchor_export.trace.torch_onnx import dynamic_axes, trace_to_onnx

log = logging.getLogger(__name__)


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
    `steps`: the export's progress reporter (trace_to_onnx reports its phases). A decoder deeper than
    TRACED_DEPTH is traced at that depth and its layer 1 repeated (trace/layer_repeat.py), unless the
    trace is not shaped for it or ATTANCHOR_TRACE_EVERY_LAYER=1: then every layer is traced. Where the
    spec names a logits_to_keep input, the graph gets it (trace/logits_to_keep.py)."""
    traced = False
    if dims.num_layers > TRACED_DEPTH and not every_layer():
        try:
            _trace(language_model, lm_head, dims, spec, path, opset, streamed, steps, TRACED_DEPTH)
            traced = True
        except LayerRepeatUnavailable as e:
            log.warning("tracing every decoder layer: the %d-layer trace cannot be repeated (%s)", TRACED_DEPTH, e)
    if not traced:
        _trace(language_model, lm_head, dims, spec, path, opset, streamed, steps, dims.num_layers)
    if spec.notes.logits_to_keep:
        add_logits_to_keep(Path(path), spec.notes.logits_to_keep, spec.output_names[0])


def _trace(language_model, lm_head, dims, spec, path, opset, streamed, steps, depth: int) -> None:
    traced_spec = spec if depth == dims.num_layers else spec_at_depth(spec, depth)
    module = DecoderWithCache(language_model, lm_head, depth, spec.notes.last_logits_only)
    shared: dict = {}  # symbol -> torch Dim, so equal names are equal sizes
    embeds, mask, positions = (n for n in traced_spec.input_names if n not in traced_spec.past_names)
    dynamic_shapes = {
        "inputs_embeds": dynamic_axes(traced_spec, embeds, shared),
        "attention_mask": dynamic_axes(traced_spec, mask, shared),
        "position_ids": dynamic_axes(traced_spec, positions, shared),
        # One tuple of dims for the whole *past argument: dynamic_shapes mirrors the argument structure.
        "past": tuple(dynamic_axes(traced_spec, n, shared) for n in traced_spec.past_names),
    }
    args = example_inputs(dataclasses.replace(dims, num_layers=depth))
    shape = traced_spec.input(positions).shape
    if len(shape) == 3:  # sections first ([3, B, S], M-RoPE): distinct per section, so none is merged
        args = (args[0], args[1], torch.stack([args[2] + i for i in range(int(shape[0]))]), args[3])
    grow = None
    if depth < dims.num_layers:
        prefix = layers_prefix(module, language_model.layers)
        full_layers = list(language_model.layers)

        def grow_graph(model):
            repeat_layer(model, dims.num_layers, prefix, layer_weights(full_layers, prefix, streamed))
            order_io(model, spec)

        grow = (f"decoder graph: layer 1 repeated to {dims.num_layers} layers", grow_graph)
    with fewer_layers(language_model, depth):
        trace_to_onnx(module, args, dynamic_shapes, traced_spec, path, opset, streamed=streamed, steps=steps,
                      what="decoder graph", grow=grow)


__all__ = ["example_inputs", "export_decoder"]
