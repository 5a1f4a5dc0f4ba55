"""Image preprocessing in numpy + Pillow, matching the transformers CLIP / SigLIP image processors.

The exporter derives a plain dict from the Hugging Face image processor with
`preprocessing_config_from_hf` (:mod:`.preprocess_from_hf`) and stores it in manifest.json under
``"image_preprocessing"``; the runtime rebuilds the pipeline with `ImagePreprocessor.from_config`. Schema (all keys written
by the exporter; a reader fills the flags it misses with the HF class defaults of ``kind``)::

    {
      "kind": "clip",                        # "clip" | "siglip" (which HF class it came from)
      "do_convert_rgb": true,
      "do_resize": true,
      "size": {"shortest_edge": 336},        # or {"height": H, "width": W}
                                             # or {"shortest_edge": S, "longest_edge": L}
      "resample": 3,                         # PIL filter int: 0 nearest, 2 bilinear, 3 bicubic, 1 lanczos, ...
      "do_center_crop": true,
      "crop_size": {"height": 336, "width": 336},   # null when do_center_crop is false
      "do_rescale": true,
      "rescale_factor": 0.00392156862745098,
      "do_normalize": true,
      "image_mean": [0.48145466, 0.4578275, 0.40821073],
      "image_std": [0.26862954, 0.26130258, 0.27577711]
    }

What is replicated (transformers 5.x PIL backend, `PilBackend` in image_processing_backends.py, which
is also what `CLIPImageProcessor` / `SiglipImageProcessor` / AutoImageProcessor fall back to when
torchvision is not installed; transformers 4.x "slow" processors compute the same values):

* Inputs are converted to HxWx3 uint8 as transformers converts them (:mod:`.image_input`).
* Resize through Pillow on the uint8 image (``Image.resize((w, h), resample)``). Shortest-edge
  size: the short side becomes S and the long side ``int(S * long / short)`` (truncated, not
  rounded, as torchvision's ``Resize``); an exactly square image becomes SxS.
* Center crop on the array: ``top = (h - ch) // 2``, ``left = (w - cw) // 2``; an image smaller
  than the crop is zero-padded first with the *larger* half of the padding on the top/left
  (``ceil``), as ``image_transforms.center_crop`` does.
* Rescale in float64 (``x.astype(float64) * rescale_factor``) then cast to float32; normalize in
  float32 (``(x - mean) / std`` with float32 mean/std). The result is bit-identical to the PIL
  backend, not only within 1e-5.

The torchvision ("fast") backend, used by transformers when torchvision is installed, resizes with
torchvision's antialiased interpolation instead of Pillow's, which differs by a few uint8 levels
on some pixels; this module follows the PIL backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .errors import ArtifactError, RuntimeInputError
from .image_input import describe_image, to_rgb_array

__all__ = ["CLIP_DEFAULTS", "SIGLIP_DEFAULTS", "ImagePreprocessor"]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]

# The class defaults of transformers' CLIPImageProcessor and SiglipImageProcessor.
CLIP_DEFAULTS: dict[str, Any] = {
    "kind": "clip",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
}
SIGLIP_DEFAULTS: dict[str, Any] = {
    "kind": "siglip",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 3,
    "do_center_crop": False,
    "crop_size": None,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": IMAGENET_STANDARD_MEAN,
    "image_std": IMAGENET_STANDARD_STD,
}
KIND_DEFAULTS = {"clip": CLIP_DEFAULTS, "siglip": SIGLIP_DEFAULTS}
SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge")
# torchvision InterpolationMode values (strings) -> PIL filter ints, for fast processors that store those.
RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


# ------------------------------------------------------------------------------------ size arithmetic


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """image_transforms.get_resize_output_image_size(default_to_square=False), no max_size."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """image_transforms.get_size_with_aspect_ratio (shortest_edge + longest_edge)."""
    raw_size = None
    min_original = float(min(height, width))
    max_original = float(max(height, width))
    if max_original / min_original * size > max_size:
        raw_size = max_size * min_original / max_original
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        ow = size
        oh = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
    else:
        oh = size
        ow = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return oh, ow


def _center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """image_transforms.center_crop on an HxWxC array (zero padding when the image is smaller)."""
    orig_h, orig_w = array.shape[:2]
    top = (orig_h - crop_h) // 2
    left = (orig_w - crop_w) // 2
    bottom, right = top + crop_h, left + crop_w
    if top >= 0 and bottom <= orig_h and left >= 0 and right <= orig_w:
        return array[top:bottom, left:right]
    new_h, new_w = max(crop_h, orig_h), max(crop_w, orig_w)
    canvas = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    top_pad = math.ceil((new_h - orig_h) / 2)
    left_pad = math.ceil((new_w - orig_w) / 2)
    canvas[top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = array
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return canvas[max(0, top) : min(new_h, bottom), max(0, left) : min(new_w, right)]


# ------------------------------------------------------------------------------------------- config


def _as_bool(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):
        raise ArtifactError(f"image_preprocessing.{key} must be true or false, got {value!r}")
    return bool(value)


def _as_size(value: Any, key: str, *, crop: bool) -> dict[str, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = {"height": int(value), "width": int(value)} if crop else {"shortest_edge": int(value)}
    if not isinstance(value, Mapping):
        raise ArtifactError(f"image_preprocessing.{key} must be an object like {{'height': H, 'width': W}}, got {value!r}")
    size = {k: v for k, v in value.items() if v is not None}
    unknown = sorted(set(size) - set(SIZE_KEYS))
    if unknown:
        raise ArtifactError(f"image_preprocessing.{key} has unsupported keys {unknown}; supported: {list(SIZE_KEYS)}")
    for k, v in size.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ArtifactError(f"image_preprocessing.{key}.{k} must be a positive int, got {v!r}")
    size = {k: int(v) for k, v in size.items()}
    hw = "height" in size and "width" in size
    if crop and not hw:
        raise ArtifactError(f"image_preprocessing.{key} needs 'height' and 'width', got {sorted(size)}")
    if not crop and not hw and "shortest_edge" not in size:
        raise ArtifactError(f"image_preprocessing.{key} needs 'shortest_edge' or 'height' and 'width', got {sorted(size)}")
    return size


def _as_triple(value: Any, key: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        out = ()
    if len(out) != 3:
        raise ArtifactError(f"image_preprocessing.{key} must be 3 numbers, got {value!r}")
    if key == "image_std" and any(v == 0 for v in out):
        raise ArtifactError(f"image_preprocessing.{key} must not contain 0, got {value!r}")
    return out


def _as_resample(value: Any) -> int:
    if isinstance(value, str):
        if value.lower() not in RESAMPLE_NAMES:
            raise ArtifactError(f"image_preprocessing.resample {value!r} unknown; use one of {sorted(RESAMPLE_NAMES)}")
        return RESAMPLE_NAMES[value.lower()]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= 5:
        raise ArtifactError(f"image_preprocessing.resample must be a PIL filter int 0-5, got {value!r}")
    return int(value)


class ImagePreprocessor:
    """CLIP / SigLIP image preprocessing: ``pre(images) -> float32 [B, 3, H, W]``.

    Build it with `from_config` (the manifest's ``image_preprocessing`` dict). Accepts one image or a
    list/tuple of images; each is a path (str/Path), encoded bytes, a PIL image or a uint8 HxWxC array.
    """

    def __init__(
        self,
        *,
        kind: str = "clip",
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        size: Mapping[str, int] | None = None,
        resample: int = 3,
        do_center_crop: bool = False,
        crop_size: Mapping[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_STANDARD_MEAN,
        image_std: Sequence[float] = IMAGENET_STANDARD_STD,
    ) -> None:
        if kind not in KIND_DEFAULTS:
            raise ArtifactError(f"image_preprocessing.kind must be one of {sorted(KIND_DEFAULTS)}, got {kind!r}")
        self.kind = kind
        self.do_convert_rgb = bool(do_convert_rgb)
        self.do_resize = bool(do_resize)
        if do_resize and size is None:
            raise ArtifactError("image_preprocessing.size is missing")
        self.size = _as_size(size, "size", crop=False) if size is not None else None
        self.resample = _as_resample(resample)
        self.do_center_crop = bool(do_center_crop)
        self.crop_size = _as_size(crop_size, "crop_size", crop=True) if do_center_crop else None
        self.do_rescale = bool(do_rescale)
        if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, (int, float)):
            raise ArtifactError(f"image_preprocessing.rescale_factor must be a number, got {rescale_factor!r}")
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _as_triple(image_mean, "image_mean")
        self.image_std = _as_triple(image_std, "image_std")
        self._mean = np.array(self.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.array(self.image_std, dtype=np.float32).reshape(3, 1, 1)

    # -- config round trip -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImagePreprocessor:
        """Build from the manifest's ``image_preprocessing`` dict (see the module docstring)."""
        if not isinstance(config, Mapping):
            raise ArtifactError(f"image_preprocessing must be an object, got {type(config).__name__}")
        kind = config.get("kind", "clip")
        if kind not in KIND_DEFAULTS:
            raise ArtifactError(f"image_preprocessing.kind must be one of {sorted(KIND_DEFAULTS)}, got {kind!r}")
        d = KIND_DEFAULTS[kind]
        do_resize = _as_bool(config, "do_resize", d["do_resize"])
        do_center_crop = _as_bool(config, "do_center_crop", d["do_center_crop"])
        do_normalize = _as_bool(config, "do_normalize", d["do_normalize"])
        for key, needed in (("size", do_resize), ("crop_size", do_center_crop)):
            if needed and config.get(key) is None:
                raise ArtifactError(f"image_preprocessing.{key} is missing")
        if do_normalize and (config.get("image_mean") is None or config.get("image_std") is None):
            raise ArtifactError("image_preprocessing.image_mean / image_std are missing")
        return cls(
            kind=kind,
            do_convert_rgb=_as_bool(config, "do_convert_rgb", d["do_convert_rgb"]),
            do_resize=do_resize,
            size=config.get("size"),
            resample=config.get("resample", d["resample"]),
            do_center_crop=do_center_crop,
            crop_size=config.get("crop_size"),
            do_rescale=_as_bool(config, "do_rescale", d["do_rescale"]),
            rescale_factor=config.get("rescale_factor", d["rescale_factor"]),
            do_normalize=do_normalize,
            image_mean=config.get("image_mean") if config.get("image_mean") is not None else d["image_mean"],
            image_std=config.get("image_std") if config.get("image_std") is not None else d["image_std"],
        )

    def to_config(self) -> dict[str, Any]:
        """The manifest dict; ``from_config(p.to_config())`` rebuilds the same pipeline."""
        return {
            "kind": self.kind,
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "size": dict(self.size) if self.size else None,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": dict(self.crop_size) if self.crop_size else None,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input (no crop, shortest edge)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size and "width" in self.size and "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        return None

    def __repr__(self) -> str:
        return f"ImagePreprocessor({self.to_config()!r})"

    # -- processing --------------------------------------------------------------------------------

    def value_range(self, margin: float = 0.0) -> tuple[float, float]:
        """(lowest, highest) value `process_one` can produce (uint8 0 and 255, rescaled and normalized),
        each widened by `margin` times the span: what generate accepts as pixel_values."""
        scale = self.rescale_factor if self.do_rescale else 1.0
        ends = np.array([[0.0] * 3, [255.0 * scale] * 3])
        if self.do_normalize:
            ends = (ends - np.array(self.image_mean)) / np.array(self.image_std)
        low, high = float(ends.min()), float(ends.max())
        span = high - low
        return low - margin * span, high + margin * span

    def resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """Target (height, width) of the resize step for an input of (height, width)."""
        size = self.size
        if "shortest_edge" in size and "longest_edge" in size:
            return _size_with_aspect_ratio(height, width, size["shortest_edge"], size["longest_edge"])
        if "shortest_edge" in size:
            return _shortest_edge_size(height, width, size["shortest_edge"])
        return size["height"], size["width"]

    def process_one(self, image: Any) -> np.ndarray:
        """One image -> float32 [C, H, W]."""
        array = to_rgb_array(image, convert_rgb=self.do_convert_rgb)
        if array.shape[-1] != 3:
            raise RuntimeInputError(
                f"image {describe_image(image)} has {array.shape[-1]} channels after preprocessing; expected 3 "
                "(the artifact has do_convert_rgb = false)"
            )
        if self.do_resize:
            height, width = array.shape[:2]
            new_h, new_w = self.resize_shape(height, width)
            if new_h <= 0 or new_w <= 0:
                raise RuntimeInputError(f"image {describe_image(image)} of {width}x{height} is too thin to resize")
            pil = Image.fromarray(array)
            array = np.asarray(pil.resize((new_w, new_h), resample=self.resample))
        if self.do_center_crop:
            array = _center_crop(array, self.crop_size["height"], self.crop_size["width"])
        chw = np.transpose(array, (2, 0, 1))
        if self.do_rescale:
            out = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            out = chw.astype(np.float32)
        if self.do_normalize:
            out = (out - self._mean) / self._std
        return np.ascontiguousarray(out, dtype=np.float32)

    def __call__(self, images: Any) -> np.ndarray:
        """Images -> pixel_values float32 [B, 3, H, W] (B = 1 for a single image).

        `images` is one image, a list/tuple of images or a uint8 [B, H, W, C] array.
        """
        if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4):
            batch = list(images)  # a list, or a uint8 [B, H, W, C] array
        else:
            batch = [images]
        if not batch:
            raise RuntimeInputError("no images given")
        arrays = [self.process_one(image) for image in batch]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            listed = ", ".join(f"{a.shape[2]}x{a.shape[1]}" for a in arrays)
            raise RuntimeInputError(
                f"images have different sizes after preprocessing ({listed}); pass them one at a time"
            )
        return np.stack(arrays, axis=0)
