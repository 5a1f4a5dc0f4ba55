"""AnchorInsert as an ONNX model-local function, its numpy specification, and graph passes.

Depends on onnx and numpy only, so both the exporter and the torch-free runtime can use it.
"""

from .function import (
    DOMAIN,
    DOMAIN_VERSION,
    FUNCTION_INPUTS_V2,
    FUNCTION_OPS,
    OP_VERSIONS,
    OPNAME,
    OPSET,
    anchor_insert_function,
    make_anchor_node,
)
from .model import MODEL_INPUTS, MODEL_INPUTS_V2, MODEL_OUTPUTS, build_anchor_model, save_anchor_model
from .onnx_utils import ir_version_for_runtime
from .specification import (
    MODES,
    anchor_insert,
    anchor_pairs,
    candidate_mask_from_ids,
    cosine_scores,
    output_length,
    position_ids_from_mask,
)

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "FUNCTION_INPUTS_V2",
    "FUNCTION_OPS",
    "MODEL_INPUTS",
    "MODEL_INPUTS_V2",
    "MODEL_OUTPUTS",
    "MODES",
    "OPNAME",
    "OP_VERSIONS",
    "OPSET",
    "anchor_insert",
    "anchor_insert_function",
    "anchor_pairs",
    "build_anchor_model",
    "candidate_mask_from_ids",
    "cosine_scores",
    "ir_version_for_runtime",
    "make_anchor_node",
    "output_length",
    "position_ids_from_mask",
    "save_anchor_model",
]
