"""LLaVA (LlavaForConditionalGeneration): a CLIP or SigLIP tower, a projector and a Llama / Qwen2 /
Mistral decoder; one image of M patches per prompt, 1-D positions.

model.model.{vision_tower, multi_modal_projector, language_model} + model.lm_head (transformers 5).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from attanchor_runtime.families.llava import LlavaPayload
from attanchor_runtime.manifest import BATCH, Dims, Family, GraphSpec, ModelTypes, TensorSpec, to_json
from attanchor_runtime.preprocess_from_hf import preprocessing_config_from_hf
from torch import nn

from attanchor_export.errors import ExportError, UnsupportedArchitecture
from attanchor_export.families.base import LayerStack, ModelFamily, SpecialTokens, register


# Vision towers: how to get hidden_states[0] (the input of encoder layer 0, what HF's output_hidden_states
# records first) and whether the sequence starts with a CLS token. Keyed by vision_config.model_type.
def _clip_stem(tower, pixel_values):
    return tower.pre_layrnorm(tower.embeddings(pixel_values))


def _siglip_stem(tower, pixel_values):
    return tower.embeddings(pixel_values)


VISION_TOWERS = {
    "clip_vision_model": (_clip_stem, True),
    "siglip_vision_model": (_siglip_stem, False),
}
TEXT_MODELS = ("llama", "qwen2", "mistral")  # decoders whose forward takes inputs_embeds + position_ids + a Cache


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

    @contextmanager
    def at_depth(self, depth: int):
        """Run only the first `depth` encoder layers and read the last of them (a trace at fewer layers;
        only where the module reads the last layer it runs, as layer_stack checks)."""
        saved = self.depth, self.resolved
        self.depth, self.resolved = depth, [depth]
        try:
            yield self
        finally:
            self.depth, self.resolved = saved

    def layer_stack(self) -> LayerStack | None:
        """The encoder layers as a stack where the one feature layer is the last layer run (-2 of CLIP-L,
        LLaVA's default); None where several layers are read (they are not one residual stream's end)."""
        if self.resolved != [self.depth]:
            return None
        return LayerStack(self.tower.encoder.layers, self.depth, self.at_depth)


def vision_spec(dims: Dims) -> GraphSpec:
    return GraphSpec(
        "vision.onnx",
        inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, dims.image_size, dims.image_size)),),
        outputs=(TensorSpec("image_features", "float32", (BATCH, dims.image_tokens, dims.hidden_size)),),
    )


@register("LlavaForConditionalGeneration")
class Llava(ModelFamily):
    name = "llava"
    model_types = ("llava",)

    def __init__(self, config):
        super().__init__(config)
        vision_type = config.vision_config.model_type
        text_type = config.text_config.model_type
        if vision_type not in VISION_TOWERS:
            raise UnsupportedArchitecture(
                f"unsupported vision tower {vision_type} in {self.architecture}; "
                f"supported: {', '.join(sorted(VISION_TOWERS))}"
            )
        if text_type not in TEXT_MODELS:
            raise UnsupportedArchitecture(
                f"unsupported text model {text_type} in {self.architecture}; supported: {', '.join(TEXT_MODELS)}"
            )
        self.stem, self.has_cls = VISION_TOWERS[vision_type]
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy

    # -- numbers -------------------------------------------------------------------------------------
    @property
    def dims(self) -> Dims:
        c, text, vision = self.config, self.config.text_config, self.config.vision_config
        heads = text.num_attention_heads
        patches = (vision.image_size // vision.patch_size) ** 2
        return Dims(
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
            image_tokens=patches + int(self.has_cls) - int(self.select_strategy == "default"),
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_hidden_size=vision.hidden_size,
            max_position_embeddings=text.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )

    @property
    def tokens(self) -> SpecialTokens:
        c, text = self.config, self.config.text_config

        def token_id(name):  # v5 keeps special ids on the text config; older configs also had them on top
            value = getattr(text, name, None)
            return getattr(c, name, None) if value is None else value

        eos = token_id("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return SpecialTokens(c.image_token_id, token_id("pad_token_id"), token_id("bos_token_id"), eos_ids)

    # -- graphs --------------------------------------------------------------------------------------
    def vision_spec(self) -> GraphSpec:
        return vision_spec(self.dims)

    def vision_module(self, model) -> VisionEncoder:
        return VisionEncoder(model.model.vision_tower, model.model.multi_modal_projector, self.stem,
                             self.feature_layer, self.select_strategy)

    def vision_layer_stack(self, vision_module: VisionEncoder) -> LayerStack | None:
        return vision_module.layer_stack()

    def vision_example_inputs(self) -> tuple:
        size = self.dims.image_size
        return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)

    # -- the manifest's family section ---------------------------------------------------------------
    def manifest_section(self, processor_folder) -> Family:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(str(processor_folder))
            preprocessing = preprocessing_config_from_hf(processor)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing processor
            raise ExportError(f"cannot load the image processor from {Path(processor_folder)}: "
                              f"{str(e).splitlines()[0]}") from None
        return Family(self.name, self.architecture,
                      ModelTypes(self.config.vision_config.model_type, self.config.text_config.model_type),
                      to_json(LlavaPayload(image_preprocessing=preprocessing, positions="sequential")))

    # -- the PyTorch pieces --------------------------------------------------------------------------
    def language_model(self, model) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model) -> nn.Module:
        return model.lm_head


__all__ = ["Llava", "VisionEncoder", "vision_spec"]
