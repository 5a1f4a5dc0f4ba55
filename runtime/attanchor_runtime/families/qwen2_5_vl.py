"""Qwen2.5-VL on the runtime side (numpy + Pillow, no torch): images, prompts and 3-D M-RoPE positions.
Qwen2-VL artifacts (Qwen2VLForConditionalGeneration) are family qwen2_5_vl too: only their vision graph
differs, and the runtime sees none of it.

Images. Static graphs see one fixed image grid (the export's `ImageGrid`, e.g. 448x448 pixels = 32x32
patches of 14 = 16x16 merged tokens). Every input image is resized to exactly that size (stretched: the
aspect ratio is not kept, no letterbox), with Pillow on the uint8 image, then rescaled and normalised
as transformers' Qwen2VLImageProcessorPil does, and cut into its patch layout: rows of
C * temporal_patch * P * P = 1176 values, one per 14x14 patch, in merge-block order (the 2x2 patches
of one merged token are consecutive). An image already at the export size is not resampled, so here
and in transformers it gives the same pixel_values; so does any square image when the processor's
min_pixels = max_pixels = the export's area.

Prompts. The chat template puts `<|vision_start|><|image_pad|><|vision_end|>` where the image goes;
transformers' processor repeats <|image_pad|> once per merged token (M times), the embedding graph
takes one (attanchor_runtime.image_placeholders collapses the run).

Positions (docs/CONTRACTS.md, "Qwen2.5-VL positions"). Qwen2.5-VL rotates queries and keys with 3-D
positions (t, h, w). Text before the image counts 0, 1, ... on all three axes; the image's merged
tokens, starting at p (the number of text tokens before it), sit at (p, p + row, p + col) on the
merged grid; the text after the image continues at p + max(rows, cols) (the image's largest position
+ 1) and counts on. AttAnchor inserts copies into the sequence; an inserted copy takes the position of
the token it is inserted after (t2i: a text copy after merged patch m takes m's (t, h, w), after
another copy the same; i2t: an image copy after text token n takes n's position), and copies never
advance the count, so with no anchors the positions equal transformers' `get_rope_index` and with
anchors the original tokens keep exactly those positions. Padding slots get 0 (as get_rope_index).
Decode steps: position = (real tokens so far) + rope delta on all three axes, rope delta = largest
prompt position + 1 - real prompt length (copies included), i.e. the first new token sits at the
largest prompt position + 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ArtifactError, RuntimeInputError
from ..preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessor
from .base import register
from .llava import Llava

__all__ = [
    "FAMILY",
    "ImageGrid",
    "MropeStep",
    "Qwen2_5_VL",
    "QwenPayload",
    "QwenImagePreprocessor",
    "check_pixel_inputs",
    "decode_position_ids",
    "expand_image_pads",
    "mrope_position_ids",
    "patchify",
    "rope_deltas",
]

FAMILY = "qwen2_5_vl"


@dataclass(frozen=True)
class ImageGrid:
    """The export's image size in pixels and how the vision tower cuts it (patch, merge, temporal patch)."""

    height: int
    width: int
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    channels: int = 3

    def __post_init__(self):
        factor = self.patch_size * self.merge_size
        if self.height <= 0 or self.width <= 0 or self.height % factor or self.width % factor:
            raise ArtifactError(
                f"image size {self.height}x{self.width} must be positive multiples of patch x merge = {factor}"
            )

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """What the processor reports as image_grid_thw: (1, patch rows, patch columns)."""
        return 1, self.height // self.patch_size, self.width // self.patch_size

    @property
    def merged_hw(self) -> tuple[int, int]:
        """Rows and columns of merged tokens (the language model's image grid)."""
        _, gh, gw = self.grid_thw
        return gh // self.merge_size, gw // self.merge_size

    @property
    def num_patches(self) -> int:
        _, gh, gw = self.grid_thw
        return gh * gw

    @property
    def num_image_tokens(self) -> int:
        rows, cols = self.merged_hw
        return rows * cols

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size * self.patch_size


# ------------------------------------------------------------------------------------------ images


def patchify(image: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """float32 [C, H, W] -> [num_patches, C*T*P*P] in the processor's order (Qwen2VLImageProcessorPil.patchify).

    Rows go merge block by merge block (each block's merge x merge patches consecutive, row-major);
    each row is (channel, temporal copy, patch row, patch column), the still image repeated T times.
    """
    c, h, w = image.shape
    if (h, w) != (grid.height, grid.width) or c != grid.channels:
        raise RuntimeInputError(f"image of shape {image.shape} does not match the export grid {grid.height}x{grid.width}")
    p, m, t = grid.patch_size, grid.merge_size, grid.temporal_patch_size
    gh, gw = h // p, w // p
    patches = image.astype(np.float32, copy=False).reshape(c, gh // m, m, p, gw // m, m, p)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (block row, block col, row in block, col in block, C, P, P)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p))


class QwenImagePreprocessor:
    """Images -> (pixel_values float32 [B * num_patches, patch_dim], image_grid_thw int64 [B, 3]).

    Each image is resized to exactly the grid's size (stretched), then rescaled and normalised by the
    CLIP/SigLIP preprocessing already in this runtime (the same arithmetic as transformers' PIL backend),
    then patchified. `images`: one image or a list (path, bytes, PIL image, uint8 HxWxC array).
    """

    def __init__(self, grid: ImageGrid, *, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD, resample: int = 3, rescale_factor: float = 1 / 255,
                 do_convert_rgb: bool = True, do_rescale: bool = True, do_normalize: bool = True):
        self.grid = grid
        self.pixels = ImagePreprocessor(
            kind="clip", do_convert_rgb=do_convert_rgb, do_resize=True,
            size={"height": grid.height, "width": grid.width}, resample=resample, do_center_crop=False,
            do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize,
            image_mean=image_mean, image_std=image_std,
        )

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        chw = self.pixels(images)  # [B, 3, H, W]
        pixel_values = np.concatenate([patchify(one, self.grid) for one in chw], axis=0)
        image_grid_thw = np.tile(np.asarray(self.grid.grid_thw, np.int64), (chw.shape[0], 1))
        return pixel_values, image_grid_thw


def check_pixel_inputs(pixel_values, image_grid_thw, grid: ImageGrid, num_images: int) -> np.ndarray:
    """Check what a caller passes as the processor's output; returns pixel_values as float32.

    pixel_values [num_images * num_patches, patch_dim] and image_grid_thw [num_images, 3], every row of
    the grid equal to the export's (a static graph has one grid).
    """
    if image_grid_thw is None:
        raise RuntimeInputError("image_grid_thw is required with pixel_values in the Qwen2.5-VL patch layout")
    pixels = np.asarray(pixel_values)
    grid_thw = np.asarray(image_grid_thw)
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or not np.issubdtype(grid_thw.dtype, np.integer):
        raise RuntimeInputError(f"image_grid_thw must be an integer array [images, 3], got {grid_thw.dtype} {grid_thw.shape}")
    if grid_thw.shape[0] != num_images:
        raise RuntimeInputError(f"image_grid_thw has {grid_thw.shape[0]} rows for {num_images} prompts (one image each)")
    for row in grid_thw:
        if tuple(int(v) for v in row) != grid.grid_thw:
            raise RuntimeInputError(
                f"image_grid_thw {[int(v) for v in row]} differs from the export's grid {list(grid.grid_thw)} "
                f"({grid.height}x{grid.width} pixels): resize images to that size"
            )
    want = (num_images * grid.num_patches, grid.patch_dim)
    if pixels.ndim != 2 or pixels.shape != want:
        raise RuntimeInputError(f"pixel_values must have shape {list(want)} for {num_images} image(s), got {list(pixels.shape)}")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise RuntimeInputError(f"pixel_values must be floating point, got {pixels.dtype}")
    return pixels.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------- prompts


def expand_image_pads(ids: Sequence[int] | np.ndarray, image_token_id: int, num_image_tokens: int) -> np.ndarray:
    """One <|image_pad|> (or a run of them) -> exactly `num_image_tokens` of them: the processor's layout."""
    arr = np.asarray(ids, dtype=np.int64)
    at = np.flatnonzero(arr == image_token_id)
    if at.size == 0:
        raise RuntimeInputError(f"the prompt has no image placeholder (token id {image_token_id})")
    start, stop = int(at[0]), int(at[-1]) + 1
    if stop - start != at.size:
        raise RuntimeInputError("the prompt has more than one run of image placeholders; one image per prompt")
    return np.concatenate([arr[:start], np.full(num_image_tokens, image_token_id, np.int64), arr[stop:]])


# --------------------------------------------------------------------------------------- positions


def mrope_position_ids(gather_index, out_mask, text_attention_mask, image_position, merged_hw: tuple[int, int],
                       mode: str = "t2i") -> np.ndarray:
    """3-D position ids int64 [3, B, L] of an AnchorInsert output (module docstring; the contract).

    gather_index, out_mask [B, L]: AnchorInsert's outputs (index into concat(text, image), 1 = real slot);
    text_attention_mask [B, T] and image_position [B]: its inputs (one image placeholder per row);
    merged_hw: (rows, cols) of the merged image grid, M = rows * cols; mode: "t2i" | "i2t".
    """
    gather = np.asarray(gather_index, np.int64)
    valid = np.asarray(out_mask).astype(bool)
    text_mask = np.asarray(text_attention_mask).astype(bool)
    where = np.asarray(image_position, np.int64)
    rows, cols = (int(v) for v in merged_hw)
    m_total = rows * cols
    t = text_mask.shape[1]
    is_image = valid & (gather >= t)

    before = np.arange(t)[None, :] < where[:, None]
    n_pre = (text_mask & before).sum(axis=1)  # real text tokens before the image
    n_post = text_mask.sum(axis=1) - n_pre - 1  # ... and after it (the placeholder itself is replaced)
    if mode == "t2i":
        # Layout: pre text, then images with text copies after them, then the text after the image,
        # right-aligned (rows are left padded): the last n_post real slots.
        slot = np.cumsum(valid, axis=1) - 1
        length = valid.sum(axis=1, keepdims=True)
        original = valid & ((slot < n_pre[:, None]) | is_image | (slot >= length - n_post[:, None]))
    elif mode == "i2t":
        # Layout: pre text, the M images, then the text after the image with image copies after words.
        original = valid & (~is_image | (np.cumsum(is_image, axis=1) <= m_total))
    else:
        raise ValueError(f"mode must be 't2i' or 'i2t', got {mode!r}")

    # Each slot's rank among the original tokens; a copy gets the rank of the original before it.
    rank = np.cumsum(original, axis=1) - 1
    pre = n_pre[:, None]
    in_image = (rank >= pre) & (rank < pre + m_total)
    patch = np.clip(rank - pre, 0, m_total - 1)
    text_pos = np.where(rank < pre, rank, rank - m_total + max(rows, cols))
    t_pos = np.where(in_image, pre, text_pos)
    h_pos = np.where(in_image, pre + patch // cols, text_pos)
    w_pos = np.where(in_image, pre + patch % cols, text_pos)
    positions = np.stack([t_pos, h_pos, w_pos]).astype(np.int64)
    return np.where(valid[None], positions, 0)


def rope_deltas(position_ids, out_mask) -> np.ndarray:
    """int64 [B]: largest prompt position + 1 - real prompt length (copies included), as transformers'
    mrope_position_deltas; the next token of row b sits at (real tokens so far) + delta[b]."""
    positions = np.asarray(position_ids, np.int64)
    valid = np.asarray(out_mask).astype(bool)
    largest = np.where(valid[None], positions, np.iinfo(np.int64).min).max(axis=(0, 2))
    return (largest + 1 - valid.sum(axis=1)).astype(np.int64)


def decode_position_ids(deltas, attention_mask) -> np.ndarray:
    """Position ids int64 [3, B, 1] of one new token per row; attention_mask [B, past + 1] is the decoder's
    mask for this step (the new token included), so the new token's real index is its sum - 1."""
    mask = np.asarray(attention_mask, np.int64)
    position = mask.sum(axis=1) - 1 + np.asarray(deltas, np.int64)
    return np.broadcast_to(position[None, :, None], (3, mask.shape[0], 1)).astype(np.int64)


# ------------------------------------------------------------------------------------ the adapter


@dataclass(frozen=True)
class QwenPayload:
    """manifest family.payload of a Qwen2.5-VL artifact (docs/CONTRACTS.md)."""

    image_grid: Mapping[str, Any] = field(default_factory=dict)  # ImageGrid's fields: the export's fixed grid
    # Qwen2VLImageProcessor's arithmetic after the resize: image_mean, image_std, resample, rescale_factor
    image_preprocessing: Mapping[str, Any] = field(default_factory=dict)
    resize: str = "stretch"  # every image is resized to exactly the grid's size (no letterbox)
    positions: str = "mrope"  # 3-D (t, h, w) positions, the anchor contract in the module docstring
    mrope_section: tuple[int, ...] = ()  # the decoder's rotary sections (t, h, w), for the record


@dataclass(frozen=True)
class MropeStep:
    """A decoder call's mask and 3-D positions; each new token at (real tokens so far) + rope delta."""

    attention_mask: np.ndarray  # [B, past + S]
    position_ids: np.ndarray  # [3, B, S]
    deltas: np.ndarray  # [B] (rope_deltas of the prefill)

    @classmethod
    def after_prefill(cls, attention_mask: np.ndarray, position_ids: np.ndarray) -> MropeStep:
        mask, positions = np.asarray(attention_mask, np.int64), np.asarray(position_ids, np.int64)
        return cls(mask, positions, rope_deltas(positions, mask))

    def advance(self) -> MropeStep:
        mask = np.concatenate([self.attention_mask, np.ones((self.attention_mask.shape[0], 1), np.int64)], axis=1)
        return MropeStep(mask, decode_position_ids(self.deltas, mask), self.deltas)


class QwenImages:
    """pipe.images for a Qwen artifact: image(s) -> pixel_values float32 [images, N, C*T*P*P], the
    processor's patch rows per image (np.concatenate of several calls stacks images, as for LLaVA);
    reshape to [images * N, C*T*P*P] for the processor's flat layout."""

    def __init__(self, grid: ImageGrid, preprocessing: Mapping[str, Any]):
        self.grid = grid
        self.processor = QwenImagePreprocessor(grid, **dict(preprocessing))

    def __call__(self, images) -> np.ndarray:
        pixel_values, grid_thw = self.processor(images)
        return pixel_values.reshape(len(grid_thw), self.grid.num_patches, self.grid.patch_dim)

    def value_range(self, margin: float = 0.0) -> tuple[float, float]:
        return self.processor.pixels.value_range(margin)


@register(FAMILY)
class Qwen2_5_VL(Llava):
    """Prompts and the anchored embedding as LLaVA's (one collapsed placeholder run per row); images in
    the processor's patch layout at one fixed grid; 3-D M-RoPE positions."""

    payload_type = QwenPayload

    @property
    def grid(self) -> ImageGrid:
        return ImageGrid(**dict(self.payload.image_grid))

    def image_processor(self) -> QwenImages:
        return QwenImages(self.grid, self.payload.image_preprocessing)

    def vision_feeds(self, pixel_values, batch: int, image_grid_thw=None, **image_inputs) -> dict[str, np.ndarray]:
        """pixel_values either as pipe.images returns them ([B, N, 1176]; image_grid_thw optional) or as the
        transformers processor returns them ([B * N, 1176] with image_grid_thw [B, 3], required)."""
        if image_inputs:
            raise RuntimeInputError(f"unexpected image inputs {sorted(image_inputs)}: a Qwen2.5-VL artifact takes "
                                    "pixel_values and image_grid_thw")
        grid = self.grid
        pixels = np.asarray(pixel_values)
        if pixels.ndim == 3:
            if pixels.shape != (batch, grid.num_patches, grid.patch_dim):
                raise RuntimeInputError(f"pixel_values must be [{batch}, {grid.num_patches}, {grid.patch_dim}] "
                                        f"(pipe.images) or [{batch * grid.num_patches}, {grid.patch_dim}] with "
                                        f"image_grid_thw, got {list(pixels.shape)}")
            pixels = pixels.reshape(batch * grid.num_patches, grid.patch_dim)
            if image_grid_thw is None:  # the shape says the grid: one image of the export's grid per row
                image_grid_thw = np.tile(np.asarray(grid.grid_thw, np.int64), (batch, 1))
        pixels = check_pixel_inputs(pixels, image_grid_thw, grid, batch)
        self._check_pixel_values(pixels, "pipe.images(image) or the Qwen processor's pixel_values")
        (name,) = self.manifest.graphs.vision.input_names
        return {name: pixels}

    def view_processor(self) -> ImagePreprocessor:
        return self.image_processor().processor.pixels

    def patch_grid(self) -> tuple[int, int]:
        return self.grid.merged_hw  # merged tokens, row-major: out.anchors' image index

    def example_pixels(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        grid = self.grid
        return rng.standard_normal((batch, grid.num_patches, grid.patch_dim)).astype(np.float32)

    def position_ids(self, out_mask, gather_index, text_attention_mask, image_position) -> np.ndarray:
        return mrope_position_ids(gather_index, out_mask, text_attention_mask, image_position, self.grid.merged_hw,
                                  self.manifest.anchor.mode)

    def text_position_ids(self, attention_mask: np.ndarray) -> np.ndarray:
        """Text only: t = h = w = the token's count among the real ones (get_rope_index), 0 on padding."""
        mask = np.asarray(attention_mask, np.int64)
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
        return np.broadcast_to(positions[None], (3, *mask.shape)).astype(np.int64)

    def first_step(self, attention_mask: np.ndarray, position_ids: np.ndarray) -> MropeStep:
        return MropeStep.after_prefill(attention_mask, position_ids)
