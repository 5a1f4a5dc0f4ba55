"""vision.onnx: pixel_values -> projected image features (tower, feature layer, select, projector)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import Dim

from .graph_specs import BATCH, GraphSpec


def export_vision(vision_module: torch.nn.Module, dims, spec: GraphSpec, path: Path, opset: int) -> None:
    vision_module.eval()
    # Batch 2 at trace time: a batch of 1 would be specialised to a constant by torch.export.
    pixels = torch.randn(2, 3, dims.image_size, dims.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.onnx.export(
            vision_module,
            (pixels,),
            dynamic_shapes={"pixel_values": {0: Dim(BATCH)}},
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
