"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) on the exporter side: image size, graphs, positions.

Three graphs, in the layout onnxruntime-genai and transformers.js use for this model:
  vision.onnx     pixel_values [images * N, 1176] (the processor's patch rows, N per image at the export
                  grid) -> merged image features [images, M, D] (per image: what the embedding graph
                  takes; transformers' get_image_features concatenates them). The grid is fixed at export, so the
                  vision tower's 2-D rotary table and its window layout are constants of the graph:
                  window attention is full attention under a constant block mask (a token sees the
                  tokens of its own window), which is the same function as transformers' per-window
                  split without any reordering of tokens; full-attention blocks use no mask.
  embedding.onnx  as LLaVA's (trace.embedding: token embedding, AnchorInsert v2, one Gather) with 3-D
                  position ids [3, B, L] computed from AnchorInsert's gather_index by this family's
                  position_nodes (mrope_position_nodes; the numpy specification is
                  attanchor_runtime.families.qwen2_5_vl.mrope_position_ids).
  decoder.onnx    Qwen2 text model with explicit position_ids [3, B, S] and the KV cache, one graph for
                  prefill and decode (trace.decoder.DecoderWithCache, which passes them through).

Image size: `--image-size HxW` (multiples of patch x merge = 28); default the largest square side s
that is a multiple of 28 with s <= 448 and s * s <= the processor's max_pixels (default_image_size).
The family reads it in `configure` (the seam's hook for settings beyond the config); an artifact's
source is reloaded at the grid its manifest records.

Qwen2-VL (Qwen2VLForConditionalGeneration, the subclass Qwen2_VL at the end) differs only in its tower
(no windows, LayerNorm, quick-GELU MLP), which runs through the same VisionEncoder; its artifacts are
family qwen2_5_vl in the manifest (the same runtime adapter). What Qwen3-VL
(transformers' qwen3_vl) would change: the positions are the same (its get_rope_index numbers text and
image tokens by the same rules, so mrope_position_ids and the anchor contract carry over), but its
decoder interleaves the sections (frequency i takes h for i % 3 == 1 and w for i % 3 == 2 within
3 * section, t elsewhere; traced from the model, so only the rotary ops differ); its vision tower has no
windows, patch 16 (factor 32 for the image size) and learned position embeddings interpolated to the
grid (a constant table at a fixed grid); and DeepStack adds merged features of 3 intermediate vision
layers to the hidden states of the image tokens after the first 3 decoder layers. With anchors those
features would be gathered with the same gather_index (zero rows for text slots, so text copies get
none and i2t image copies get their patch's), as a second embedding output [3, B, L, D] and decoder
input (zeros for decode steps).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
from attanchor_runtime.families.qwen2_5_vl import ImageGrid
from torch import nn

from attanchor_export.errors import CheckpointError, ExportError, UnsupportedArchitecture
from attanchor_export.families.base import ModelFamily, SpecialTokens, register

DEFAULT_THRESHOLD = 0.08  # the paper's Qwen2.5-VL-3B setting (LLaVA models: 0.12)
MAX_DEFAULT_SIDE = 448  # the default export side never exceeds this (1,024 merged tokens would be 4x the cost)


# ------------------------------------------------------------------------------------- image size


def processor_pixel_range(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2VLImageProcessor(Pil), which keeps them in size.shortest_edge /
    size.longest_edge (transformers 5) or as min_pixels / max_pixels attributes (older files)."""
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None)
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None)
    if not low or not high:
        raise CheckpointError("the image processor declares no min_pixels / max_pixels; pass --image-size HxW")
    return int(low), int(high)


def default_image_size(min_pixels: int, max_pixels: int, factor: int = 28, cap: int = MAX_DEFAULT_SIDE) -> tuple[int, int]:
    """The largest square side s, a multiple of `factor`, with s <= cap and s * s <= max_pixels.

    A processor with min_pixels = max_pixels = 224 * 224 gives 224x224. min_pixels only matters when
    no such s reaches it: then the export could not hold an image the processor would accept.
    """
    side = min(cap, math.isqrt(max_pixels)) // factor * factor
    if side < factor or side * side < min_pixels:
        raise CheckpointError(
            f"no square export size fits the processor's pixel range [{min_pixels}, {max_pixels}] "
            f"(multiples of {factor} up to {cap}); pass --image-size HxW"
        )
    return side, side


def parse_image_size(text: str, factor: int = 28) -> tuple[int, int]:
    """'HxW' (or one number for a square) -> (H, W), both positive multiples of `factor`."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not match:
        raise ExportError(f"--image-size {text!r}: expected HxW, e.g. 448x448")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) else height
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ExportError(f"--image-size {height}x{width}: both sides must be positive multiples of {factor} (patch x merge)")
    return height, width


def image_grid(config, height: int, width: int) -> ImageGrid:
    vision = config.vision_config
    return ImageGrid(height=height, width=width, patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                     temporal_patch_size=vision.temporal_patch_size, channels=vision.in_channels)


def check_config(config) -> None:
    """What this family's graphs assume about the checkpoint; anything else is refused in one line."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    section = (text.rope_parameters or {}).get("mrope_section")
    if not section or sum(section) != head_dim // 2:
        raise UnsupportedArchitecture(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
    if (text.rope_parameters or {}).get("rope_type", "default") != "default":
        raise UnsupportedArchitecture(f"rope_type {text.rope_parameters.get('rope_type')!r} is not supported (default only)")
    if getattr(text, "use_sliding_window", False):
        raise UnsupportedArchitecture("sliding-window attention in the text model is not supported")


# ------------------------------------------------------------------------------------- the vision graph


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionEncoder(nn.Module):
    """pixel_values [images * N, C*T*P*P] -> merged features [images * M, D] at one fixed grid.

    Runs the checkpoint's own modules (norms, qkv, proj, MLPs, merger) with what depends on the grid
    precomputed by transformers' own helpers: the rotary cos/sin per patch and, from the window index,
    an additive mask that keeps attention inside each window. Patches stay in the processor's order
    throughout, so neither the window permutation nor its inverse appears in the graph. The patch
    embedding (a Conv3d whose kernel covers the whole patch row) is the equivalent MatMul.
    """

    def __init__(self, visual, grid: ImageGrid):
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        config = visual.config
        self.visual = visual
        self.num_patches = grid.num_patches
        self.patch_dim = grid.patch_dim
        self.heads = config.num_heads
        self.merged_dim = visual.merger.hidden_size
        grid_thw = torch.tensor([grid.grid_thw])
        with torch.no_grad():
            rotary_ids = get_vision_position_ids(grid_thw, config.spatial_merge_size)
            probe = torch.zeros(1, dtype=visual.rotary_pos_emb.inv_freq.dtype)
            cos, sin = visual.rotary_pos_emb(probe, rotary_ids)  # [N, head_dim], patches in processor order
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)
        if getattr(config, "window_size", None):  # Qwen2.5-VL; Qwen2-VL's tower attends over the whole image
            self.full_blocks = set(config.fullatt_block_indexes)
            window_index, cu_window = get_vision_window_index(
                grid_thw, config.spatial_merge_size, config.window_size, config.patch_size)
            bias = window_bias(window_index, cu_window, config.spatial_merge_size**2)
        else:
            self.full_blocks = set(range(len(visual.blocks)))
            bias = torch.zeros(0)
        self.register_buffer("window_bias", bias, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = pixel_values.reshape(-1, self.num_patches, self.patch_dim)
        weight = v.patch_embed.proj.weight
        hidden = x.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).T
        for index, block in enumerate(v.blocks):
            bias = None if index in self.full_blocks else self.window_bias
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), bias)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = v.merger.mlp(v.merger.ln_q(hidden).reshape(hidden.shape[0], -1, self.merged_dim))
        return merged.reshape(-1, merged.shape[-1])

    def _attention(self, attn, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, n, dim = hidden.shape
        qkv = attn.qkv(hidden).reshape(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [batch, heads, n, head_dim]
        # The tables are fp32 buffers: in the model's dtype (a bf16 tower beside an fp32 artifact, bench
        # --torch-dtype) so the block's linears get their own dtype back; no-ops (no node) when tracing fp32.
        cos, sin = self.cos.to(q.dtype), self.sin.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        out = torch.softmax(scores, dim=-1) @ v
        return attn.proj(out.transpose(1, 2).reshape(batch, n, dim))


def window_bias(window_index: torch.Tensor, cu_window_seqlens: torch.Tensor, merge_unit: int) -> torch.Tensor:
    """[N, N] additive mask: 0 where two patches share an attention window, -65504 elsewhere (float16's
    lowest: exp underflows to exactly 0 after the softmax's max shift, as with -inf, and the constant stays
    finite in fp32 and fp16 graphs, so NaN/Inf scans of the weights keep meaning "damaged").

    transformers reorders merged tokens by `window_index` and attends within cu_window_seqlens spans of
    that order; here the window of each patch is looked up in the original (processor) order instead.
    """
    order = (window_index[:, None] * merge_unit + torch.arange(merge_unit)).reshape(-1)  # patch at each reordered slot
    slot_window = torch.bucketize(torch.arange(order.numel()), cu_window_seqlens[1:].long(), right=True)
    window = torch.empty_like(order)
    window[order] = slot_window
    same = window[:, None] == window[None, :]
    return torch.where(same, 0.0, -65504.0)


def model_dims(config, grid: ImageGrid):
    """The manifest's Dims of a Qwen2.5-VL checkpoint at the export grid (image_size: the grid's height; the
    full grid is in the family payload)."""
    from attanchor_runtime.manifest import Dims

    text, vision = config.text_config, config.vision_config
    return Dims(
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=text.hidden_size // text.num_attention_heads,
        vocab_size=text.vocab_size, image_tokens=grid.num_image_tokens, image_size=grid.height,
        patch_size=vision.patch_size, vision_hidden_size=vision.hidden_size,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------- positions in the embedding graph


@dataclass
class _Nodes:
    """Appends ONNX nodes with generated output names (prefix "mrope_") and collects constants."""

    nodes: list
    initializers: list
    count: int = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        from onnx import helper

        self.count += 1
        out = f"mrope_{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, name: str, value, dtype=np.int64) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"mrope_{name}"))
        return f"mrope_{name}"


def mrope_position_nodes(merged_hw: tuple[int, int], mode: str, output: str = "position_ids"):
    """(nodes, initializers) computing position ids [3, B, L] inside the embedding graph.

    Reads the graph values gather_index and attention_mask (AnchorInsert's outputs), text_attention_mask,
    image_position and text_embeds (for T). The same steps as the numpy specification
    attanchor_runtime.families.qwen2_5_vl.mrope_position_ids, in ops both ONNX Runtime and TensorRT take:
    prefix sums in float32 (TensorRT's CumSum is float only; counts stay exact below 2^24), the merged
    grid's row and column of each image token from constant tables (no integer division).
    """
    from onnx import TensorProto, helper

    rows, cols = merged_hw
    m_total = rows * cols
    g = _Nodes([], [])
    zero, one = g.const("zero", 0), g.const("one", 1)
    axis0, axis1 = g.const("axis0", [0]), g.const("axis1", [1])
    f32, i64, boolean = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL

    def count(x_bool, cumulative: bool):  # int64 count of true values along the sequence (float32 inside)
        x = g.op("Cast", x_bool, to=f32)
        counted = g.op("CumSum", x, axis1) if cumulative else g.op("ReduceSum", x, axis1)
        return g.op("Cast", counted, to=i64)

    valid = g.op("Cast", "attention_mask", to=boolean)
    text_len = g.op("Gather", g.op("Shape", "text_embeds"), one, axis=0)
    is_image = g.op("And", valid, g.op("GreaterOrEqual", "gather_index", text_len))
    # n_pre: real text tokens before the placeholder; n_post: after it ([B, 1] each).
    arange = g.op("Range", zero, text_len, one)
    before = g.op("Less", g.op("Unsqueeze", arange, axis0), g.op("Unsqueeze", "image_position", axis1))
    text_real = g.op("Cast", "text_attention_mask", to=boolean)
    n_pre = count(g.op("And", text_real, before), cumulative=False)
    n_post = g.op("Sub", g.op("Sub", count(text_real, cumulative=False), n_pre), one)
    if mode == "t2i":
        slot = g.op("Sub", count(valid, cumulative=True), one)
        length = count(valid, cumulative=False)
        pre_text = g.op("Less", slot, n_pre)
        post_text = g.op("GreaterOrEqual", slot, g.op("Sub", length, n_post))
        original = g.op("And", valid, g.op("Or", g.op("Or", pre_text, is_image), post_text))
    elif mode == "i2t":
        first_images = g.op("LessOrEqual", count(is_image, cumulative=True), g.const("num_image_tokens", m_total))
        original = g.op("And", valid, g.op("Or", g.op("Not", is_image), first_images))
    else:
        raise ValueError(f"mode must be 't2i' or 'i2t', got {mode!r}")
    rank = g.op("Sub", count(original, cumulative=True), one)
    from_image_start = g.op("Sub", rank, n_pre)
    in_image = g.op("And", g.op("GreaterOrEqual", from_image_start, zero),
                    g.op("Less", from_image_start, g.const("m", m_total)))
    patch = g.op("Where", in_image, from_image_start, zero)  # a valid table index everywhere (no Clip: float-only in TensorRT)
    text_after = g.op("Add", rank, g.const("after_shift", max(rows, cols) - m_total))
    text_pos = g.op("Where", g.op("Less", rank, n_pre), rank, text_after)
    h_image = g.op("Add", n_pre, g.op("Gather", g.const("row_of_patch", np.arange(m_total) // cols), patch, axis=0))
    w_image = g.op("Add", n_pre, g.op("Gather", g.const("col_of_patch", np.arange(m_total) % cols), patch, axis=0))
    axes = []
    for image_value in (n_pre, h_image, w_image):  # t of every image token: n_pre (a still image)
        pos = g.op("Where", in_image, image_value, text_pos)
        pos = g.op("Where", valid, pos, zero)  # padding slots: 0, as get_rope_index
        axes.append(g.op("Unsqueeze", pos, axis0))
    g.nodes.append(helper.make_node("Concat", axes, [output], axis=0))
    return g.nodes, g.initializers


# --------------------------------------------------------------------------- what the processor returns


def processor_inputs(tokenizer, image_processor, prompts: list[str], images: list) -> dict:
    """What Qwen2_5_VLProcessor(text=prompts, images=images, padding=True) returns, as torch tensors.

    transformers' processor class cannot be built without torchvision (its video processor), so this
    does its steps with the parts that can: the image processor, each <|image_pad|> repeated once per
    merged token, the tokenizer (left padding), and mm_token_type_ids (1 on image tokens), which
    get_rope_index and generate need.
    """
    features = image_processor(images=images, return_tensors="pt")
    merge = image_processor.merge_size**2
    pad = "<|image_pad|>"
    expanded = []
    for prompt, grid in zip(prompts, features["image_grid_thw"], strict=True):
        if prompt.count(pad) != 1:
            raise ValueError(f"each prompt needs exactly one {pad}")
        expanded.append(prompt.replace(pad, pad * (int(grid.prod()) // merge)))
    encoded = tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
    image_token_id = tokenizer.convert_tokens_to_ids(pad)
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "pixel_values": features["pixel_values"],
        "image_grid_thw": features["image_grid_thw"],
        "mm_token_type_ids": (encoded["input_ids"] == image_token_id).int(),
    }


# ------------------------------------------------------------------------------------- the family


class BatchedVision(VisionEncoder):
    """VisionEncoder with the features per image, [images, M, D]: what the embedding graph takes."""

    def __init__(self, visual, grid: ImageGrid):
        super().__init__(visual, grid)
        self.tokens = grid.num_image_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        merged = super().forward(pixel_values)
        return merged.reshape(-1, self.tokens, merged.shape[-1])


@register("Qwen2_5_VLForConditionalGeneration")
class Qwen2_5_VL(ModelFamily):
    """Qwen2.5-VL: vision.onnx takes the processor's patch rows at one fixed grid (`configure`:
    --image-size, else default_image_size of the processor's pixel range), the embedding graph computes
    3-D M-RoPE positions (mrope_position_nodes), the decoder takes them."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    default_threshold = DEFAULT_THRESHOLD

    def __init__(self, config):
        super().__init__(config)
        check_config(config)
        self._size: tuple[int, int] | None = None
        self._folder = None

    # -- the export grid -----------------------------------------------------------------------------
    def configure(self, folder=None, image_size=None, artifact=None) -> None:
        if folder is not None:
            self._folder = folder
        if artifact is not None:  # an artifact's source: the grid it was exported at
            grid = artifact.payload.get("image_grid", {})
            self._size = (int(grid["height"]), int(grid["width"]))
        if image_size is not None:
            size = image_size if isinstance(image_size, tuple) else parse_image_size(image_size, self.factor)
            self._size = size

    @property
    def factor(self) -> int:
        vision = self.config.vision_config
        return vision.patch_size * vision.spatial_merge_size

    def _processor(self):
        from transformers import AutoImageProcessor

        if self._folder is None:
            raise CheckpointError("the checkpoint has no image processor files; pass --image-size HxW")
        try:
            return AutoImageProcessor.from_pretrained(str(self._folder))
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing processor
            raise ExportError(f"cannot load the image processor from {self._folder}: {str(e).splitlines()[0]}") from None

    @property
    def grid(self) -> ImageGrid:
        if self._size is None:
            self._size = default_image_size(*processor_pixel_range(self._processor()), factor=self.factor)
        return image_grid(self.config, *self._size)

    # -- numbers -------------------------------------------------------------------------------------
    @property
    def dims(self):
        return model_dims(self.config, self.grid)

    @property
    def tokens(self) -> SpecialTokens:
        c, text = self.config, self.config.text_config
        eos = text.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return SpecialTokens(c.image_token_id, text.pad_token_id, text.bos_token_id, eos_ids)

    # -- graphs --------------------------------------------------------------------------------------
    position_shape = (3, "batch", "seq_len")

    def vision_spec(self):
        from attanchor_runtime.manifest import BATCH, GraphSpec, TensorSpec

        grid, dims = self.grid, self.dims
        return GraphSpec(
            "vision.onnx",
            inputs=(TensorSpec("pixel_values", "float32", (f"{BATCH} * {grid.num_patches}", grid.patch_dim)),),
            outputs=(TensorSpec("image_features", "float32", (BATCH, grid.num_image_tokens, dims.hidden_size)),),
        )

    def vision_module(self, model):
        return BatchedVision(model.model.visual, self.grid).eval()

    def vision_example_inputs(self) -> tuple:
        grid = self.grid
        return (torch.randn(2 * grid.num_patches, grid.patch_dim, generator=torch.Generator().manual_seed(0)),)

    def vision_dynamic_shapes(self, spec) -> dict:
        from attanchor_runtime.manifest import BATCH
        from torch.export import Dim

        return {"pixel_values": {0: self.grid.num_patches * Dim(BATCH, min=1)}}

    def generate_image_inputs(self, pixels: np.ndarray, input_ids) -> dict:
        grid = self.grid
        rows = torch.from_numpy(np.asarray(pixels, np.float32).reshape(-1, grid.patch_dim))
        images = rows.shape[0] // grid.num_patches
        ids = torch.as_tensor(input_ids)
        return {"pixel_values": rows, "image_grid_thw": torch.tensor([list(grid.grid_thw)] * images),
                "mm_token_type_ids": (ids == self.config.image_token_id).int()}

    def position_nodes(self, mask: str, out: str, mode: str = "t2i") -> tuple[list, list]:
        return mrope_position_nodes(self.grid.merged_hw, mode, output=out)

    def position_ids(self, attention_mask, gather_index, text_attention_mask=None, image_position=None,
                     mode: str = "t2i") -> np.ndarray:
        from attanchor_runtime.families.qwen2_5_vl import mrope_position_ids

        if text_attention_mask is None or image_position is None:
            raise ValueError("3-D positions need the text mask and the image position")
        return mrope_position_ids(gather_index, attention_mask, text_attention_mask, image_position,
                                  self.grid.merged_hw, mode)

    # -- the manifest's family section ---------------------------------------------------------------
    def manifest_section(self, processor_folder):
        from attanchor_runtime.families.qwen2_5_vl import QwenPayload
        from attanchor_runtime.manifest import Family, ModelTypes, to_json
        from attanchor_runtime.preprocess_from_hf import _hf_resample

        self.configure(folder=processor_folder)
        processor, grid = self._processor(), self.grid
        preprocessing = {
            "image_mean": [float(v) for v in processor.image_mean], "image_std": [float(v) for v in processor.image_std],
            "resample": _hf_resample(getattr(processor, "resample", None)),
            "rescale_factor": float(processor.rescale_factor),
            "do_convert_rgb": bool(getattr(processor, "do_convert_rgb", True)),
        }
        section = (self.config.text_config.rope_parameters or {}).get("mrope_section") or ()
        payload = QwenPayload(
            image_grid={"height": grid.height, "width": grid.width, "patch_size": grid.patch_size,
                        "merge_size": grid.merge_size, "temporal_patch_size": grid.temporal_patch_size,
                        "channels": grid.channels},
            image_preprocessing=preprocessing, resize="stretch", positions="mrope",
            mrope_section=tuple(int(v) for v in section))
        return Family(self.name, self.architecture,
                      ModelTypes(self.config.vision_config.model_type, self.config.text_config.model_type),
                      to_json(payload))

    # -- the PyTorch pieces --------------------------------------------------------------------------
    def language_model(self, model) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model) -> nn.Module:
        return model.lm_head


@register("Qwen2VLForConditionalGeneration")
class Qwen2_VL(Qwen2_5_VL):
    """Qwen2-VL: the same prompts, positions, decoder and runtime adapter (manifest family qwen2_5_vl); its
    tower attends over the whole image (VisionEncoder without window mask) and loads as its own class."""

    model_types = ("qwen2_vl",)

    @property
    def dims(self):
        # Qwen2VLVisionConfig names the tower's width embed_dim; its hidden_size is the merger's output (D).
        return replace(super().dims, vision_hidden_size=self.config.vision_config.embed_dim)
