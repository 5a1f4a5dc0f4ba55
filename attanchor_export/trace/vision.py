"""vision.onnx: the vision graph's inputs -> projected image features (the family's vision module).

Where the family gives the tower's encoder layers as a plain stack (families.base.LayerStack: LLaVA's
CLIP and SigLIP towers), the module is traced at TRACED_DEPTH layers and layer 1 repeated to the depth
the graph runs (trace/layer_repeat.py), as for the decoder: torch.export and onnxscript's optimizer cost
per layer, and CLIP-L/336 runs 23. Where the trace is not shaped for it, or
ATTANCHOR_TRACE_EVERY_LAYER=1, every layer is traced. Validation judges the graph against PyTorch either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from attanchor_runtime.manifest import GraphSpec

from attanchor_export.trace.layer_repeat import (
    TRACED_DEPTH,
    LayerRepeatUnavailable,
    every_layer,
    layer_weights,
    layers_prefix,
    repeat_layer,
)
from attanchor_export.trace.torch_onnx import dynamic_axes, trace_to_onnx

log = logging.getLogger(__name__)


def export_vision(family, model, spec: GraphSpec, path: Path, opset: int, steps=None) -> None:
    module = family.vision_module(model)
    shapes = family.vision_dynamic_shapes(spec)
    if shapes is None:  # one Dim per symbolic axis; equal names share one, so equal names are equal sizes
        shared: dict = {}
        shapes = {name: dynamic_axes(spec, name, shared) for name in spec.input_names}
    args = family.vision_example_inputs()
    stack = family.vision_layer_stack(module)
    if stack is not None and stack.depth > TRACED_DEPTH and not every_layer():
        try:
            prefix = layers_prefix(module, stack.layers)
            weights = layer_weights(stack.layers, prefix)

            def grow_graph(graph):
                repeat_layer(graph, stack.depth, prefix, weights)

            with stack.at_depth(TRACED_DEPTH):
                trace_to_onnx(module, args, shapes, spec, path, opset, steps=steps, what="vision graph",
                              grow=(f"vision graph: layer 1 repeated to {stack.depth} layers", grow_graph))
            return
        except LayerRepeatUnavailable as e:
            log.warning("tracing every vision layer: the %d-layer trace cannot be repeated (%s)", TRACED_DEPTH, e)
    trace_to_onnx(module, args, shapes, spec, path, opset, steps=steps, what="vision graph")
