"""manifest.json: what an artifact folder holds, read by the runtime and written by the exporter.

Kept in the runtime package because the runtime is the reader that must never guess: the exporter
imports FORMAT_VERSION and file_record from here, so both sides agree on one schema. Every reader
goes through :class:`Manifest`'s accessors (docs/CONTRACTS.md describes the sections):

    manifest.graph_file("decoder", "trt")   # the ONNX file a backend opens ("ort" | "trt")
    manifest.source.resolved                # what made this artifact (Source)
    manifest.precision.quant                # dtype, quant, per-backend files (Precision)
    manifest.anchor.threshold               # mode, threshold, max_anchors K (Anchor)
    manifest.text.image_token_id            # tokenizer and prompt settings (Text)

The sections are the dicts as written, with typed properties on top, so code that indexes them
(or writes them into a report) keeps working. FORMAT_VERSION changes only when the layout on disk
changes; version 1 readers ignore ``precision.decoder_files``, which older exporters wrote beside
``precision.backends`` (the same decoder files, repeated).
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


BACKENDS = ("ort", "trt")
_BACKEND_NAMES = {"ort": "onnxruntime", "trt": "TensorRT"}
_BACKEND_FORMS = {"ort": "MatMulNBits", "trt": "QDQ"}  # the quantized form each backend is given
FP32 = {"dtype": "fp32", "quant": "none"}


class NoGraphForm(ArtifactError):
    """The artifact holds no form of a graph for this backend (a quantized export wrote the other one only)."""


class Section(dict):
    """One manifest section exactly as written, with typed properties for the fields the schema defines."""


class Source(Section):
    """manifest "source": the checkpoint (and LoRA adapter) this artifact was exported from."""

    @property
    def model(self) -> str | None:  # what the export was asked for: a hub id, an alias or a folder
        return self.get("model")

    @property
    def resolved(self) -> str | None:  # the local folder that name resolved to
        return self.get("resolved")

    @property
    def alias(self) -> str | None:
        return self.get("alias")

    @property
    def revision(self) -> str | None:
        return self.get("revision")

    @property
    def commit(self) -> str | None:
        return self.get("commit")

    @property
    def adapter(self) -> dict | None:
        """The LoRA adapter record (attanchor_export.load.lora) merged into the graphs, or None."""
        return self.get("adapter") or None


# precision.graphs[FILE].ort_fusions.kv_cache: how a decoder file's KV cache moves between steps.
KV_CONCAT = "concat"  # present = Concat(past, new): the standard-op graphs (and TensorRT's)
# present = the new positions only, read the past in place: the caller appends present to its cache, and
# the past may be a buffer longer than the mask's past (the slots after it are ignored).
KV_APPEND = "append"


class Precision(Section):
    """manifest "precision": the graphs' dtype, the quantization, and which file each backend opens."""

    def kv_cache(self, file: str) -> str:
        """KV_APPEND when `file` returns only the new positions (precision.ort_fusions), else KV_CONCAT."""
        record = (self.get("graphs") or {}).get(file) or {}
        return (record.get("ort_fusions") or {}).get("kv_cache", KV_CONCAT)

    @property
    def dtype(self) -> str:
        return self.get("dtype", "fp32")

    @property
    def quant(self) -> str:
        return self.get("quant", "none")

    @property
    def quantized(self) -> bool:
        """True unless fp32 without quantization (the graphs parity checks against PyTorch)."""
        return self.dtype != "fp32" or self.quant != "none"

    @property
    def label(self) -> str:
        return f"{self.dtype}/{self.quant}"

    @property
    def vision_quantized(self) -> bool:
        return bool(self.get("vision_quantized"))

    @property
    def backends(self) -> dict[str, dict[str, str | None]]:
        """backend ("ort" | "trt") -> graph -> file; None: no form of that graph for that backend."""
        return self.get("backends") or {}

    @property
    def gate(self) -> dict | None:
        return self.get("gate")


class Anchor(Section):
    """manifest "anchor": the AnchorInsert settings the embedding graph was built with."""

    @property
    def mode(self) -> str:  # "t2i" | "i2t"
        return self["mode"]

    @property
    def threshold(self) -> float:  # the runtime's default; every call may pass its own
        return float(self["threshold"])

    @property
    def max_anchors(self) -> int | None:  # K: a static anchor budget, None without one
        return self.get("max_anchors") or None

    @property
    def calibration(self) -> dict | None:  # how `--threshold auto` chose the threshold
        return self.get("calibration")

    @property
    def op_version(self) -> int:  # AnchorInsert version: 2 = words only (excluded_token_ids applied)
        return int(self.get("op_version") or 1)

    @property
    def excluded_token_ids(self) -> tuple[int, ...]:  # ids that are never anchors (special tokens)
        return tuple(int(i) for i in self.get("excluded_token_ids") or ())


class Text(Section):
    """manifest "text": the tokenizer file and the prompt's special tokens."""

    @property
    def tokenizer_file(self) -> str:
        return self["tokenizer_file"]

    @property
    def chat_template(self) -> str | None:
        return self.get("chat_template")

    @property
    def image_token_id(self) -> int:
        return self["image_token_id"]

    @property
    def pad_token_id(self) -> int | None:
        return self.get("pad_token_id")

    @property
    def bos_token_id(self) -> int | None:
        return self.get("bos_token_id")

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.get("eos_token_ids", []))


@dataclass
class Manifest:
    folder: Path
    data: dict

    # -- the sections ----------------------------------------------------------------------------
    @property
    def dims(self) -> dict:
        return self.data["dims"]

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    @property
    def anchor(self) -> Anchor:
        return Anchor(self.data.get("anchor") or {})

    @property
    def text(self) -> Text:
        return Text(self.data["text"])

    @property
    def image_preprocessing(self) -> dict:
        """The image processor's settings (preprocess.ImagePreprocessor.from_config)."""
        return self.data["image_preprocessing"]

    @property
    def precision(self) -> Precision:
        return Precision(self.data.get("precision") or FP32)

    @property
    def source(self) -> Source:
        return Source(self.data.get("source") or {})

    @property
    def files(self) -> dict[str, dict]:
        """Artifact-relative name -> {"bytes", "sha256"} of every file beside the manifest (engines aside)."""
        return self.data.get("files", {})

    # -- files -----------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.folder / name

    def graph_path(self, graph: str) -> Path:
        return self.folder / self.graphs[graph]["file"]

    def graph_file(self, graph: str, backend: str = "ort") -> str:
        """The artifact-relative ONNX file `backend` ("ort" | "trt") opens for `graph`.

        Quantized artifacts name a file per backend under precision.backends (onnxruntime's MatMulNBits
        decoder.onnx, TensorRT's QDQ decoder.trt.onnx); a graph not listed there, and every graph of an
        fp32 artifact, is graphs[graph].file. NoGraphForm when the artifact wrote no form for `backend`."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        files = self.precision.backends.get(backend) or {}
        if graph not in files:
            return self.graphs[graph]["file"]
        if files[graph] is None:
            other = next(b for b in BACKENDS if b != backend)
            raise NoGraphForm(f"this artifact has no {_BACKEND_NAMES[backend]} form of its {graph} graph "
                              f"({self.precision.get('quant')} was written for {_BACKEND_NAMES[other]} only): "
                              f"re-export with the {_BACKEND_FORMS[backend]} form")
        return files[graph]

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
