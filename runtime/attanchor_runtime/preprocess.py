"""Image preprocessing in numpy + Pillow, matching the transformers CLIP / SigLIP image processors.

The exporter derives a plain dict from the Hugging Face image processor with
`preprocessing_config_from_hf` and stores it in manifest.json under ``"image_preprocessing"``;
the runtime rebuilds the pipeline with `ImagePreprocessor.from_config`. Schema (all keys written
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

* Inputs. A path (str/Path) or bytes is decoded like ``transformers.image_utils.load_image``:
  EXIF orientation applied, then ``convert("RGB")`` (alpha is *dropped*, not composited). A PIL
  image is converted like ``image_transforms.convert_to_rgb``: images with an alpha band or a
  ``transparency`` entry (RGBA, LA, PA, P with tRNS, ...) are alpha-composited onto white, others
  go through ``convert("RGB")``; no EXIF transpose. A numpy HxWxC uint8 array: C=1 is repeated to
  3 channels, C=4 is blended onto white in float64 and rounded (``np.round``), C=3 is kept;
  an HxW array is treated as grayscale.
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

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import ArtifactError, RuntimeInputError, one_line

__all__ = [
    "CLIP_DEFAULTS",
    "ImagePreprocessor",
    "SIGLIP_DEFAULTS",
    "load_image",
    "preprocessing_config_from_hf",
    "to_rgb_array",
]

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
_DEFAULTS = {"clip": CLIP_DEFAULTS, "siglip": SIGLIP_DEFAULTS}
_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge")
# torchvision InterpolationMode values (strings) -> PIL filter ints, for fast processors that store those.
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


# --------------------------------------------------------------------------------------------- inputs


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
    return f"<{type(image).__name__}>"


def _decode_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a recognised image format"
    return one_line(exc) or type(exc).__name__


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB PIL image, as transformers' ``load_image`` does.

    EXIF orientation is applied and the image is converted with ``convert("RGB")`` (alpha dropped).
    Raises RuntimeInputError("cannot decode image '<name>': <reason>") when it cannot be read.
    """
    name = _describe(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            image = Image.open(os.fspath(source))
        image.load()  # Image.open is lazy: force the decode here so errors carry the file name
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, EOFError, struct.error, ...
        raise RuntimeInputError(f"cannot decode image '{name}': {_decode_reason(exc)}") from exc


def _pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """transformers.image_transforms.convert_to_rgb(image, return_numpy=True) for a PIL image."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, image).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return np.array(rgb)


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """convert_to_rgb for a channels-last uint8 array: repeat gray, blend RGBA onto white (float64, round)."""
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    if channels == 3:
        return array
    raise RuntimeInputError(f"image {name} has {channels} channels; expected 1, 3 or 4")


def to_rgb_array(image: Any, convert_rgb: bool = True) -> np.ndarray:
    """One input (path, bytes, PIL image or HxWxC uint8 array) -> HxWxC uint8 array, HF conversion rules.

    With ``convert_rgb=False`` the image keeps its own channels (HxW arrays get a channel axis),
    as the HF processors do with ``do_convert_rgb=False``.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return np.array(load_image(image))
    if isinstance(image, Image.Image):
        name = _describe(image)
        try:
            array = _pil_to_rgb_array(image) if convert_rgb else np.array(image)
        except Exception as exc:
            raise RuntimeInputError(f"cannot decode image '{name}': {_decode_reason(exc)}") from exc
        return array if array.ndim == 3 else array[:, :, None]
    if isinstance(image, np.ndarray):
        name = f"<array {image.dtype} {tuple(image.shape)}>"
        if image.dtype != np.uint8:
            raise RuntimeInputError(f"numpy image {name} must be uint8 HxWxC with C in 1, 3, 4")
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise RuntimeInputError(f"numpy image {name} must be uint8 HxWxC with C in 1, 3, 4")
        if min(image.shape[:2]) == 0:
            raise RuntimeInputError(f"numpy image {name} is empty")
        if convert_rgb:
            return np.ascontiguousarray(_array_to_rgb(image, name))
        return np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None])
    raise RuntimeInputError(
        f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image or a uint8 HxWxC array"
    )


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
    unknown = sorted(set(size) - set(_SIZE_KEYS))
    if unknown:
        raise ArtifactError(f"image_preprocessing.{key} has unsupported keys {unknown}; supported: {list(_SIZE_KEYS)}")
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
        if value.lower() not in _RESAMPLE_NAMES:
            raise ArtifactError(f"image_preprocessing.resample {value!r} unknown; use one of {sorted(_RESAMPLE_NAMES)}")
        return _RESAMPLE_NAMES[value.lower()]
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
        if kind not in _DEFAULTS:
            raise ArtifactError(f"image_preprocessing.kind must be one of {sorted(_DEFAULTS)}, got {kind!r}")
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
        if kind not in _DEFAULTS:
            raise ArtifactError(f"image_preprocessing.kind must be one of {sorted(_DEFAULTS)}, got {kind!r}")
        d = _DEFAULTS[kind]
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
                f"image {_describe(image)} has {array.shape[-1]} channels after preprocessing; expected 3 "
                "(the artifact has do_convert_rgb = false)"
            )
        if self.do_resize:
            height, width = array.shape[:2]
            new_h, new_w = self.resize_shape(height, width)
            if new_h <= 0 or new_w <= 0:
                raise RuntimeInputError(f"image {_describe(image)} of {width}x{height} is too thin to resize")
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


# ------------------------------------------------------------------------------------ from transformers


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
    out = {k: int(v) for k, v in items.items() if v is not None and k in _SIZE_KEYS}
    unsupported = sorted(k for k, v in items.items() if v is not None and k not in _SIZE_KEYS)
    if unsupported:
        raise ValueError(f"unsupported image processor size keys {unsupported}")
    return out


def _hf_resample(value: Any) -> int:
    if value is None:
        return 2  # transformers resizes with BILINEAR when resample is None
    raw = getattr(value, "value", value)
    if isinstance(raw, str):  # torchvision InterpolationMode
        if raw.lower() not in _RESAMPLE_NAMES:
            raise ValueError(f"unsupported resample mode {value!r}")
        return _RESAMPLE_NAMES[raw.lower()]
    return int(raw)


def preprocessing_config_from_hf(image_processor: Any) -> dict[str, Any]:
    """The manifest ``image_preprocessing`` dict of a transformers CLIP/SigLIP image processor.

    Accepts the image processor or a processor holding one (``processor.image_processor``). Only
    reads attributes: transformers is not imported here.
    """
    if not hasattr(image_processor, "image_mean") and hasattr(image_processor, "image_processor"):
        image_processor = image_processor.image_processor
    kind = _hf_kind(image_processor)
    defaults = _DEFAULTS[kind]

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
