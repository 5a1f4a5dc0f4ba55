"""tiny-scenes and tiny-scenes-noanchor: tiny-vqa's model trained on the tiny-scenes task, with and without
AttAnchor in the training layout (scripts/train_tiny_scenes.py), to check the paper's claim in miniature.

Same base as tiny-vqa (SmolLM2-135M-Instruct from its PyPI wheel + a 4-layer CLIP tower, projector and
LoRA); only the committed parts and the declared AttAnchor defaults differ. The baseline declares a
threshold above 1, so its exported graphs insert no anchors, as in its training.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
PARTS = HERE / "tiny_scenes_parts"
NOANCHOR_PARTS = HERE / "tiny_scenes_noanchor_parts"

# alias -> (parts folder, attanchor_config.json). "auto": the threshold that anchors 10% of the words
# after the image on tiny-scenes train images, as in training (recalibrated as the features moved).
MODELS = {
    "tiny-scenes": (PARTS, {"threshold": "auto", "calib": "tiny-scenes", "task": "tiny-scenes"}),
    "tiny-scenes-noanchor": (NOANCHOR_PARTS, {"threshold": 2.0, "calib": "tiny-scenes", "task": "tiny-scenes"}),
}


def checkpoint_folder(name: str) -> Path:
    from attanchor_export.load.tiny_vqa import checkpoint_folder as assemble

    parts, defaults = MODELS[name]
    return assemble(name, parts, defaults)
