"""Which checkpoints we can export, and how to split each into vision / embedding / decoder / head.

In the spirit of llama.cpp's convert_hf_to_gguf.py: one small adapter class per architecture name
(config.architectures[0]), registered with @register. An adapter is built from the config alone
(so benchmark configs get `dims` without weights); its methods take the loaded model and return
the pieces the exporter traces and the PyTorch reference runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from attanchor_export.errors import UnsupportedArchitecture

_ADAPTERS: dict[str, type[Adapter]] = {}


def register(*architectures: str):
    """Class decorator: make `cls` the adapter for the given config.architectures names."""

    def wrap(cls):
        for name in architectures:
            _ADAPTERS[name] = cls
        cls.architectures = architectures
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def architecture_of(config) -> str:
    """config.architectures[0]; a config built in memory has none, so fall back to model_type."""
    names = getattr(config, "architectures", None) or []
    if names:
        return names[0]
    return {"llava": "LlavaForConditionalGeneration"}.get(getattr(config, "model_type", ""), str(config.model_type))


def adapter_for(config) -> Adapter:
    """The adapter for `config`, or UnsupportedArchitecture naming it and what is supported."""
    name = architecture_of(config)
    cls = _ADAPTERS.get(name)
    if cls is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {name}; supported: {', '.join(supported_architectures())}"
        )
    return cls(config)


@dataclass(frozen=True)
class ModelDims:
    """The numbers every graph, manifest and runtime agree on."""

    hidden_size: int  # decoder width D (image features are projected to it)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_tokens: int  # M: image features per image after feature selection
    image_size: int  # square input side, pixels
    patch_size: int
    vision_hidden_size: int
    image_token_id: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None  # the first of eos_token_ids
    eos_token_ids: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


class Adapter:
    """Base: subclasses say where the pieces live in one transformers model class."""

    architectures: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config

    @property
    def architecture(self) -> str:
        return architecture_of(self.config)

    def model_class(self):
        """The transformers class that loads this checkpoint."""
        import transformers

        return getattr(transformers, self.architectures[0])


# Vision towers: how to get hidden_states[0] (the input of encoder layer 0, what HF's output_hidden_states
# records first) and whether the sequence starts with a CLS token. Keyed by vision_config.model_type.
def _clip_stem(tower, pixel_values):
    return tower.pre_layrnorm(tower.embeddings(pixel_values))


def _siglip_stem(tower, pixel_values):
    return tower.embeddings(pixel_values)


_VISION_TOWERS = {
    "clip_vision_model": (_clip_stem, True),
    "siglip_vision_model": (_siglip_stem, False),
}
_TEXT_MODELS = ("llama", "qwen2", "mistral")  # decoders whose forward takes inputs_embeds + position_ids + a Cache


class VisionEncoder(nn.Module):
    """pixel_values [B,3,H,W] -> image features [B,M,D]: tower, feature layer(s), select strategy, projector.

    Mirrors LlavaModel.get_image_features (transformers 5.23) step by step, but runs encoder layers
    explicitly and only as deep as the deepest selected layer: feature layer -2 skips the last layer
    (what HF computes and throws away), and no output-capturing hooks end up in traced graphs.
    """

    def __init__(self, tower, projector, stem, feature_layer, select_strategy: str):
        super().__init__()
        self.tower = getattr(tower, "vision_model", tower)  # older layouts wrap the transformer once more
        self.projector = projector
        self._stem = stem
        layers = self.tower.encoder.layers
        count = len(layers) + 1  # hidden_states = [stem output] + one per layer
        self.feature_layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        for i in self.feature_layers:
            if not -count <= i < count:
                raise UnsupportedArchitecture(f"vision_feature_layer {i} out of range for a {count - 1}-layer tower")
        self.resolved = [i % count for i in self.feature_layers]
        self.depth = max(self.resolved)  # encoder layers to run
        self.drop_first = select_strategy == "default"  # HF drops token 0 (CLS, or SigLIP's first patch)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self._stem(self.tower, pixel_values)
        states = [hidden]
        for layer in self.tower.encoder.layers[: self.depth]:
            hidden = layer(hidden, None)
            states.append(hidden)
        picked = [states[i] for i in self.resolved]
        if self.drop_first:
            picked = [h[:, 1:] for h in picked]
        selected = picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
        return self.projector(selected)


@register("LlavaForConditionalGeneration")
class LlavaAdapter(Adapter):
    """LLaVA-1.5 style: model.model.{vision_tower, multi_modal_projector, language_model} + model.lm_head."""

    def __init__(self, config):
        super().__init__(config)
        vision_type = config.vision_config.model_type
        text_type = config.text_config.model_type
        if vision_type not in _VISION_TOWERS:
            raise UnsupportedArchitecture(
                f"unsupported vision tower {vision_type} in {self.architecture}; "
                f"supported: {', '.join(sorted(_VISION_TOWERS))}"
            )
        if text_type not in _TEXT_MODELS:
            raise UnsupportedArchitecture(
                f"unsupported text model {text_type} in {self.architecture}; supported: {', '.join(_TEXT_MODELS)}"
            )
        self.stem, self.has_cls = _VISION_TOWERS[vision_type]
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy

    def vision_tower_and_projector(self, model) -> VisionEncoder:
        return VisionEncoder(
            model.model.vision_tower, model.model.multi_modal_projector, self.stem,
            self.feature_layer, self.select_strategy,
        )

    def decoder_layers(self, model) -> nn.ModuleList:
        return self.language_model(model).layers

    def language_model(self, model) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model) -> nn.Module:
        return model.lm_head

    def embed_tokens(self, model) -> nn.Embedding:
        return model.model.language_model.get_input_embeddings()

    @property
    def dims(self) -> ModelDims:
        c, text, vision = self.config, self.config.text_config, self.config.vision_config
        heads = text.num_attention_heads
        patches = (vision.image_size // vision.patch_size) ** 2
        image_tokens = patches + int(self.has_cls) - int(self.select_strategy == "default")

        def token_id(name):  # v5 keeps special ids on the text config; older configs also had them on top
            value = getattr(text, name, None)
            return getattr(c, name, None) if value is None else value

        eos = token_id("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return ModelDims(
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
            image_tokens=image_tokens,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_hidden_size=vision.hidden_size,
            image_token_id=c.image_token_id,
            pad_token_id=token_id("pad_token_id"),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=eos_ids[0] if eos_ids else None,
            eos_token_ids=eos_ids,
            max_position_embeddings=text.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )
