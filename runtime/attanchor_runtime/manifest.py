"""manifest.json: what an artifact folder holds, read by the runtime and written by the exporter.

Kept in the runtime package because the runtime is the reader that must never guess: the exporter
imports FORMAT_VERSION and file_record from here, so both sides agree on one schema.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArtifactError

FORMAT = "attanchor-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """past_key_values.{i}.key/value (decoder inputs) or present.{i}.key/value (outputs), interleaved."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def open_embed_table(folder, entry: dict):
    """The manifest's embed_table entry as a read-only little-endian memmap [vocab, hidden]."""
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    return np.memmap(Path(folder) / entry["file"], dtype=dtype, mode="r", shape=tuple(entry["shape"]))


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


@dataclass
class Manifest:
    folder: Path
    data: dict

    # Short accessors for the fields every consumer needs; everything else stays in `data`.
    @property
    def dims(self) -> dict:
        return self.data["dims"]

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    @property
    def anchor(self) -> dict:
        return self.data["anchor"]

    @property
    def text(self) -> dict:
        return self.data["text"]

    @property
    def precision(self) -> dict:
        return self.data.get("precision", {"dtype": "fp32", "quant": "none"})

    def path(self, name: str) -> Path:
        return self.folder / name

    def graph_path(self, graph: str) -> Path:
        return self.folder / self.graphs[graph]["file"]

    def embed_table(self):
        return open_embed_table(self.folder, self.data["embed_table"])

    @classmethod
    def load(cls, folder, verify: str = "size") -> Manifest:
        """verify: "none", "size" (cheap, default) or "sha256" (reads every byte)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"artifact folder {folder} does not exist")
        path = folder / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{folder} has no {MANIFEST}: not an attanchor-export artifact")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read {path}: {e}") from None
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not an attanchor-export manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {version}, this runtime reads {FORMAT_VERSION}: "
                "re-export with a matching attanchor-export"
            )
        manifest = cls(folder, data)
        if verify != "none":
            manifest.verify_files(sha256=verify == "sha256")
        return manifest

    def verify_files(self, sha256: bool = False) -> None:
        for name, record in self.data.get("files", {}).items():
            path = self.folder / name
            if not path.is_file():
                raise ArtifactError(f"{self.folder}: {name} listed in the manifest is missing")
            size = path.stat().st_size
            if size != record["bytes"]:
                raise ArtifactError(
                    f"{self.folder}: {name} is {size} bytes, the manifest says {record['bytes']} (truncated copy?)"
                )
            if sha256 and sha256_of(path) != record["sha256"]:
                raise ArtifactError(f"{self.folder}: {name} does not match its sha256 in the manifest")


def write_manifest(folder: Path, data: dict) -> None:
    """Records every file beside the manifest (size + sha256), then writes manifest.json."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith("engines/"):
            continue  # engines are built per device and described by their own engine.json
        files[rel] = file_record(path)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data, "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
