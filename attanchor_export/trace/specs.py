"""Every graph's inputs, outputs and dynamic axes, declared once.

The exporter traces with these names, writes them into manifest.json, and the validator
and the TensorRT build plan read them back, so a name or axis changes in one place only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attanchor_runtime.manifest import kv_names  # the runtime reads these names: one definition

# Symbolic dimension names shared by every graph; the runtime and the TensorRT profiles key on them.
BATCH, HEIGHT, WIDTH = "batch", "height", "width"
TEXT_LEN, SEQ_LEN, PAST_LEN, TOTAL_LEN = "text_len", "seq_len", "past_len", "total_len"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[str | int, ...]  # str = symbolic (dynamic) axis, int = fixed

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str  # "vision" | "embedding" | "decoder"
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            **({"notes": self.notes} if self.notes else {}),
        }


def vision_spec(dims) -> GraphSpec:
    return GraphSpec(
        "vision",
        "vision.onnx",
        inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, dims.image_size, dims.image_size)),),
        outputs=(TensorSpec("image_features", "float32", (BATCH, dims.image_tokens, dims.hidden_size)),),
    )


def embedding_spec(dims, max_anchors: int | None) -> GraphSpec:
    # With a budget K the output length is T - 1 + M + K: static given the input shapes.
    seq = f"{TEXT_LEN} - 1 + {dims.image_tokens} + {max_anchors}" if max_anchors else SEQ_LEN
    return GraphSpec(
        "embedding",
        "embedding.onnx",
        inputs=(
            TensorSpec("input_ids", "int64", (BATCH, TEXT_LEN)),
            TensorSpec("text_attention_mask", "int64", (BATCH, TEXT_LEN)),
            TensorSpec("image_features", "float32", (BATCH, dims.image_tokens, dims.hidden_size)),
            TensorSpec("threshold", "float32", ()),
        ),
        outputs=(
            TensorSpec("inputs_embeds", "float32", (BATCH, seq, dims.hidden_size)),
            TensorSpec("attention_mask", "int64", (BATCH, seq)),
            TensorSpec("position_ids", "int64", (BATCH, seq)),
            TensorSpec("gather_index", "int64", (BATCH, seq)),
        ),
        notes={"data_dependent_shapes": not max_anchors},
    )


def decoder_spec(dims, last_logits_only: bool = False) -> GraphSpec:
    kv_shape = (BATCH, dims.num_kv_heads, PAST_LEN, dims.head_dim)
    present_shape = (BATCH, dims.num_kv_heads, TOTAL_LEN, dims.head_dim)
    return GraphSpec(
        "decoder",
        "decoder.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float32", (BATCH, SEQ_LEN, dims.hidden_size)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL_LEN)),
            TensorSpec("position_ids", "int64", (BATCH, SEQ_LEN)),
            *(TensorSpec(n, "float32", kv_shape) for n in kv_names(dims.num_layers, "past_key_values")),
        ),
        outputs=(
            TensorSpec("logits", "float32", (BATCH, 1 if last_logits_only else SEQ_LEN, dims.vocab_size)),
            *(TensorSpec(n, "float32", present_shape) for n in kv_names(dims.num_layers, "present")),
        ),
        notes={"last_logits_only": last_logits_only},
    )
