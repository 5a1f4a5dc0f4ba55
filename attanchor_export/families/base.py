"""What a model family provides on the exporter side, and the registry that picks one from a config.

A family is the one place that knows a model class: how to load it (`model_class`), its numbers
(`dims`, `tokens`), the vision module to trace and its example inputs, every graph's inputs, outputs
and dynamic axes (`graph_specs`, declared once as optimum's OnnxConfig does: the trace, the manifest,
the runtime and the TensorRT plan read them), how the embedding graph computes position ids (in ONNX
and in numpy for the PyTorch side), the manifest's family section (preprocessing, position scheme),
and the PyTorch pieces every comparison runs (language_model, lm_head, embed_tokens, decoder_layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
from attanchor_graphs.specification import position_ids_from_mask
from attanchor_runtime.manifest import (
    BATCH,
    LOGITS_TO_KEEP,
    PAST_LEN,
    PAST_PREFIX,
    PRESENT_PREFIX,
    SEQ_LEN,
    TEXT_LEN,
    TOTAL_LEN,
    Dims,
    Family,
    GraphNotes,
    Graphs,
    GraphSpec,
    TensorSpec,
)
from onnx import TensorProto, helper

from attanchor_export.errors import UnsupportedArchitecture

_FAMILIES: dict[str, type[ModelFamily]] = {}  # config.architectures[0] -> family


class LayerStack(NamedTuple):
    """A vision module's encoder layers as a plain stack: vision.onnx may be traced at two of them and the
    second repeated (trace/vision.py, trace/layer_repeat.py)."""

    layers: Sequence  # the tower's encoder layers, by index (an nn.ModuleList)
    depth: int  # how many of them the graph runs, from the first
    at_depth: Callable[[int], AbstractContextManager]  # the module running only the first n, reading the last


def register(*architectures: str):
    """Class decorator: `cls` exports checkpoints whose config.architectures[0] is one of `architectures`."""

    def wrap(cls):
        for name in architectures:
            _FAMILIES[name] = cls
        cls.architectures = architectures
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def architecture_of(config) -> str:
    """config.architectures[0]; a config built in memory has none, so fall back to model_type."""
    names = getattr(config, "architectures", None) or []
    if names:
        return names[0]
    model_type = str(getattr(config, "model_type", ""))
    return next((a for a, cls in _FAMILIES.items() if model_type in cls.model_types), model_type)


def family_for(config) -> ModelFamily:
    """The family for `config`, or UnsupportedArchitecture naming it and what is supported."""
    name = architecture_of(config)
    cls = _FAMILIES.get(name)
    if cls is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {name}; supported: {', '.join(supported_architectures())}"
        )
    return cls(config)


@dataclass(frozen=True)
class SpecialTokens:
    """The prompt's special ids as the checkpoint's config gives them (the manifest's `text` records them)."""

    image_token_id: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


# ---- graph specs: the IO every family shares, with its position ids shape as the family's hook -------


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """{prefix}.{i}.key/value for every layer, interleaved (PAST_PREFIX: decoder inputs; PRESENT_PREFIX:
    outputs). Readers take them from the manifest (GraphSpec.past_names / present_names)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def embedding_spec(dims: Dims, max_anchors: int | None, positions: tuple = (BATCH, SEQ_LEN)) -> GraphSpec:
    """embedding.onnx. `positions`: the position_ids shape, SEQ_LEN standing for the output length."""
    # With a budget K the output length is T - 1 + M + K: static given the input shapes.
    seq = f"{TEXT_LEN} - 1 + {dims.image_tokens} + {max_anchors}" if max_anchors else SEQ_LEN
    return GraphSpec(
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
            TensorSpec("position_ids", "int64", tuple(seq if d == SEQ_LEN else d for d in positions)),
            TensorSpec("gather_index", "int64", (BATCH, seq)),
        ),
        notes=GraphNotes(data_dependent_shapes=not max_anchors),
    )


def decoder_spec(dims: Dims, last_logits_only: bool = False, positions: tuple = (BATCH, SEQ_LEN)) -> GraphSpec:
    """decoder.onnx: inputs_embeds, attention_mask, position_ids, the flat KV cache -> logits, present."""
    kv_shape = (BATCH, dims.num_kv_heads, PAST_LEN, dims.head_dim)
    present_shape = (BATCH, dims.num_kv_heads, TOTAL_LEN, dims.head_dim)
    return GraphSpec(
        "decoder.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float32", (BATCH, SEQ_LEN, dims.hidden_size)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL_LEN)),
            TensorSpec("position_ids", "int64", positions),
            *(TensorSpec(n, "float32", kv_shape) for n in kv_names(dims.num_layers, PAST_PREFIX)),
        ),
        outputs=(
            TensorSpec("logits", "float32", (BATCH, 1 if last_logits_only else SEQ_LEN, dims.vocab_size)),
            *(TensorSpec(n, "float32", present_shape) for n in kv_names(dims.num_layers, PRESENT_PREFIX)),
        ),
        notes=GraphNotes(last_logits_only=last_logits_only,
                         logits_to_keep=None if last_logits_only else LOGITS_TO_KEEP),
    )


class ModelFamily:
    """Base: a subclass says where the pieces live in one transformers model class (see the module doc)."""

    name: ClassVar[str] = ""  # the manifest's family.name: the runtime adapter that runs the artifact
    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values of in-memory configs
    position_shape: ClassVar[tuple] = (BATCH, SEQ_LEN)  # position_ids of the embedding and decoder graphs
    default_threshold: ClassVar[float] = 0.12  # anchor threshold when neither the user nor the checkpoint sets one

    def __init__(self, config):
        self.config = config

    def configure(self, folder=None, image_size=None, artifact=None) -> None:
        """Settings beyond the config: `folder` holds the checkpoint's processor files, `image_size` is
        --image-size, `artifact` the manifest's family section when reloading an artifact's source.
        Default: the vision tower fixes the image size, so --image-size is refused."""
        if image_size is not None:
            raise UnsupportedArchitecture(f"--image-size does not apply to {self.architecture}: its vision tower "
                                          "fixes the image size")

    @property
    def architecture(self) -> str:
        return architecture_of(self.config)

    def model_class(self):
        """The transformers class that loads this checkpoint."""
        import transformers

        return getattr(transformers, self.architectures[0])

    # -- numbers -------------------------------------------------------------------------------------
    @property
    def dims(self) -> Dims:
        raise NotImplementedError

    @property
    def tokens(self) -> SpecialTokens:
        raise NotImplementedError

    # -- graphs --------------------------------------------------------------------------------------
    def vision_spec(self) -> GraphSpec:
        raise NotImplementedError

    def graph_specs(self, max_anchors: int | None, last_logits_only: bool) -> Graphs:
        return Graphs(self.vision_spec(), embedding_spec(self.dims, max_anchors, self.position_shape),
                      decoder_spec(self.dims, last_logits_only, self.position_shape))

    def vision_module(self, model):
        """The torch module vision.onnx is traced from: the vision graph's inputs -> image features."""
        raise NotImplementedError

    def vision_example_inputs(self) -> tuple:
        """Trace inputs for vision_module (batch 2: a batch of 1 would be specialised to a constant)."""
        raise NotImplementedError

    def vision_layer_stack(self, vision_module) -> LayerStack | None:
        """vision_module's layers where every one the graph runs is alike and the graph reads only the last
        one run, so the trace may stop at two and repeat the second. None (default): trace every layer."""
        return None

    def vision_dynamic_shapes(self, spec: GraphSpec) -> dict | None:
        """torch.export's dynamic shapes of the vision inputs, where the spec's symbolic axes do not say them
        (Qwen2.5-VL: pixel rows are a multiple of the patches per image). None (default): one Dim per
        symbolic axis of the spec (trace.vision)."""
        return None

    def position_nodes(self, mask: str, out: str, mode: str = "t2i") -> tuple[list, list]:
        """(nodes, initializers) the embedding graph computes `out` (position_ids) with from `mask` (the
        anchored attention mask); a family may also read the graph's values gather_index,
        text_attention_mask, image_position and text_embeds by name. Default: HF's 1-D positions,
        cumsum(mask) - 1 and 1 on padding."""
        const = helper.make_tensor
        nodes = [
            # CumSum in float32: TensorRT's CumSum takes float types only; counts stay exact below 2^24.
            helper.make_node("Cast", [mask], ["positions_mask_float"], to=TensorProto.FLOAT),
            helper.make_node("CumSum", ["positions_mask_float", "positions_axis"], ["positions_cumsum_float"]),
            helper.make_node("Cast", ["positions_cumsum_float"], ["positions_cumsum"], to=TensorProto.INT64),
            helper.make_node("Sub", ["positions_cumsum", "positions_one"], ["positions_raw"]),
            helper.make_node("Equal", [mask, "positions_zero"], ["positions_is_pad"]),
            helper.make_node("Where", ["positions_is_pad", "positions_one", "positions_raw"], [out]),
        ]
        initializers = [const("positions_zero", TensorProto.INT64, [], [0]),
                        const("positions_one", TensorProto.INT64, [], [1]),
                        const("positions_axis", TensorProto.INT64, [1], [1])]
        return nodes, initializers

    def position_ids(self, attention_mask: np.ndarray, gather_index: np.ndarray, text_attention_mask=None,
                     image_position=None, mode: str = "t2i") -> np.ndarray:
        """What position_nodes computes, in numpy (the PyTorch side of every comparison)."""
        return position_ids_from_mask(attention_mask)

    def generate_image_inputs(self, pixels: np.ndarray, input_ids) -> dict:
        """What transformers' generate takes beside input_ids for these pixels (the runtime family's
        example_pixels layout) and ids with the image placeholders expanded, as the processor returns it."""
        import torch

        return {"pixel_values": torch.from_numpy(np.asarray(pixels))}

    # -- the manifest's family section ---------------------------------------------------------------
    def manifest_section(self, processor_folder) -> Family:
        """name, architecture, model types and the family's payload, read from the processor files."""
        raise NotImplementedError

    # -- the PyTorch pieces --------------------------------------------------------------------------
    def language_model(self, model):
        raise NotImplementedError

    def lm_head(self, model):
        raise NotImplementedError

    def embed_tokens(self, model):
        return self.language_model(model).get_input_embeddings()

    def decoder_layers(self, model):
        return self.language_model(model).layers


__all__ = ["ModelFamily", "SpecialTokens", "architecture_of", "decoder_spec", "embedding_spec", "family_for",
           "register", "supported_architectures"]
