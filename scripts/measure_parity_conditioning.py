"""How far fp32 can agree at all: an artifact's decoder (onnxruntime fp32) and the source in PyTorch fp32,
both against the source in float64, on one ragged batch of 3 with the image placeholder at index 0, 1 or 3.

    python scripts/measure_parity_conditioning.py ARTIFACT_DIR

Prints per row the max |diff| of the prefill logits / present K and V (every layer, real positions) for
each pair. Why the export check puts text before the image (docs/CONTRACTS.md, validation.checks): where
PyTorch fp32 is itself far from float64, no fp32 graph can be held to a 1e-4-scale bound.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from attanchor_runtime.decode import decoder_calls
from attanchor_runtime.families import family_of
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.ort_backend import OrtBackend

from attanchor_export.checks.parity import token_pool
from attanchor_export.load.source import load_source
from attanchor_export.source_model import TorchBackend, anchored_inputs, decoder_module

LENGTHS = [7, 13, 10]


def prompts(manifest, pool, offsets, image_at):
    width = max(LENGTHS)
    ids = np.full((len(LENGTHS), width), manifest.text.pad_or_zero, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        tokens = np.take(pool, np.arange(n) + offsets[row], mode="wrap")
        tokens[image_at] = manifest.text.image_token_id
        ids[row, width - n:], mask[row, width - n:] = tokens, 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    args = parser.parse_args()
    manifest = Manifest.load(args.artifact, verify="none")
    loaded = load_source(manifest)
    family, anchor, layers = family_of(manifest), manifest.anchor, manifest.dims.num_layers
    ort, fp32 = OrtBackend(manifest), TorchBackend(loaded, manifest)
    fp64 = copy.deepcopy(decoder_module(loaded)).double()  # a copy: the fp32 model stays fp32
    pool, rng = token_pool(manifest), np.random.default_rng(7)
    pixels = family.example_pixels(len(LENGTHS), rng)
    offsets = rng.integers(0, len(pool), size=len(LENGTHS))
    for image_at in (0, 1, 3):
        ids, mask = prompts(manifest, pool, offsets, image_at)
        embeds, amask, pos, _ = (np.asarray(t) for t in anchored_inputs(
            loaded, ids, mask, pixels, 2.0, mode=anchor.mode, max_anchors=anchor.max_anchors,
            excluded_token_ids=anchor.excluded_token_ids))
        embeds = embeds.astype(np.float32)
        step = family.first_step(amask, pos)
        outputs = {}
        for name, backend in (("ort", ort), ("pt32", fp32)):
            call = next(iter(decoder_calls(backend, step, embeds, lambda c: None)))
            outputs[name] = [call.logits, *call.cache]
        past = tuple(torch.zeros((len(LENGTHS), manifest.dims.num_kv_heads, 0, manifest.dims.head_dim),
                                 dtype=torch.float64) for _ in range(2 * layers))
        with torch.no_grad():
            outputs["f64"] = [t.numpy() for t in fp64(torch.from_numpy(embeds).double(),
                                                      torch.from_numpy(step.attention_mask),
                                                      torch.from_numpy(step.position_ids), past)]
        for row, real in enumerate(step.attention_mask.astype(bool)):
            pairs = (("ort", "pt32"), ("pt32", "f64"), ("ort", "f64"))
            print(f"image at index {image_at}, row {row} (logits / KV):  " + "  ".join(
                f"{a}-{b} {worst(outputs[a], outputs[b], row, real)}" for a, b in pairs), flush=True)


def worst(a: list, b: list, row: int, real: np.ndarray) -> str:
    """Max |a - b| of the logits and of every present tensor, over one row's real positions."""
    logits = np.abs(a[0][row] - b[0][row])[real].max()
    kv = max(np.abs(x[row] - y[row])[:, real].max() for x, y in zip(a[1:], b[1:], strict=True))
    return f"{logits:.1e} / {kv:.1e}"


if __name__ == "__main__":
    main()
