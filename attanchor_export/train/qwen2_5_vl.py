"""How the shared training recipe (loop.py) reaches into a Qwen2.5-VL model at one fixed image grid.

- pixels: the training set holds images as the runtime's preprocessing makes them before patchifying
  (float [N, 3, H, W] at the export grid, `TrainPixels`), so stage A's horizontal flip is a flip; the
  features function cuts them into the processor's patch rows (`patchify`, the torch twin of
  attanchor_runtime.families.qwen2_5_vl.patchify) and runs the exporter's VisionEncoder (the graph that
  vision.onnx is traced from: constant rotary table and window mask) over the model's own tower.
- positions: the anchored layout's 3-D M-RoPE ids, by the same specification the runtime and the
  embedding graph follow (mrope_position_ids): a copy takes the position of the token it follows.
- parts: the tower and its merger live under model.visual.
"""

from __future__ import annotations

import numpy as np
import torch
from attanchor_runtime.families.qwen2_5_vl import ImageGrid, QwenImagePreprocessor, mrope_position_ids

from attanchor_export.train.layout import Layout
from attanchor_export.train.loop import Family


def patchify(pixels: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
    """[B, C, H, W] -> [B * num_patches, C*T*P*P] in the processor's order (merge blocks, T copies)."""
    b, c, h, w = pixels.shape
    p, m, t = grid.patch_size, grid.merge_size, grid.temporal_patch_size
    gh, gw = h // p, w // p
    x = pixels.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], t, p, p)
    return x.reshape(b * gh * gw, c * t * p * p)


class TrainPixels:
    """An image processor for attanchor_export.train.data: images -> {"pixel_values": [B, 3, H, W]}
    (resize to the grid, rescale, normalise: the runtime's arithmetic), stored as float16 to halve the
    training set's memory (4,000 easy-vqa images at 224x224: 1.2 GB instead of 2.4)."""

    def __init__(self, grid: ImageGrid, image_processor):
        self.preprocess = QwenImagePreprocessor(
            grid, image_mean=image_processor.image_mean, image_std=image_processor.image_std,
            resample=int(image_processor.resample), rescale_factor=image_processor.rescale_factor)

    def __call__(self, images, return_tensors="np"):
        return {"pixel_values": self.preprocess.pixels(images).astype(np.float16)}


def qwen_family(grid: ImageGrid, image_token_id: int) -> Family:
    def features(model, pixels):
        from attanchor_export.families.qwen2_5_vl import VisionEncoder

        encoder = VisionEncoder(model.model.visual, grid)  # cheap: the rotary table and window mask of one grid
        rows = encoder(patchify(pixels.float(), grid))
        return rows.reshape(pixels.shape[0], grid.num_image_tokens, rows.shape[-1])

    def hidden(model, layout: Layout):
        lang = model.model.language_model
        return lang(inputs_embeds=layout.embeds, attention_mask=layout.mask,
                    position_ids=layout.positions).last_hidden_state

    def positions(layout: Layout) -> torch.Tensor:
        gather, valid = layout.gather_index, layout.mask.numpy().astype(bool)
        image_position = (layout.ids == image_token_id).argmax(1)
        # The layout keeps the padded ids, not their mask: a row's real text is what its gather index
        # reads (every text token but the placeholder appears at least once), plus the placeholder.
        text_mask = np.zeros(layout.ids.shape, np.int64)
        for r in range(len(gather)):
            text_mask[r, gather[r][valid[r] & (gather[r] < layout.num_text)]] = 1
            text_mask[r, image_position[r]] = 1
        return torch.from_numpy(mrope_position_ids(gather, layout.mask.numpy(), text_mask, image_position,
                                                   grid.merged_hw, "t2i"))

    return Family(
        features=features,
        hidden=hidden,
        head=lambda model, h: model.lm_head(h),
        vision_modules=lambda model: [model.model.visual],
        positions=positions,
        part_prefixes=("model.visual.",),
    )
