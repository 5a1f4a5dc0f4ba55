"""vision.onnx: the vision graph's inputs -> projected image features (the family's vision module)."""

from __future__ import annotations

from pathlib import Path

from attanchor_runtime.manifest import GraphSpec

from attanchor_export.trace.torch_onnx import trace_to_onnx


def export_vision(family, model, spec: GraphSpec, path: Path, opset: int) -> None:
    shapes = family.vision_dynamic_shapes(spec)  # one Dim per symbolic axis, unless the family says otherwise
    trace_to_onnx(family.vision_module(model), family.vision_example_inputs(), shapes, spec, path, opset)
