"""What a model family provides at run time, and the registry that picks one from the manifest.

The Pipeline, the decode loop and the backends know no family. Everything that differs between
families, as an artifact's graphs expect it, is here:

- images: a preprocessor (path, bytes, PIL or uint8 array -> the vision graph's pixel input) and the
  check of what a caller passes instead (`vision_feeds`: shape, dtype, NaN/Inf, a value range the
  processor can make), and how many prefill positions an image takes (`image_positions`);
- prompts: the chat prompt for one question (`prompt_ids`) or a whole conversation (`chat_ids`), and
  caller rows -> one left-padded batch with one image slot per row and every token id inside the
  table (`prepare_batch`), then the embedding graph's feeds (`embedding_feeds`), or their outputs
  recomputed with at most K anchors per row when the prompt would not fit the context otherwise
  (`capped_embedding`);
- positions: the Step of a prefill (`first_step`), which says where each decode step's token goes.

A family is one file that subclasses RuntimeFamily and registers under the manifest's family.name;
its payload (what its exporter wrote for it alone) is a frozen dataclass of its own, `payload_type`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..batch import PreparedBatch
from ..decode import Step
from ..errors import ArtifactError, RuntimeInputError
from ..manifest import Manifest
from ..text import TextProcessor

_FAMILIES: dict[str, type[RuntimeFamily]] = {}


def register(name: str):
    """Class decorator: `cls` runs artifacts whose manifest says family.name == `name`."""

    def wrap(cls):
        cls.name = name
        _FAMILIES[name] = cls
        return cls

    return wrap


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def family_of(manifest: Manifest) -> RuntimeFamily:
    """The runtime adapter for this artifact's family; ArtifactError (one line) for an unknown one."""
    cls = _FAMILIES.get(manifest.family.name)
    if cls is None:
        raise ArtifactError(f"{manifest.folder}: model family {manifest.family.name!r} is not supported by this "
                            f"runtime (it knows {', '.join(family_names())}): upgrade attanchor-export")
    return cls(manifest)


class RuntimeFamily:
    name: ClassVar[str] = ""
    payload_type: ClassVar[type]  # the family's frozen dataclass for manifest.family.payload

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.payload = manifest.family.payload_as(self.payload_type)

    # -- images --------------------------------------------------------------------------------------
    def image_processor(self):
        """image(s) -> the vision graph's pixel input (what `Pipeline.images` is)."""
        raise NotImplementedError

    def vision_feeds(self, pixel_values, batch: int, **image_inputs) -> dict[str, np.ndarray]:
        """The vision graph's feeds for a batch of `batch` prompt rows, checked (RuntimeInputError).
        image_inputs: what the family's processor returns beside pixel_values (Qwen: image_grid_thw)."""
        raise NotImplementedError

    def image_positions(self, vision_feeds: dict[str, np.ndarray]) -> int:
        """Prefill positions one row's image takes (its features), for the context and memory checks made
        before the vision graph runs. Fixed per artifact unless the family's images vary in size."""
        return self.manifest.dims.image_tokens

    def view_processor(self):
        """An ImagePreprocessor giving the image as the vision tower sees it, [B, 3, H, W] (--show-anchors)."""
        return self.image_processor()

    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of image tokens over the image (--show-anchors); default: a square grid."""
        m = self.manifest.dims.image_tokens
        side = int(np.sqrt(m))
        if side * side != m:
            raise RuntimeInputError(f"cannot map {m} image tokens onto a square patch grid")
        return side, side

    def example_pixels(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        """Random pixel_values for `batch` rows, of the shape vision_feeds takes (parity and engine checks)."""
        raise NotImplementedError

    # -- prompts -------------------------------------------------------------------------------------
    def prompt_ids(self, text: TextProcessor, question: str) -> np.ndarray:
        """The chat prompt for one question about one image, as the caller's input_ids row."""
        raise NotImplementedError

    def chat_ids(self, text: TextProcessor, messages: list[dict]) -> np.ndarray:
        """A whole conversation (transformers-style messages, one image) as one input_ids row."""
        raise NotImplementedError

    def prepare_batch(self, input_ids, attention_mask=None) -> PreparedBatch:
        """The caller's rows (int64 [B, T] + mask, or a list of 1-D rows) as one left-padded batch; ids
        outside the embedding table are refused (RuntimeInputError)."""
        raise NotImplementedError

    def embedding_feeds(self, batch: PreparedBatch, image_features: np.ndarray, threshold: float,
                        vision_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The embedding graph's feeds."""
        raise NotImplementedError

    def capped_embedding(self, batch: PreparedBatch, image_features: np.ndarray, threshold: float, cap: int,
                         vision_feeds: dict[str, np.ndarray], embed_table: np.ndarray) -> dict[str, np.ndarray]:
        """The embedding graph's outputs (by its output names) with at most `cap` anchors per row, the
        highest scores, computed in numpy with AnchorInsert's specification from the same table rows and
        image features: the graph has no budget to pass when it was exported without K."""
        raise NotImplementedError

    # -- positions -----------------------------------------------------------------------------------
    def text_position_ids(self, attention_mask: np.ndarray) -> np.ndarray:
        """The decoder's position_ids for a prompt of text only (no image) with this left-padded mask: what
        engine checks feed a decoder directly, without the embedding graph."""
        raise NotImplementedError

    def first_step(self, attention_mask: np.ndarray, position_ids: np.ndarray) -> Step:
        """The prefill's Step (its mask and the embedding graph's position ids); advance() gives each
        decode step's."""
        raise NotImplementedError


__all__ = ["RuntimeFamily", "family_names", "family_of", "register"]
