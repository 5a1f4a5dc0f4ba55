"""One user image (path, bytes, PIL image, uint8 array) -> an HxWxC uint8 array, as transformers converts it.

Every image path of the runtime goes through here (Pipeline.images / chat / stream, the CLI's run and
eval, and a server's decoded data URLs: pass the bytes to `load_image` or `Pipeline.images`).

* A path (str/Path) or bytes is decoded like ``transformers.image_utils.load_image``: EXIF
  orientation applied, then ``convert("RGB")`` (alpha is *dropped*, not composited).
* A PIL image is converted like ``image_transforms.convert_to_rgb``: images with an alpha band or a
  ``transparency`` entry (RGBA, LA, PA, P with tRNS, ...) are alpha-composited onto white, others
  go through ``convert("RGB")``; no EXIF transpose.
* A numpy HxWxC uint8 array: C=1 is repeated to 3 channels, C=4 is blended onto white in float64
  and rounded (``np.round``), C=3 is kept; an HxW array is treated as grayscale.

Where this differs from transformers, on purpose:

* Size bounds, checked from the file's header before the pixels are decoded (and on PIL images and
  arrays before anything is resized): at most MAX_IMAGE_PIXELS pixels (width x height) and at most
  MAX_ASPECT_RATIO between the long and the short side; beyond either the image is refused in one
  line (not shrunk). A shortest-edge resize makes the long side huge first: a 100000x1 PNG of 372
  bytes took 4.7 GB to preprocess for a 336-pixel model.
* 16-bit grayscale (Pillow modes I;16, I;16B, I;16L and I, which 16-bit PNGs and TIFFs open as) is
  scaled to 8 bits by its high byte, as Pillow itself reads 16-bit RGB PNGs; ``convert("RGB")``
  would clip every value above 255 to white. Values of a 32-bit mode I image above 65535 clip.

Errors are RuntimeInputError naming the image (`describe_image`).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import RuntimeInputError, one_line

__all__ = ["MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "check_image_size", "describe_image", "load_image",
           "to_rgb_array"]

MAX_IMAGE_PIXELS = 64_000_000  # width x height: an 8000x8000 photo (192 MB as RGB, 128 MB at 16 bits)
MAX_ASPECT_RATIO = 50  # long side / short side: a 50:1 strip resizes to 336 x 16,800 at most (17 MB)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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


def check_image_size(width: int, height: int, name: str) -> None:
    """RuntimeInputError when an image is over MAX_IMAGE_PIXELS or more elongated than MAX_ASPECT_RATIO."""
    if width * height > MAX_IMAGE_PIXELS:
        raise RuntimeInputError(
            f"image '{name}' is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} (attanchor_runtime.image_input.MAX_IMAGE_PIXELS): downscale it first"
        )
    short, long = min(width, height), max(width, height)
    if short < 1 or long > MAX_ASPECT_RATIO * short:
        raise RuntimeInputError(
            f"image '{name}' is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1 "
            "(attanchor_runtime.image_input.MAX_ASPECT_RATIO): crop it first"
        )


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit by the high byte (convert("RGB") would clip it to white)."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    array = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(array.astype(np.uint8), "L")


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB PIL image, as transformers' ``load_image`` does.

    EXIF orientation is applied and the image is converted with ``convert("RGB")`` (alpha dropped);
    16-bit grayscale is scaled to 8 bits first. The size is checked from the header before the pixels
    are decoded (`check_image_size`). Raises RuntimeInputError naming the image when it is over the
    limits or cannot be read ("cannot decode image '<name>': <reason>").
    """
    name = describe_image(source)
    try:
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS anyway: refused below, in our own words
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                image = Image.open(io.BytesIO(bytes(source)))
            else:
                image = Image.open(os.fspath(source))
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: it refuses before we can
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found.group(1)) / 1e6:.0f} megapixels)" if found else ""
        raise RuntimeInputError(f"image '{name}'{size} is over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels "
                                "(attanchor_runtime.image_input.MAX_IMAGE_PIXELS): downscale it first") from exc
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, EOFError, struct.error, ...
        raise RuntimeInputError(f"cannot decode image '{name}': {_decode_reason(exc)}") from exc
    check_image_size(*image.size, name)  # from the header: nothing is decoded yet
    try:
        image.load()  # Image.open is lazy: force the decode here so errors carry the file name
        image = ImageOps.exif_transpose(image)
        return _to_8_bit(image).convert("RGB")
    except Exception as exc:
        raise RuntimeInputError(f"cannot decode image '{name}': {_decode_reason(exc)}") from exc


def _pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """transformers.image_transforms.convert_to_rgb(image, return_numpy=True) for a PIL image."""
    image = _to_8_bit(image)
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
        check_image_size(*image.size, name)
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
        check_image_size(image.shape[1], image.shape[0], name)
        if convert_rgb:
            return np.ascontiguousarray(_array_to_rgb(image, name))
        return np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None])
    raise RuntimeInputError(
        f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image or a uint8 HxWxC array"
    )
