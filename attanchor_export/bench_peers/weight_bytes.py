"""Weight bytes a decode step reads: every weight but the token-embedding table (a gather reads one row per
token). Read from file headers and graph metadata; nothing is loaded."""

from __future__ import annotations

import json
from pathlib import Path


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the initializers a decode step reads: all but the data of a Gather (the token-embedding
    table, of which one row is read per token). Nothing is loaded."""
    from attanchor_export.bench.probes import decoder_weight_bytes

    return decoder_weight_bytes(path, skip_gathered=True)


def safetensors_weight_bytes(folder: Path, skip: str = "embed_tokens") -> int:
    """Bytes of every tensor in the folder's *.safetensors except the embedding table (header only)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__" and skip not in name:
                start, end = entry["data_offsets"]
                total += end - start
    return total
