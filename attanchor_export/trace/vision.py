"""vision.onnx: pixel_values -> projected image features (tower, feature layer, select, projector)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import Dim

from attanchor_export.trace.specs import BATCH, GraphSpec
from attanchor_export.trace.torch_onnx import trace_to_onnx


def export_vision(vision_module: torch.nn.Module, dims, spec: GraphSpec, path: Path, opset: int) -> None:
    # Batch 2 at trace time: a batch of 1 would be specialised to a constant by torch.export.
    pixels = torch.randn(2, 3, dims.image_size, dims.image_size, generator=torch.Generator().manual_seed(0))
    trace_to_onnx(vision_module, (pixels,), {"pixel_values": {0: Dim(BATCH)}}, spec, path, opset)
