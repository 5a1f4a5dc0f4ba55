"""The PyTorch model an artifact was exported from: its recorded source (or another folder), with the
LoRA adapter it was exported with merged again. What check, eval --compare-torch and bench compare with."""

from __future__ import annotations

from pathlib import Path

from attanchor_runtime.manifest import Manifest

from attanchor_export.errors import CheckpointError
from attanchor_export.load.checkpoint import load_checkpoint
from attanchor_export.load.lora import apply_adapter, locate_adapter
from attanchor_export.options import no_steps


def source_name(manifest: Manifest, model: str | None) -> str:
    if model:
        return model
    source = manifest.source
    for candidate in (source.resolved, source.model):
        if candidate and (Path(candidate).exists() or "/" in candidate):
            return candidate
    raise CheckpointError(f"{manifest.folder}: the manifest names no usable source checkpoint; pass --model")


def load_source(manifest: Manifest, model: str | None = None, adapter: str | None = None, steps=no_steps,
                streamed: bool = False, dtype=None):
    """The source checkpoint, loaded (`model` overrides where the manifest says it is), adapter merged.
    `streamed`: decoder weights read per layer as it runs (load/streamed.py; a 7B check fits in memory);
    not for timing (bench), and not with an adapter (the merge needs the weights). `dtype`: the torch
    dtype to load in (default fp32; bench --torch-dtype), never streamed."""
    import torch

    with steps("load source checkpoint"):
        streamed = streamed and not (manifest.source.adapter or adapter)
        loaded = load_checkpoint(source_name(manifest, model), streamed=streamed, dtype=dtype or torch.float32)
        loaded.family.configure(artifact=manifest.family)  # e.g. the image grid it was exported at
    _reapply_adapter(manifest, loaded, adapter, steps)
    return loaded


def _reapply_adapter(manifest: Manifest, loaded, override: str | None, steps) -> None:
    """The graphs hold LoRA-merged weights: merge the same adapter (same files, by sha256) into the source."""
    recorded = manifest.source.adapter
    if not recorded:
        if override:
            raise CheckpointError(f"{manifest.folder} was exported without an adapter; drop --adapter {override}")
        return
    source = override or (recorded.resolved if Path(recorded.resolved).is_dir() else recorded.source)
    with steps("merge LoRA adapter"):
        apply_adapter(loaded, locate_adapter(source, expect=recorded))


__all__ = ["load_source", "source_name"]
