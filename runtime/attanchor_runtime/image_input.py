"""One user image (path, bytes, PIL image, uint8 array) -> an HxWxC uint8 array, as transformers converts it.

* A path (str/Path) or bytes is decoded like ``transformers.image_utils.load_image``: EXIF
  orientation applied, then ``convert("RGB")`` (alpha is *dropped*, not composited).
* A PIL image is converted like ``image_transforms.convert_to_rgb``: images with an alpha band or a
  ``transparency`` entry (RGBA, LA, PA, P with tRNS, ...) are alpha-composited onto white, others
  go through ``convert("RGB")``; no EXIF transpose.
* A numpy HxWxC uint8 array: C=1 is repeated to 3 channels, C=4 is blended onto white in float64
  and rounded (``np.round``), C=3 is kept; an HxW array is treated as grayscale.

Errors are RuntimeInputError naming the image (`describe_image`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import RuntimeInputError, one_line

__all__ = ["describe_image", "load_image", "to_rgb_array"]


def describe_image(image: Any) -> str:
    """How an input image is named in error messages."""
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
    name = describe_image(source)
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
        name = describe_image(image)
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
