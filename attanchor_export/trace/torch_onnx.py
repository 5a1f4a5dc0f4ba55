"""One way to trace a torch module to ONNX, shared by the vision and decoder exports.

torch.onnx's dynamo exporter, always: the TorchScript exporter cannot trace DynamicCache and bakes
traced lengths into graphs that then match only at the traced shape.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from attanchor_export.trace.specs import GraphSpec


def trace_to_onnx(module: torch.nn.Module, args: tuple, dynamic_shapes: dict, spec: GraphSpec, path: Path,
                  opset: int) -> None:
    """Export with the spec's input/output names; weights go to `<file>.data` (external data)."""
    module.eval()
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            args,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)


@contextmanager
def _quiet_exporter():
    """The exporter's warnings (torchvision ops skipped, axis renames, deprecations) say nothing to a
    user of this tool; real failures still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
