"""Real decoder inputs for calibration and accuracy gates, made by the artifact's own graphs.

A quantized decoder is only as good as the activations it was calibrated and judged on. LLaVA decoders
see two kinds of rows, image features from the projector and text embeddings, and text-only
calibration is a known way to wreck them (TensorRT-LLM #1860: INT4 AWQ on LLaVA calibrated on text).
So every sample here is an image plus a prompt run through the artifact itself:

    image --preprocess--> pixel_values --vision.onnx--> image_features
    prompt --tokenizer + chat template--> input_ids --embedding.onnx (AnchorInsert)--> decoder inputs

giving inputs_embeds / attention_mask / position_ids exactly as the runtime would feed decoder.onnx
(anchors included), with an empty KV cache.

Sample sets:
- `builtin_samples()`: a small default set that needs no network: images synthesised procedurally
  (gradients, discs, boxes, stripes, checkers, noise) from fixed seeds, and VQA-style prompts. It is
  enough to set activation ranges and to catch broken quantization; a set of real photos and the
  questions users ask (`--calib`) is better for int8 activation ranges.
- `gate_samples()`: the fixed set the accuracy gate uses: other seeds and other prompts than the
  calibration set, so a gate never grades the data it was calibrated on.
- `load_calibration_set(calib)`: `--calib DIR_OR_JSONL`: a folder of images (prompts cycled from the
  built-in list) or a JSONL file of {"image": path, "prompt": text} lines (paths relative to the file).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from attanchor_runtime.decoder_feeds import empty_past, left_pad
from attanchor_runtime.manifest import open_embed_table

from attanchor_export.errors import ExportError
from attanchor_export.load.image_jsonl import read_image_jsonl

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Questions of the kind LLaVA is asked; the calibration and gate lists do not overlap.
CALIBRATION_PROMPTS = (
    "What is in the image?",
    "Describe the image in detail.",
    "What color is the car?",
    "How many people are there?",
    "Is there a dog in the picture?",
    "What is on the table?",
    "Which object is on the left?",
    "Is it day or night?",
)
GATE_PROMPTS = (
    "Describe this picture briefly.",
    "What is shown in the photo?",
    "Where is the cat sitting?",
    "What animal is this?",
)
CALIBRATION_SEED, GATE_SEED = 0, 1000
DEFAULT_CALIBRATION_SIZE = 8
DEFAULT_GATE_SIZE = 4


@dataclass(frozen=True)
class Sample:
    """One image + prompt. `image` is anything the runtime's ImagePreprocessor takes (path, PIL, uint8 HWC)."""

    image: object
    prompt: str
    label: str = ""


def synthetic_image(seed: int, size: int = 256) -> np.ndarray:
    """A deterministic uint8 [size, size, 3] picture: a colour gradient with a few discs, boxes,
    stripes or a checker pattern and mild noise. Not a photo, but it has edges, flat regions and
    colour, which is what spreads a vision tower's activations."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
    img = (1 - t) * c0 + t * c1
    for _ in range(int(rng.integers(2, 6))):
        color = rng.uniform(0, 255, 3)
        kind = int(rng.integers(0, 4))
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
        if kind == 0:  # disc
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        elif kind == 1:  # box
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r * rng.uniform(0.3, 1.0))
        elif kind == 2:  # stripes inside a box
            period = rng.uniform(0.02, 0.1)
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r) & (((xx + yy) / period).astype(int) % 2 == 0)
        else:  # checker patch
            cell = rng.uniform(0.02, 0.08)
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r) & (
                ((xx / cell).astype(int) + (yy / cell).astype(int)) % 2 == 0
            )
        img[mask] = color
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def builtin_samples(n: int = DEFAULT_CALIBRATION_SIZE, seed: int = CALIBRATION_SEED,
                    prompts: Sequence[str] = CALIBRATION_PROMPTS) -> list[Sample]:
    return [
        Sample(synthetic_image(seed + i), prompts[i % len(prompts)], f"builtin-{seed + i}") for i in range(n)
    ]


def gate_samples(n: int = DEFAULT_GATE_SIZE) -> list[Sample]:
    """The accuracy gate's fixed set (never the calibration images or prompts)."""
    return builtin_samples(n, seed=GATE_SEED, prompts=GATE_PROMPTS)


def load_calibration_set(calib: str | Path | None, limit: int | None = None) -> list[Sample]:
    """`--calib`: None = the built-in set; "easy-vqa" or "tiny-scenes"; a folder of images; or a JSONL file of {"image", "prompt"}."""
    if calib is None:
        return builtin_samples()
    if calib in ("easy-vqa", "tiny-scenes"):  # real images and questions (train split; the gates and eval use test)
        from attanchor_export.checks.task_accuracy import load_task

        items = load_task(calib, split="train", limit=limit or 256, seed=1)
        return [Sample(it.image, it.question, f"{calib}:{it.image_id}") for it in items]
    path = Path(calib).expanduser()
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ExportError(f"--calib {path}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        samples = [
            Sample(str(p), CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)], p.name) for i, p in enumerate(images)
        ]
    elif path.is_file():
        samples = [Sample(str(image), str(rec["prompt"]), f"{path.name}:{lineno}")
                   for lineno, image, rec in read_image_jsonl(path, ("prompt",), what="--calib ")]
        if not samples:
            raise ExportError(f"--calib {path}: the file has no samples")
    else:
        raise ExportError(f"--calib {path}: no such folder or JSONL file")
    return samples[:limit] if limit else samples


class PromptEncoder:
    """Prompt text -> input_ids with the artifact's own tokenizer and chat template (the runtime's
    TextProcessor). Without tokenizer.json in the folder (graphs written before the tokenizer files),
    falls back to seeded random ids with one image placeholder, so gates still run."""

    def __init__(self, folder: Path, manifest_data: dict):
        self.dims = manifest_data["dims"]
        text = manifest_data.get("text") or {}
        self.processor = None
        if (folder / "tokenizer.json").is_file():
            from attanchor_runtime.text import TextProcessor

            eos = text.get("eos_token_ids") or self.dims.get("eos_token_ids")
            self.processor = TextProcessor.from_folder(
                folder,
                chat_template=text.get("chat_template"),
                image_token=text.get("image_token"),
                image_token_id=self.dims["image_token_id"],
                bos_token_id=self.dims.get("bos_token_id"),
                eos_token_id=eos,
                pad_token_id=self.dims.get("pad_token_id"),
            )

    @property
    def source(self) -> str:
        return "tokenizer" if self.processor is not None else "synthetic-ids"

    def __call__(self, prompt: str) -> np.ndarray:
        if self.processor is not None:
            return np.asarray(self.processor.prompt_ids(prompt), np.int64)
        # Stable per prompt (not Python's salted hash): BOS, a few ids, the image, the question.
        seed = int.from_bytes(prompt.encode()[:8].ljust(8, b"\0"), "little") ^ len(prompt)
        rng = np.random.default_rng(seed)
        special = {self.dims["image_token_id"], self.dims.get("pad_token_id"), self.dims.get("bos_token_id")}
        candidates = np.array([i for i in range(self.dims["vocab_size"]) if i not in special])
        words = rng.choice(candidates, size=4 + len(prompt.split()))
        bos = self.dims.get("bos_token_id")
        head = [bos] if bos is not None else []
        return np.array([*head, *words[:3], self.dims["image_token_id"], *words[3:]], np.int64)


class ArtifactFrontEnd:
    """vision.onnx + embedding.onnx + embed table of an artifact folder: samples -> decoder inputs."""

    def __init__(self, folder: Path, manifest_data: dict, vision_file: str | None = None, threads: int | None = None):
        from attanchor_runtime.preprocess import ImagePreprocessor
        from attanchor_runtime.sessions import ort_session

        self.folder = Path(folder)
        self.data = manifest_data
        self.dims = manifest_data["dims"]
        graphs = manifest_data["graphs"]
        self.preprocess = ImagePreprocessor.from_config(manifest_data["image_preprocessing"])
        self._vision_path, self._threads, self._vision = self.folder / (vision_file or graphs["vision"]["file"]), threads, None
        self.embedding = ort_session(self.folder / graphs["embedding"]["file"], threads=threads)
        self.encoder = PromptEncoder(self.folder, manifest_data)
        self.threshold = float(manifest_data["anchor"]["threshold"])
        self.table = open_embed_table(self.folder, manifest_data["embed_table"])

    @property
    def vision(self):
        """The vision session, opened on first use: a gate form that keeps the fp32 vision graph never
        needs it (1.2 GB of CLIP-L weights it would otherwise hold through the whole decoder run)."""
        if self._vision is None:
            from attanchor_runtime.sessions import ort_session

            self._vision = ort_session(self._vision_path, threads=self._threads)
        return self._vision

    @vision.setter
    def vision(self, session) -> None:  # anything with onnxruntime's run(names, feeds), e.g. the torch tower
        self._vision = session

    def release_vision(self) -> None:
        self._vision = None

    def pixels(self, samples: Sequence[Sample]) -> np.ndarray:
        return np.concatenate([self.preprocess(s.image) for s in samples], axis=0)

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        (features,) = self.vision.run(["image_features"], {"pixel_values": pixels})
        return features

    def decoder_inputs(self, samples: Sequence[Sample], features: np.ndarray | None = None) -> dict:
        """Batched, left-padded decoder inputs for `samples` (features: precomputed image features)."""
        if features is None:
            features = self.image_features(self.pixels(samples))
        pad = self.dims.get("pad_token_id")
        ids, mask = left_pad([self.encoder(s.prompt) for s in samples], 0 if pad is None else pad)
        embeds, attention, positions = self.embedding.run(
            ["inputs_embeds", "attention_mask", "position_ids"],
            {"input_ids": ids, "text_attention_mask": mask, "image_features": features.astype(np.float32),
             "threshold": np.array(self.threshold, np.float32)},
        )
        return {"inputs_embeds": embeds, "attention_mask": attention, "position_ids": positions}

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Decode-step embeddings straight from the table, as the runtime does."""
        return np.asarray(self.table[np.asarray(token_ids, np.int64)], np.float32)


class DecoderCalibrationReader:
    """onnxruntime.quantization CalibrationDataReader over decoder prefill inputs (batch 1 per sample,
    empty past), computed up front by the artifact's fp32 vision + embedding graphs."""

    def __init__(self, feeds: Iterable[dict]):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    @classmethod
    def from_samples(cls, front: ArtifactFrontEnd, samples: Sequence[Sample]) -> DecoderCalibrationReader:
        feeds = []
        for s in samples:
            inputs = front.decoder_inputs([s])
            feeds.append({**inputs, **empty_past(front.dims, 1)})
        return cls(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


class VisionCalibrationReader(DecoderCalibrationReader):
    """Same, for vision.onnx: one pixel_values batch of 1 per sample."""

    @classmethod
    def from_samples(cls, front: ArtifactFrontEnd, samples: Sequence[Sample]) -> VisionCalibrationReader:
        return cls({"pixel_values": front.preprocess(s.image)} for s in samples)


def _as_reader(reader):
    """Wrap one of ours as a real onnxruntime CalibrationDataReader subclass (imported lazily)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def rewind(self):
            reader.rewind()

    return _Reader()


__all__ = [
    "ArtifactFrontEnd", "DecoderCalibrationReader", "PromptEncoder", "Sample", "VisionCalibrationReader",
    "builtin_samples", "gate_samples", "load_calibration_set", "synthetic_image",
]
