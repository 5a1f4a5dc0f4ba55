"""A standalone ONNX model around one AnchorInsert node: for tests, Netron and backend checks."""

from __future__ import annotations

import os

import onnx
from onnx import TensorProto, helper

from .function import DOMAIN, OPSET, _check_version, anchor_insert_function, make_anchor_node
from .onnx_utils import ir_version_for_runtime
from .specification import check_budget, check_mode

__all__ = ["MODEL_INPUTS", "MODEL_INPUTS_V2", "MODEL_OUTPUTS", "build_anchor_model", "save_anchor_model"]

# The mask goes in as "text_attention_mask" because the output is "attention_mask" and an ONNX
# graph cannot use one name twice; same convention as embedding.onnx (docs/CONTRACTS.md).
MODEL_INPUTS = ("text_embeds", "image_features", "text_attention_mask", "image_position", "threshold")
MODEL_INPUTS_V2 = (*MODEL_INPUTS, "candidate_mask")
MODEL_OUTPUTS = ("gather_index", "attention_mask")


def build_anchor_model(
    mode: str = "t2i", max_anchors: int | None = None, ir_version: int | None = None, version: int = 1
) -> onnx.ModelProto:
    """Model: the AnchorInsert inputs (five; version 2: six, + candidate_mask) -> gather_index,
    attention_mask (int64 [B, L]).

    The function is attached as a model-local function, so any ONNX runtime can execute it.
    ``ir_version`` defaults to the highest one the installed onnxruntime accepts.
    """
    mode = check_mode(mode)
    k = check_budget(max_anchors)
    version = _check_version(version)
    inputs = [
        helper.make_tensor_value_info(MODEL_INPUTS[0], TensorProto.FLOAT, ["batch", "text_len", "hidden"]),
        helper.make_tensor_value_info(
            MODEL_INPUTS[1], TensorProto.FLOAT, ["batch", "image_tokens", "hidden"]
        ),
        helper.make_tensor_value_info(MODEL_INPUTS[2], TensorProto.INT64, ["batch", "text_len"]),
        helper.make_tensor_value_info(MODEL_INPUTS[3], TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(MODEL_INPUTS[4], TensorProto.FLOAT, []),
    ]
    if version == 2:
        inputs.append(helper.make_tensor_value_info(MODEL_INPUTS_V2[5], TensorProto.INT64, ["batch", "text_len"]))
    names = MODEL_INPUTS_V2 if version == 2 else MODEL_INPUTS
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq_len"]) for name in MODEL_OUTPUTS
    ]
    node = make_anchor_node(list(names), list(MODEL_OUTPUTS), mode=mode, max_anchors=k, version=version)
    budget = f"K={k}" if k else "no budget"
    graph = helper.make_graph(
        [node], f"anchor_insert_{mode}", inputs, outputs, doc_string=f"AnchorInsert {mode}, {budget}"
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", OPSET),
            helper.make_opsetid(DOMAIN, version),
        ],
        functions=[anchor_insert_function(mode, k, version)],
        ir_version=ir_version if ir_version is not None else ir_version_for_runtime(),
        producer_name="attanchor-export",
    )
    return model


def save_anchor_model(
    path: str | os.PathLike,
    mode: str = "t2i",
    max_anchors: int | None = None,
    ir_version: int | None = None,
    version: int = 1,
) -> onnx.ModelProto:
    """Build, check and write the standalone model (e.g. to look at the body in Netron)."""
    model = build_anchor_model(mode, max_anchors, ir_version, version)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, os.fspath(path))
    return model
