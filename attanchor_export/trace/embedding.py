"""embedding.onnx, written node by node: token embedding, AnchorInsert, one Gather, position ids.

AnchorInsert is version 2: its candidate_mask (0 = never an anchor) is computed here from input_ids
and the excluded ids (the tokenizer's special tokens, attanchor_export.trace.candidates), which the
graph holds as the initializer `anchor_excluded_token_ids` and the manifest records.

No tracing: the graph is small and every op in it is chosen for ONNX Runtime and TensorRT alike.
The embedding table lives in embed_tokens.bin, which is this graph's external data and also the
file the runtime memory-maps to embed decode tokens without a second graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from attanchor_graphs import anchor_insert_function, make_anchor_node
from attanchor_graphs.function import DOMAIN as ANCHOR_DOMAIN
from attanchor_graphs.function import OPSET as ANCHOR_OPSET
from attanchor_runtime.manifest import EmbedTable, GraphSpec
from onnx import TensorProto, helper

TABLE_FILE = "embed_tokens.bin"
_ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}


def _value_info(t):
    dims = [d if isinstance(d, int) else (d if " " not in d else None) for d in t.shape]
    return helper.make_tensor_value_info(t.name, _ONNX_DTYPE[t.dtype], dims)


def write_embed_table(table: np.ndarray, folder: Path) -> EmbedTable:
    """Raw little-endian [vocab, hidden] table; returns its manifest entry."""
    table = np.ascontiguousarray(table)
    table.astype(table.dtype.newbyteorder("<"), copy=False).tofile(folder / TABLE_FILE)
    return EmbedTable(TABLE_FILE, str(table.dtype), tuple(table.shape))


def build_embedding_model(
    family,
    spec: GraphSpec,
    table: EmbedTable,
    image_token_id: int,
    mode: str,
    max_anchors: int | None,
    ir_version: int,
    excluded_token_ids=(),
) -> onnx.ModelProto:
    """The graph `spec` declares; `family` (attanchor_export.families) gives its position-id nodes."""
    vocab, hidden = table.shape
    # Never empty (a zero-length initializer is a shape some backends refuse): -1 matches no id.
    excluded = sorted({int(i) for i in excluded_token_ids}) or [-1]
    init = TensorProto()
    init.name = "embed_tokens.weight"
    init.data_type = _ONNX_DTYPE[table.dtype]
    init.dims.extend([vocab, hidden])
    init.data_location = TensorProto.EXTERNAL
    nbytes = vocab * hidden * np.dtype(table.dtype).itemsize
    for k, v in (("location", table.file), ("offset", "0"), ("length", str(nbytes))):
        init.external_data.add(key=k, value=v)

    # The four roles every family's embedding graph has, in this order; a family may declare more inputs
    # after them (its position nodes read them by name).
    input_ids, text_mask, image_features, threshold = spec.input_names[:4]
    inputs_embeds, attention_mask, position_ids, gather_index = spec.output_names[:4]
    position_nodes, position_initializers = family.position_nodes(attention_mask, position_ids, mode)
    const = helper.make_tensor
    nodes = [
        helper.make_node("Gather", ["embed_tokens.weight", input_ids], ["table_rows"], axis=0),
        # Math runs in float32 even when the table is stored in float16.
        helper.make_node("Cast", ["table_rows"], ["text_embeds"], to=TensorProto.FLOAT),
        # image_position = first index where input_ids == image_token_id (ReduceMin, not ArgMax:
        # ArgMax's tie order is not guaranteed by every backend).
        helper.make_node("Shape", [input_ids], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["text_len"], axis=0),
        helper.make_node("Range", ["zero", "text_len", "one"], ["text_arange"]),
        helper.make_node("Equal", [input_ids, "image_token_id"], ["is_image"]),
        helper.make_node("Where", ["is_image", "text_arange", "text_len"], ["image_candidates"]),
        helper.make_node("ReduceMin", ["image_candidates"], ["image_position"], axes=[1], keepdims=0),
        # candidate_mask = 1 unless the id is excluded: Equal against every excluded id [B, T, E],
        # counted over E (ReduceSum on int64; ReduceMax/Or over bool is not in every backend).
        helper.make_node("Unsqueeze", [input_ids, "axis_2"], ["ids_column"]),
        helper.make_node("Equal", ["ids_column", "anchor_excluded_token_ids"], ["is_excluded_each"]),
        helper.make_node("Cast", ["is_excluded_each"], ["is_excluded_count_each"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["is_excluded_count_each", "axis_2"], ["excluded_count"], keepdims=0),
        helper.make_node("Equal", ["excluded_count", "zero"], ["is_candidate"]),
        helper.make_node("Cast", ["is_candidate"], ["candidate_mask"], to=TensorProto.INT64),
        make_anchor_node(
            ["text_embeds", image_features, text_mask, "image_position", threshold, "candidate_mask"],
            [gather_index, attention_mask],
            mode=mode,
            max_anchors=max_anchors,
            version=2,
        ),
        # Fused embeddings: one flat Gather over concat(text, image) rows of the whole batch.
        helper.make_node("Concat", ["text_embeds", image_features], ["sources"], axis=1),
        helper.make_node("Shape", ["sources"], ["sources_shape"]),
        helper.make_node("Gather", ["sources_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Gather", ["sources_shape", "one"], ["rows_per_batch"], axis=0),
        helper.make_node("Reshape", ["sources", "flat_shape"], ["flat_sources"]),
        helper.make_node("Range", ["zero", "batch", "one"], ["batch_arange"]),
        helper.make_node("Mul", ["batch_arange", "rows_per_batch"], ["row_offsets"]),
        helper.make_node("Unsqueeze", ["row_offsets", "axis_1"], ["row_offsets_col"]),
        helper.make_node("Add", [gather_index, "row_offsets_col"], ["flat_index"]),
        helper.make_node("Gather", ["flat_sources", "flat_index"], [inputs_embeds], axis=0),
        # Position ids: the family's (LLaVA: cumsum(mask) - 1, and 1 on padding).
        *position_nodes,
    ]
    initializers = [
        init,
        const("zero", TensorProto.INT64, [], [0]),
        const("one", TensorProto.INT64, [], [1]),
        const("axis_1", TensorProto.INT64, [1], [1]),
        const("axis_2", TensorProto.INT64, [1], [2]),
        const("anchor_excluded_token_ids", TensorProto.INT64, [len(excluded)], excluded),
        const("image_token_id", TensorProto.INT64, [], [image_token_id]),
        const("flat_shape", TensorProto.INT64, [2], [-1, hidden]),
        *position_initializers,
    ]
    graph = helper.make_graph(
        nodes,
        "attanchor_embedding",
        [_value_info(t) for t in spec.inputs],
        [_value_info(t) for t in spec.outputs],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        # The graph shares the function body's opset: ONNX requires one version per domain per model.
        opset_imports=[helper.make_opsetid("", ANCHOR_OPSET), helper.make_opsetid(ANCHOR_DOMAIN, 2)],
        functions=[anchor_insert_function(mode, max_anchors, version=2)],
        producer_name="attanchor-export",
    )
    model.ir_version = ir_version
    return model


def save_embedding_model(model: onnx.ModelProto, path: Path) -> None:
    # Saved without touching external data: the initializer already points at embed_tokens.bin.
    path.write_bytes(model.SerializeToString())
