"""--show-anchors: the model's view of the image with every patch that received anchors outlined and
labelled with its words. People check where anchors land by looking, not by reading index lists."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

SCALE_TO = 512  # output side in pixels: tiny model inputs (30 px) are unreadable at 1:1


def model_view(pipe, image) -> np.ndarray:
    """The preprocessed image as uint8 HWC: what the vision tower sees, after resize and crop."""
    pre = pipe.family.view_processor()
    pixels = pre(image)[0].transpose(1, 2, 0).astype(np.float64)
    if pre.do_normalize:
        pixels = pixels * np.asarray(pre.image_std) + np.asarray(pre.image_mean)
    scale = pre.rescale_factor if pre.do_rescale else 1 / 255
    return np.clip(np.round(pixels / scale), 0, 255).astype(np.uint8)


def token_label(pipe, token_id: int) -> str:
    """A readable name for an anchored token: its text, or its escaped form for template tokens
    (newlines, <|im_end|>), which are candidates too and would otherwise print as nothing."""
    text = pipe.text.decode([token_id], skip_special_tokens=False)
    return text.strip() or repr(text).strip("'")


def patch_labels(pipe, prompt: str, anchors) -> dict[int, list[str]]:
    ids = pipe.prompt_ids(prompt)
    labels = defaultdict(list)
    for text_index, image_index in anchors:
        word = token_label(pipe, int(ids[text_index]))
        if word not in labels[image_index]:
            labels[image_index].append(word)
    return labels


def _font(size: int):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 scales its built-in font; older ones have only the 11 px bitmap
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_anchors(pipe, image, prompt: str, anchors, path, caption: str | None = None) -> Path:
    """Write a PNG: the model's view scaled to SCALE_TO, anchored patches outlined and labelled with their
    words, the patch grid faintly drawn, and the prompt (plus `caption`, e.g. the answer) underneath."""
    from PIL import Image, ImageDraw

    rows, cols = pipe.family.patch_grid()  # image tokens over the image (Qwen2.5-VL: the merged grid)
    view = Image.fromarray(model_view(pipe, image))
    width_px = round(SCALE_TO * view.width / view.height)
    view = view.resize((width_px, SCALE_TO), Image.Resampling.NEAREST)
    lines = [f"Q: {prompt}"] + ([caption] if caption else []) + [f"{len(anchors)} anchor(s), outlined"]
    font, small = _font(20), _font(16)
    canvas = Image.new("RGB", (max(width_px, SCALE_TO), SCALE_TO + 30 * len(lines) + 10), (255, 255, 255))
    canvas.paste(view, (0, 0))
    draw = ImageDraw.Draw(canvas)
    cell_h, cell_w = SCALE_TO / rows, width_px / cols
    for i in range(1, cols):  # the patch grid, so a reader can count patches
        draw.line([(i * cell_w, 0), (i * cell_w, SCALE_TO)], fill=(255, 255, 255), width=1)
    for i in range(1, rows):
        draw.line([(0, i * cell_h), (width_px, i * cell_h)], fill=(255, 255, 255), width=1)
    for image_index, words in sorted(patch_labels(pipe, prompt, anchors).items()):
        row, col = divmod(image_index, cols)
        box = (col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1)
        draw.rectangle(box, outline=(255, 220, 0), width=4)
        text = ",".join(words)
        width = draw.textlength(text, font=small)
        x, y = min(box[0] + 4, width_px - width - 4), box[1] + 4  # labels stay inside the image
        bbox = draw.textbbox((x, y), text, font=small)
        draw.rectangle((bbox[0] - 2, bbox[1] - 2, bbox[2] + 2, bbox[3] + 2), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 220, 0), font=small)
    for i, line in enumerate(lines):
        draw.text((10, SCALE_TO + 8 + 30 * i), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    canvas.save(path)
    return path
