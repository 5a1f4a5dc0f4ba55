"""What the benchmark asks: default prompts and a deterministic picture, so it needs no files."""

from __future__ import annotations

import numpy as np

# LLaVA-style VQA questions of about 40 text tokens with Llama tokenizers (chat template included).
DEFAULT_PROMPTS = (
    "Describe the image in detail. What is shown in the photo, where is the cat sitting, what color is the "
    "car next to the green tree, and is it day or night?",
    "How many people are there in the picture? What is the man holding, what is the woman doing, and which "
    "object is on the left of the table near the window?",
)


def synthetic_image(width: int = 640, height: int = 480, seed: int = 0):
    """A deterministic RGB test picture (gradients, blocks and noise), so the bench needs no file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        rgb[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.integers(0, 256, 3)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")

