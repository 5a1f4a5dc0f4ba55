"""Read a transformers CLIP / SigLIP image processor into the manifest's ``image_preprocessing`` dict.

Runs at export time and only reads attributes: transformers is not imported here. The dict is
validated with `ImagePreprocessor.from_config` before it is returned, so a bad one fails the export,
not the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .preprocess import KIND_DEFAULTS, RESAMPLE_NAMES, SIZE_KEYS, ImagePreprocessor

__all__ = ["preprocessing_config_from_hf"]


def _hf_kind(processor: Any) -> str:
    name = type(processor).__name__
    lowered = name.lower()
    if lowered.startswith("siglip2"):
        raise ValueError(f"unsupported image processor {name}: SigLIP2 (NaFlex) preprocessing is not supported")
    if lowered.startswith("siglip"):
        return "siglip"
    if lowered.startswith("clip"):
        return "clip"
    raise ValueError(
        f"unsupported image processor {name}: only CLIPImageProcessor and SiglipImageProcessor "
        "(and their Fast/Pil variants) are supported"
    )


def _hf_size(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return {"shortest_edge": int(value)}
    items = dict(value)  # dict, or transformers.image_utils.SizeDict (iterates over non-None pairs)
    out = {k: int(v) for k, v in items.items() if v is not None and k in SIZE_KEYS}
    unsupported = sorted(k for k, v in items.items() if v is not None and k not in SIZE_KEYS)
    if unsupported:
        raise ValueError(f"unsupported image processor size keys {unsupported}")
    return out


def _hf_resample(value: Any) -> int:
    if value is None:
        return 2  # transformers resizes with BILINEAR when resample is None
    raw = getattr(value, "value", value)
    if isinstance(raw, str):  # torchvision InterpolationMode
        if raw.lower() not in RESAMPLE_NAMES:
            raise ValueError(f"unsupported resample mode {value!r}")
        return RESAMPLE_NAMES[raw.lower()]
    return int(raw)


def preprocessing_config_from_hf(image_processor: Any) -> dict[str, Any]:
    """The manifest ``image_preprocessing`` dict of a transformers CLIP/SigLIP image processor.

    Accepts the image processor or a processor holding one (``processor.image_processor``). Only
    reads attributes: transformers is not imported here.
    """
    if not hasattr(image_processor, "image_mean") and hasattr(image_processor, "image_processor"):
        image_processor = image_processor.image_processor
    kind = _hf_kind(image_processor)
    defaults = KIND_DEFAULTS[kind]

    def attr(name: str) -> Any:
        value = getattr(image_processor, name, None)
        return defaults[name] if value is None and defaults.get(name) is not None else value

    do_resize = bool(attr("do_resize"))
    do_center_crop = bool(getattr(image_processor, "do_center_crop", None) or False)
    do_normalize = bool(attr("do_normalize"))
    mean = attr("image_mean")
    std = attr("image_std")
    config = {
        "kind": kind,
        "do_convert_rgb": bool(attr("do_convert_rgb")),
        "do_resize": do_resize,
        "size": _hf_size(getattr(image_processor, "size", None)),
        "resample": _hf_resample(getattr(image_processor, "resample", None)),
        "do_center_crop": do_center_crop,
        "crop_size": _hf_size(getattr(image_processor, "crop_size", None)) if do_center_crop else None,
        "do_rescale": bool(attr("do_rescale")),
        "rescale_factor": float(attr("rescale_factor")),
        "do_normalize": do_normalize,
        "image_mean": [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)],
        "image_std": [float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3)],
    }
    if do_center_crop and config["crop_size"] is not None and "shortest_edge" in config["crop_size"]:
        edge = config["crop_size"]["shortest_edge"]
        config["crop_size"] = {"height": edge, "width": edge}
    ImagePreprocessor.from_config(config)  # validate now, at export time, not on the device
    return config
