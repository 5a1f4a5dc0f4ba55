"""attanchor_runtime.preprocess against transformers' CLIP / SigLIP image processors (max abs diff <= 1e-5)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from attanchor_runtime.errors import ArtifactError, RuntimeInputError
from attanchor_runtime.preprocess import ImagePreprocessor
from attanchor_runtime.preprocess_from_hf import preprocessing_config_from_hf
from PIL import Image

TOL = 1e-5


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _smooth(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    """Noise plus gradients, so resampling filters see both edges and smooth areas."""
    rng = _rng(seed)
    noise = rng.integers(0, 256, (height, width, channels)).astype(np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (255 * (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2)[..., None]
    return np.clip(0.5 * noise + 0.5 * ramp, 0, 255).astype(np.uint8)


def make_images() -> dict[str, Image.Image]:
    """Every PIL mode the runtime has to convert, at awkward sizes."""
    rgba = Image.fromarray(_smooth(37, 23, 4, 1), "RGBA")
    palette_t = Image.fromarray(_smooth(29, 41, 3, 4), "RGB").quantize(8)
    palette_t.info["transparency"] = 3  # a tRNS entry: HF composites such images onto white
    return {
        "rgb_wide": Image.fromarray(_smooth(31, 17, 3, 0), "RGB"),
        "rgb_tall": Image.fromarray(_smooth(20, 53, 3, 2), "RGB"),
        "rgb_square": Image.fromarray(_smooth(45, 45, 3, 3), "RGB"),
        "rgb_large": Image.fromarray(_smooth(640, 480, 3, 5), "RGB"),
        "rgb_tiny": Image.fromarray(_smooth(5, 2, 3, 6), "RGB"),
        "rgb_thin": Image.fromarray(_smooth(40, 1, 3, 7), "RGB"),
        "rgba": rgba,
        "gray": Image.fromarray(_smooth(33, 26, 1, 8)[..., 0], "L"),
        "gray_alpha": Image.fromarray(_smooth(26, 19, 2, 9), "LA"),
        "palette": Image.fromarray(_smooth(29, 41, 3, 10), "RGB").quantize(16),
        "palette_transparent": palette_t,
        "cmyk": Image.fromarray(_smooth(21, 24, 3, 11), "RGB").convert("CMYK"),
    }


IMAGES = make_images()


def hf_processors():
    """(id, processor) pairs: tiny sizes, the real defaults (CLIP 224/336, SigLIP 224) and odd options."""
    from transformers import (
        CLIPImageProcessor,
        CLIPImageProcessorPil,
        SiglipImageProcessor,
        SiglipImageProcessorPil,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [
            # the class AutoImageProcessor resolves to (falls back to the PIL backend without torchvision)
            ("clip-30", CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})),
            ("clip-336", CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336)),
            ("clip-default", CLIPImageProcessorPil()),
            ("clip-rect-crop", CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 28})),
            ("clip-no-resize-pad", CLIPImageProcessorPil(do_resize=False, crop_size={"height": 40, "width": 30})),
            ("clip-short-long", CLIPImageProcessorPil(size={"shortest_edge": 30, "longest_edge": 40}, do_center_crop=False)),
            ("clip-bilinear", CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size=30, resample=2)),
            ("siglip-32", SiglipImageProcessor(size={"height": 32, "width": 32})),
            ("siglip-default", SiglipImageProcessorPil()),
            ("siglip-rect", SiglipImageProcessorPil(size={"height": 24, "width": 40})),
            ("siglip-no-normalize", SiglipImageProcessorPil(size={"height": 16, "width": 16}, do_normalize=False)),
        ]


PROCESSORS = hf_processors()


def _hf(processor, images) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = processor(images, return_tensors="np")["pixel_values"]
    return np.asarray(out)


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.abs(got.astype(np.float64) - ref.astype(np.float64)).max() <= TOL


@pytest.mark.parametrize("name,processor", PROCESSORS, ids=[p[0] for p in PROCESSORS])
def test_pil_inputs_match_hf(name, processor):
    ours = ImagePreprocessor.from_config(preprocessing_config_from_hf(processor))
    fixed = ours.output_size is not None
    for key, image in IMAGES.items():
        ref = _hf(processor, image)
        got = ours(image)
        _assert_close(got, ref)
        if fixed:
            assert got.shape[2:] == ours.output_size, key


@pytest.mark.parametrize("name,processor", PROCESSORS[:2] + PROCESSORS[7:8], ids=["clip-30", "clip-336", "siglip-32"])
def test_numpy_inputs_match_hf(name, processor):
    ours = ImagePreprocessor.from_config(preprocessing_config_from_hf(processor))
    arrays = {
        "rgb": _smooth(31, 17, 3, 20),
        "rgba": _smooth(37, 23, 4, 21),
        "gray_hw1": _smooth(26, 33, 1, 22),
        "large": _smooth(500, 375, 3, 23),
    }
    for array in arrays.values():
        _assert_close(ours(array), _hf(processor, array))
    # an HxW array is grayscale: same as HxWx1
    gray = arrays["gray_hw1"]
    np.testing.assert_array_equal(ours(gray[..., 0]), ours(gray))


def test_batch_and_list_inputs():
    processor = PROCESSORS[0][1]
    ours = ImagePreprocessor.from_config(preprocessing_config_from_hf(processor))
    batch = [IMAGES["rgb_wide"], IMAGES["rgba"], IMAGES["gray"]]
    got = ours(batch)
    assert got.shape == (3, 3, 30, 30)
    _assert_close(got, _hf(processor, batch))
    np.testing.assert_array_equal(ours(tuple(batch)), got)
    stacked = np.stack([_smooth(31, 17, 3, 30), _smooth(31, 17, 3, 31)])  # uint8 [B, H, W, C]
    _assert_close(ours(stacked), _hf(processor, list(stacked)))
    assert ours(IMAGES["gray"]).shape == (1, 3, 30, 30)


def test_paths_and_bytes_decode_like_hf_load_image(tmp_path):
    """A path goes through HF's load_image: EXIF orientation applied, alpha dropped by convert("RGB")."""
    processor = PROCESSORS[0][1]
    ours = ImagePreprocessor.from_config(preprocessing_config_from_hf(processor))

    rgba_path = tmp_path / "rgba.png"
    IMAGES["rgba"].save(rgba_path)
    ref = _hf(processor, str(rgba_path))
    _assert_close(ours(str(rgba_path)), ref)
    _assert_close(ours(rgba_path), ref)  # pathlib.Path
    _assert_close(ours(rgba_path.read_bytes()), ref)
    # a PIL RGBA image is composited onto white instead, so the results differ (as in transformers)
    assert np.abs(ours(IMAGES["rgba"]) - ref).max() > 0.1

    rotated = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    IMAGES["rgb_wide"].save(rotated, exif=exif)
    ref = _hf(processor, str(rotated))
    _assert_close(ours(str(rotated)), ref)
    _assert_close(ours(rotated.read_bytes()), ref)

    jpeg = tmp_path / "photo.jpg"
    IMAGES["rgb_large"].save(jpeg, quality=90)
    _assert_close(ours([str(jpeg), jpeg.read_bytes()]), _hf(processor, [str(jpeg), str(jpeg)]))


def test_auto_image_processor_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    for name, processor in (PROCESSORS[1], PROCESSORS[7]):
        folder = tmp_path / name
        processor.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoImageProcessor.from_pretrained(folder)
        config = preprocessing_config_from_hf(loaded)
        assert config == preprocessing_config_from_hf(processor)
        config = json.loads(json.dumps(config))  # what the manifest stores
        ours = ImagePreprocessor.from_config(config)
        assert ImagePreprocessor.from_config(ours.to_config()).to_config() == ours.to_config()
        _assert_close(ours(IMAGES["rgb_tall"]), _hf(loaded, IMAGES["rgb_tall"]))


def test_config_schema():
    clip = preprocessing_config_from_hf(PROCESSORS[1][1])
    assert clip == {
        "kind": "clip",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 336},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 336, "width": 336},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    siglip = preprocessing_config_from_hf(PROCESSORS[8][1])
    assert siglip["kind"] == "siglip" and siglip["size"] == {"height": 224, "width": 224}
    assert siglip["do_center_crop"] is False and siglip["crop_size"] is None
    assert ImagePreprocessor.from_config(siglip).output_size == (224, 224)
    assert ImagePreprocessor.from_config(clip).output_size == (336, 336)
    no_crop = dict(clip, do_center_crop=False, crop_size=None)
    assert ImagePreprocessor.from_config(no_crop).output_size is None
    # a processor object holding an image processor works too
    holder = type("LlavaProcessor", (), {"image_processor": PROCESSORS[1][1]})()
    assert preprocessing_config_from_hf(holder) == clip


def test_bad_configs_raise_artifact_error():
    good = preprocessing_config_from_hf(PROCESSORS[0][1])
    bad = [
        dict(good, kind="vit"),
        dict(good, size=None),
        dict(good, size={"longest_edge": 30}),
        dict(good, crop_size={"shortest_edge": 30}),
        dict(good, resample=9),
        dict(good, image_mean=[0.5, 0.5]),
        dict(good, image_std=[0.5, 0.0, 0.5]),
        dict(good, do_resize="yes"),
    ]
    for config in bad:
        with pytest.raises(ArtifactError) as info:
            ImagePreprocessor.from_config(config)
        assert "\n" not in str(info.value) and "image_preprocessing" in str(info.value)

    class ViTImageProcessor:
        image_mean = [0.5] * 3

    with pytest.raises(ValueError, match="unsupported image processor ViTImageProcessor"):
        preprocessing_config_from_hf(ViTImageProcessor())


def test_undecodable_inputs_raise_runtime_input_error(tmp_path):
    ours = ImagePreprocessor.from_config(preprocessing_config_from_hf(PROCESSORS[0][1]))
    with pytest.raises(RuntimeInputError, match=r"^cannot decode image '<10 bytes>': "):
        ours(b"not an img")
    with pytest.raises(RuntimeInputError, match=r"^cannot decode image 'x\.jpg': no such file$"):
        ours("x.jpg")
    broken = tmp_path / "x.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(RuntimeInputError, match=r"^cannot decode image '.*x\.jpg': "):
        ours(str(broken))
    buf = io.BytesIO()
    IMAGES["rgb_large"].save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(RuntimeInputError, match=r"^cannot decode image '.*truncated\.png': ") as info:
        ours(truncated)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)

    for value, pattern in (
        (np.zeros((8, 8, 3), np.float32), "must be uint8"),
        (np.zeros((8, 8, 2), np.uint8), "must be uint8 HxWxC"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (12, "unsupported image type int"),
        ([], "no images"),
    ):
        with pytest.raises(RuntimeInputError, match=pattern):
            ours(value)


def test_different_sizes_without_crop_are_rejected():
    config = dict(preprocessing_config_from_hf(PROCESSORS[0][1]), do_center_crop=False, crop_size=None)
    ours = ImagePreprocessor.from_config(config)
    assert ours(IMAGES["rgb_wide"]).shape == (1, 3, 30, 54)
    with pytest.raises(RuntimeInputError, match="different sizes"):
        ours([IMAGES["rgb_wide"], IMAGES["rgb_tall"]])
