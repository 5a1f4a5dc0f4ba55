"""`--threshold auto`: the anchor threshold at which a target share of question tokens become anchors.

The paper's fixed 0.12 assumes an embedding space where unrelated words and patches score near 0.
Trained LLM input embeddings are anisotropic (SmolLM2: two random tokens already score 0.44 on average),
so a fixed number means "anchor everything" on one model and "anchor nothing" on another. What carries
over between models is the rate: the paper reports about 10% of text tokens becoming anchors. So the
threshold is the (1 - rate) quantile of each candidate token's best cosine to any image patch, over a
calibration set, computed on the PyTorch model before tracing (every later check sees the final value).
"""

from __future__ import annotations

import numpy as np
from attanchor_graphs.specification import cosine_scores
from attanchor_runtime.manifest import Calibration

from attanchor_export.errors import ExportError
from attanchor_export.load.datasets import load_calibration_set

TARGET_RATE = 0.10


def calibration_prompts(source: str | None, limit: int = 256) -> list[tuple[object, str]]:
    """(image, question) pairs from the calibration set (`--calib`: easy-vqa, a folder, JSONL; else built in)."""
    return [(s.image, s.prompt) for s in load_calibration_set(source, limit=limit)]


def best_scores(loaded, tokenizer, image_processor, pairs, batch: int = 32, excluded_token_ids=()) -> np.ndarray:
    """Best cosine over patches for every candidate (text token after the image that is not excluded:
    the words, see attanchor_export.trace.candidates) of every prompt."""
    import torch  # the PyTorch side is imported when used: `bench --threshold auto` needs threshold_for_rate only
    from attanchor_runtime.image_input import load_image
    from PIL import Image

    from attanchor_export.source_model import image_features

    image_token_id = loaded.tokens.image_token_id
    embed = loaded.family.embed_tokens(loaded.model)
    excluded = {int(i) for i in excluded_token_ids}
    scores = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        # --calib images through the runtime's bounded loader (size limits, 16-bit scaling), as at run time.
        images = [load_image(im) if isinstance(im, str) else Image.fromarray(np.asarray(im)) for im, _ in chunk]
        pixels = image_processor(images=images, return_tensors="np")["pixel_values"]
        features = image_features(loaded, pixels).float().numpy()
        for (_, question), feats in zip(chunk, features, strict=True):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if image_token_id not in ids:
                continue
            after = ids[ids.index(image_token_id) + 1 :]
            # A run of placeholders (processors that expand <image>) is one image slot: skip the rest of it.
            after = [t for t in after if t != image_token_id and t not in excluded]
            if not after:
                continue
            with torch.no_grad():
                rows = embed(torch.as_tensor(after)).float().numpy()
            scores.append(cosine_scores(rows[None], feats[None])[0].max(axis=1))
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def threshold_for_rate(scores: np.ndarray, rate: float = TARGET_RATE) -> float:
    """The threshold at which `rate` of the candidates (their best cosines: `scores`) become anchors."""
    return float(np.quantile(np.asarray(scores, np.float64), 1.0 - rate))


def calibrate(loaded, tokenizer, image_processor, source: str | None, rate: float = TARGET_RATE,
              excluded_token_ids=()) -> Calibration:
    """The manifest's anchor calibration record; `threshold` is the chosen value."""
    pairs = calibration_prompts(source)
    scores = best_scores(loaded, tokenizer, image_processor, pairs, excluded_token_ids=excluded_token_ids)
    if scores.size == 0:
        raise ExportError("--threshold auto: no calibration prompt has a candidate word after the image placeholder")
    threshold = threshold_for_rate(scores, rate)
    return Calibration(threshold=round(threshold, 6), target_rate=rate,
                       rate=float((scores >= np.float32(round(threshold, 6))).mean()), candidates=int(scores.size),
                       prompts=len(pairs), source=source or "builtin")
