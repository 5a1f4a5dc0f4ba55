"""manifest.json: what an artifact folder holds. The one schema, its one writer and its one reader.

Every section is a frozen dataclass declared here; `Manifest.load` parses the file into them and
`write_manifest` writes them back, so no other module spells a key of manifest.json (a test checks it).
docs/CONTRACTS.md describes each section. Reading one:

    manifest = Manifest.load(folder)
    manifest.graph_file("decoder", "trt")   # the ONNX file a backend opens ("ort" | "trt")
    manifest.dims.hidden_size               # the numbers every graph agrees on (Dims)
    manifest.graphs.decoder.past_names      # graph IO, declared once by the exporter's family (GraphSpec)
    manifest.text.image_token_id            # tokenizer and special tokens (Text)
    manifest.anchor.threshold               # AnchorInsert settings (Anchor)
    manifest.family.name                    # "llava": which attanchor_runtime.families adapter runs it

Adding an optional field to a section is one line: the field with its default. A field a family alone
needs goes in its payload (`Family.payload`), a dataclass of the family's own that it reads with
`manifest.family.payload_as(ItsPayload)`. The layout on disk changes with FORMAT_VERSION only; a runtime
refuses any other version in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError

FORMAT = "attanchor-artifact"
# 2: typed sections, a "family" section (architecture, model types, family payload with the image
# preprocessing), special token ids in "text" only. Version 1 artifacts are refused: re-export them.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"

# Symbolic dimension names of the graphs' IO; the runtime and the TensorRT profiles key on them.
BATCH, HEIGHT, WIDTH = "batch", "height", "width"
TEXT_LEN, SEQ_LEN, PAST_LEN, TOTAL_LEN = "text_len", "seq_len", "past_len", "total_len"
# Decoder KV cache IO: past_key_values.{i}.key/value in, present.{i}.key/value out (interleaved).
PAST_PREFIX, PRESENT_PREFIX = "past_key_values", "present"

BACKENDS = ("ort", "trt")
_BACKEND_NAMES = {"ort": "onnxruntime", "trt": "TensorRT"}
_BACKEND_FORMS = {"ort": "MatMulNBits", "trt": "QDQ"}  # the quantized form each backend is given

# precision.graphs[FILE].ort_fusions["kv_cache"]: how a decoder file's KV cache moves between steps.
KV_CONCAT = "concat"  # present = Concat(past, new): the standard-op graphs (and TensorRT's)
# present = the new positions only, read the past in place: the caller appends present to its cache, and
# the past may be a buffer longer than the mask's past (the slots after it are ignored).
KV_APPEND = "append"
# An optional decoder output (the onnxruntime form, precision.ort_fusions): int64 [B], the arg-max of each
# row's last-position logits (the first maximum), -1 where those logits hold NaN/Inf. The greedy choice made
# in the graph, so a greedy step need not fetch the logits (decode.greedy_in_graph).
NEXT_TOKEN = "next_token"
# An optional decoder input (GraphNotes.logits_to_keep names it): int64 [], logits for the last k positions
# only; 0, or not fed, gives every position's. A caller that reads only the last position feeds 1.
LOGITS_TO_KEEP = "logits_to_keep"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class NoGraphForm(ArtifactError):
    """The artifact holds no form of a graph for this backend (a quantized export wrote the other one only)."""


# ---- JSON <-> frozen dataclasses ------------------------------------------------------------------
# One generic reader and writer for every section: a section is declared once, as its dataclass.


def to_json(value) -> Any:
    """A section (or any value inside one) as plain JSON data: dataclasses as dicts in field order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
                and not f.metadata.get("local")}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def freeze(value) -> Any:
    """JSON data made read-only: dicts as mappingproxy, lists as tuples (for the opaque report fields)."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _bad(where: str, expected: str, value) -> ArtifactError:
    return ArtifactError(f"{MANIFEST}: {where} must be {expected}, got {value!r:.80}: re-export the artifact with "
                         "this attanchor-export")


def parse(kind, value, where: str):
    """JSON `value` as `kind`: a frozen dataclass, X | None, tuple[X, ...], Mapping[str, X], int, float,
    str, bool or Any (kept as frozen JSON). Unknown keys are ignored (a newer exporter's optional fields),
    a missing field without a default is an ArtifactError naming it."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return freeze(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # primitives first match by type: int | str, bool | str
            if option in (int, float, str, bool) and _is(option, value):
                return parse(option, value, where)
        if len(options) == 1:
            return parse(options[0], value, where)
        raise _bad(where, " or ".join(getattr(o, "__name__", str(o)) for o in options), value)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise _bad(where, "an object", value)
        hints, values = _hints(kind), {}
        for f in dataclasses.fields(kind):
            if not f.init or f.metadata.get("local"):
                continue
            if f.name in value:
                values[f.name] = parse(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ArtifactError(f"{MANIFEST}: {where}.{f.name} is missing: re-export the artifact with this "
                                    "attanchor-export")
        return kind(**values)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(where, "a list", value)
        item = args[0] if args else Any
        return tuple(parse(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise _bad(where, "an object", value)
        item = args[1] if len(args) == 2 else Any
        return types.MappingProxyType({k: parse(item, v, f"{where}.{k}") for k, v in value.items()})
    if kind in (int, float, str, bool):
        if not _is(kind, value):
            raise _bad(where, kind.__name__, value)
        return float(value) if kind is float else value
    raise TypeError(f"manifest schema: cannot read {kind!r} ({where})")


def _is(kind, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _empty() -> Mapping:
    return types.MappingProxyType({})


class Section:
    """Base of the sections: `to_json()` for reports that embed one, `from_json()` for its JSON."""

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, data, where: str | None = None):
        return parse(cls, data, where or cls.__name__)


# ---- the sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRecord(Section):
    """source.adapter: the LoRA adapter merged into the graphs (attanchor_export.load.lora)."""

    source: str  # as the user gave it: a folder or a Hub id
    resolved: str  # the local folder it was read from
    sha256: str  # sha256 of the `sha256sum` listing of `files`
    files: Mapping[str, str] = field(default_factory=_empty)  # file name -> sha256
    commit: str | None = None  # the Hub commit, for a Hub adapter
    applies_to: str | None = None  # "model" | "language_model"
    base_model: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: Any = None
    modules: int | None = None


@dataclass(frozen=True)
class Source(Section):
    """The checkpoint (and LoRA adapter) this artifact was exported from; `check DIR` reloads it."""

    model: str | None = None  # what the export was asked for: a hub id, an alias or a folder
    resolved: str | None = None  # the local folder (or Hub id) that name resolved to
    alias: str | None = None
    revision: str | None = None
    commit: str | None = None
    adapter: AdapterRecord | None = None


@dataclass(frozen=True)
class ModelTypes(Section):
    vision: str
    text: str


@dataclass(frozen=True)
class Family(Section):
    """Which model family the artifact is (attanchor_runtime.families picks the runtime adapter by `name`)
    and what that family alone needs to run it (`payload`: its own dataclass, read with payload_as)."""

    name: str  # "llava", "qwen2_5_vl"
    architecture: str  # config.architectures[0], e.g. "LlavaForConditionalGeneration"
    model_types: ModelTypes
    payload: Any = field(default_factory=_empty)

    def __post_init__(self):
        object.__setattr__(self, "payload", freeze(self.payload))

    def payload_as(self, kind):
        """The payload parsed as the family's own frozen dataclass `kind`."""
        return parse(kind, self.payload, "family.payload")


@dataclass(frozen=True)
class Dims(Section):
    """The numbers every graph, the runtime and the TensorRT profiles agree on."""

    hidden_size: int  # decoder width D (image features are projected to it)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_tokens: int  # M: image features per image after feature selection
    image_size: int  # square input side, pixels
    patch_size: int
    vision_hidden_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class Calibration(Section):
    """anchor.calibration: how `--threshold auto` chose the threshold (attanchor_export.trace.threshold)."""

    threshold: float  # the chosen value, equal to anchor.threshold
    target_rate: float  # the share of candidate tokens meant to become anchors
    rate: float  # the share at or above the threshold over the calibration set
    candidates: int
    prompts: int
    source: str  # builtin | easy-vqa | the --calib path


@dataclass(frozen=True)
class Anchor(Section):
    """The AnchorInsert settings the embedding graph was built with."""

    mode: str  # "t2i" | "i2t"
    threshold: float  # the runtime's default; every call may pass its own
    max_anchors: int | None = None  # K: a static anchor budget (None or 0: none)
    calibration: Calibration | None = None
    op: str = "ai.attanchor::AnchorInsert"
    op_version: int = 1  # 2: words only (excluded_token_ids are never anchors)
    excluded_token_ids: tuple[int, ...] = ()  # ids that are never anchors (special and whitespace-only tokens)

    def __post_init__(self):
        if not self.max_anchors:  # 0 means no budget, as None
            object.__setattr__(self, "max_anchors", None)


@dataclass(frozen=True)
class Text(Section):
    """The tokenizer file and the prompt's special tokens (the one place the artifact records them)."""

    image_token_id: int
    tokenizer_file: str = "tokenizer.json"
    chat_template: str | None = None
    image_token: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos: bool = True

    @property
    def pad_or_zero(self) -> int:
        """The id left padding is filled with (0 when the tokenizer has no pad token)."""
        return 0 if self.pad_token_id is None else self.pad_token_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Every special id the manifest names (image placeholder, pad, BOS, EOS)."""
        ids = {self.image_token_id, self.pad_token_id, self.bos_token_id, *self.eos_token_ids}
        return frozenset(i for i in ids if i is not None)


@dataclass(frozen=True)
class TensorSpec(Section):
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[str | int, ...]  # str = symbolic (dynamic) axis, int = fixed


@dataclass(frozen=True)
class GraphNotes(Section):
    data_dependent_shapes: bool = False  # an output length depends on the data (embedding without K)
    last_logits_only: bool = False  # the decoder returns logits for the last position only
    # The decoder's optional int64 scalar input: logits for the last k positions only (absent or 0: all);
    # None in artifacts written before it and in last-logits-only ones (trace/logits_to_keep.py).
    logits_to_keep: str | None = None


@dataclass(frozen=True)
class GraphSpec(Section):
    """One graph's file and IO, declared once by the exporter's family (attanchor_export.families)."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: GraphNotes = field(default_factory=GraphNotes)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def past_names(self) -> list[str]:
        """The decoder's KV cache inputs, in order."""
        return [t.name for t in self.inputs if t.name.startswith(PAST_PREFIX + ".")]

    @property
    def present_names(self) -> list[str]:
        return [t.name for t in self.outputs if t.name.startswith(PRESENT_PREFIX + ".")]


@dataclass(frozen=True)
class Graphs(Section):
    vision: GraphSpec
    embedding: GraphSpec
    decoder: GraphSpec

    def __getitem__(self, graph: str) -> GraphSpec:
        if graph not in GRAPHS:
            raise KeyError(graph)
        return getattr(self, graph)

    def items(self):
        return [(g, getattr(self, g)) for g in GRAPHS]


GRAPHS = ("vision", "embedding", "decoder")


@dataclass(frozen=True)
class EmbedTable(Section):
    """embed_tokens.bin: the raw little-endian [vocab, hidden] table (also embedding.onnx's external data)."""

    file: str
    dtype: str
    shape: tuple[int, int]

    def open(self, folder) -> np.memmap:
        """A read-only memmap [vocab, hidden]: decode steps embed new tokens with table[ids]."""
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.memmap(Path(folder) / self.file, dtype=dtype, mode="r", shape=tuple(self.shape))

    @property
    def row_bytes(self) -> int:
        return int(self.shape[1]) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class OutlierRatio(Section):
    """max / median of the per-channel max |x| of a linear's input, the largest over the smoothed inputs."""

    before: float
    after: float


@dataclass(frozen=True)
class Smoothing(Section):
    """precision.graphs[FILE].smoothing: SmoothQuant folded into the int8 QDQ (TensorRT) decoder before its
    activations were calibrated (attanchor_export.precision.smoothing). The graph computes the fp32
    function before its Q/DQ nodes, so no reader needs it to run the file; it says what was done."""

    alpha: float  # migration strength: 0 leaves the activations as they are, 1 moves all their spread
    smoothed_linears: int
    folded_into: Mapping[str, int] = field(default_factory=_empty)  # "norm" | "linear" -> linears folded there
    not_smoothed: tuple[str, ...] = ()  # linears (node names) whose input could not take a scale
    outlier_ratio_max: OutlierRatio | None = None
    method: str = "SmoothQuant"


@dataclass(frozen=True)
class FormRecord(Section):
    """precision.graphs[FILE]: one rewritten graph file (attanchor_export.precision.quantize)."""

    graph: str
    dtype: str
    format: str  # "fp16" | "MatMulNBits" | "QDQ"
    backend: tuple[str, ...] = ()
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    quantized_nodes: int | None = None
    linear_layers: int | None = None
    lm_head: str | None = None
    opset: Mapping[str, int] = field(default_factory=_empty)
    tensorrt_compatible: bool | None = None
    weights: str | None = None
    activations: str | None = None
    note: str | None = None
    fp16: Any = None  # the fp16 converter's record
    ort_fusions: Any = None  # precision.ort_fusions' record (kv_cache among its keys)
    smoothing: Smoothing | None = None  # int8 QDQ: the SmoothQuant rewrite (None: not smoothed)
    # int4 with linears kept at 8 bits (--int4-8bit): {"patterns", "linears", "as"} (None: all int4)
    kept_8bit: Any = None
    bytes: int | None = None
    # --prefill-int8: {"file": "decoder.prefill.onnx", ...}, the graph onnxruntime runs prompts through
    # (same IO and KV layout, int8 linears; attanchor_export.precision.prefill_int8). None: none written.
    prefill: Any = None

    @property
    def kv_cache(self) -> str:
        """KV_APPEND when the file returns only the new positions, else KV_CONCAT."""
        return (self.ort_fusions or {}).get("kv_cache", KV_CONCAT)


@dataclass(frozen=True)
class TaskResult(Section):
    """One precision form's task accuracy against fp32 on the same questions (the gate's task part)."""

    task: str
    questions: int
    accuracy: float
    fp32_accuracy: float
    max_drop: float
    same_answers: float
    failures: tuple[str, ...] = ()
    by_kind: Any = None
    fp32_by_kind: Any = None


@dataclass(frozen=True)
class GateResult(Section):
    """One distinct (decoder, vision) pair the backends open, judged against fp32 (precision.gate)."""

    backends: tuple[str, ...]
    decoder: str
    vision: str
    vision_changed: bool
    positions: int
    finite: bool
    cos_mean: float
    cos_min: float
    top1: float
    cos_mean_answer: float
    top1_answer: float
    greedy_match: float
    greedy_prefix: float
    greedy_tokens: int
    meets_target: bool
    passed: bool
    failures: tuple[str, ...] = ()
    max_abs_diff: float | None = None
    vision_cos_mean: float | None = None
    vision_cos_min: float | None = None
    task: TaskResult | None = None


@dataclass(frozen=True)
class Gate(Section):
    """precision.gate: the accuracy gate of a reduced-precision export (docs/QUANTIZATION.md)."""

    format: str  # "fp16" | "int8" | "int4"
    passed: bool | None = None  # None: not run
    skipped: bool | str = False  # True when asked not to gate; a str says why it could not run here
    floors: Mapping[str, float] = field(default_factory=_empty)
    target_cos: float | None = None
    set: Any = None  # what the gate set was: samples, images, prompts, tokens, positions, reference
    task: Any = None  # the task part: data, questions, fp32_accuracy, max_drop
    evaluated_on: str | None = None
    results: tuple[GateResult, ...] = ()


@dataclass(frozen=True)
class Precision(Section):
    """The graphs' dtype and quantization, and which file each backend opens."""

    dtype: str = "fp32"
    quant: str = "none"
    block_size: int | None = None
    lm_head_quantized: bool | None = None
    vision_quantized: bool = False
    forms: tuple[str, ...] = ()
    int4_8bit: tuple[str, ...] = ()  # int4: weight-name patterns of the decoder linears kept at 8 bits
    # The vision tower's own precision (--vision-quant), whatever `quant` the decoder has: "int8" = weights
    # and activations int8. None (older artifacts, or not asked): vision_quantized says whether it has `quant`.
    vision_quant: str | None = None
    graphs: Mapping[str, FormRecord] = field(default_factory=_empty)  # file -> its record
    backends: Mapping[str, Mapping[str, str | None]] = field(default_factory=_empty)  # backend -> graph -> file
    calibration: Any = None  # the int8 calibration set used (or that none was needed)
    gate: Gate | None = None

    @property
    def vision_int8(self) -> bool:
        return self.vision_quant == "int8"

    @property
    def quantized(self) -> bool:
        """True unless every graph is fp32 without quantization (the graphs parity checks against PyTorch)."""
        return self.dtype != "fp32" or self.quant != "none" or self.vision_int8

    @property
    def label(self) -> str:
        return f"{self.dtype}/{self.quant}" + (f" + {self.vision_quant} vision" if self.vision_int8 else "")

    @property
    def format(self) -> str:
        """The gate's name for this precision: the decoder's quantization, else its dtype; an fp32 decoder
        behind an int8 vision tower is judged as int8."""
        if self.quant != "none":
            return self.quant
        return "int8" if self.dtype == "fp32" and self.vision_int8 else self.dtype

    def kv_cache(self, file: str) -> str:
        """KV_APPEND when decoder `file` returns only the new positions (precision.ort_fusions), else KV_CONCAT."""
        record = self.graphs.get(file)
        return record.kv_cache if record is not None else KV_CONCAT

    def prefill_file(self, file: str) -> str | None:
        """The graph onnxruntime runs prompts through in place of decoder `file` (--prefill-int8), or None."""
        record = self.graphs.get(file)
        return (record.prefill or {}).get("file") if record is not None else None


@dataclass(frozen=True)
class Onnx(Section):
    opset: int
    ir_version: int

    @property
    def op_version(self) -> int:  # AnchorInsert version: 2 = words only (excluded_token_ids applied)
        return int(self.get("op_version") or 1)

    @property
    def excluded_token_ids(self) -> tuple[int, ...]:  # ids that are never anchors (special tokens)
        return tuple(int(i) for i in self.get("excluded_token_ids") or ())


@dataclass(frozen=True)
class Optimizations(Section):
    decoder: Any = None  # the grouped-attention pass's report (attanchor_graphs.attention_pass)


@dataclass(frozen=True)
class Validation(Section):
    """Parity against PyTorch at export (attanchor_export.checks.parity)."""

    atol: float
    passed: bool
    method: str | None = None
    present_layers: Any = None
    decoder: str | None = None  # "parity", or why the fp32 decoder's parity run was skipped
    checks: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ExportRecord(Section):
    """What the export cost (attanchor_export.export_cost): time, memory, bytes, and the memory plan."""

    seconds: float
    peak_rss_bytes: int
    artifact_bytes: int
    parameters: int | None = None
    fp32_weight_bytes: int | None = None
    checkpoint_weight_bytes: int | None = None
    loading: str | None = None  # "streamed", or why the checkpoint was loaded whole
    streamed_weight_bytes: int | None = None
    peak_rss_over_fp32_weights: float | None = None
    memory_budget_bytes: int | None = None
    fp32_decoder_session_bytes: int | None = None
    fp32_decoder_fits: bool | None = None
    fp16_decoder_cpu_session_bytes: int | None = None
    fp16_decoder_fed_session_bytes: int | None = None
    fp16_gate_fits: bool | None = None
    fp16_gate_weights_fed: bool | None = None
    disk_needed_bytes: int | None = None
    disk_free_bytes: int | None = None


@dataclass(frozen=True)
class FileRecord(Section):
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(path.stat().st_size, sha256_of(path))


@dataclass(frozen=True, kw_only=True)
class Manifest(Section):
    """An artifact's manifest.json as typed sections; `folder` is where the artifact lies (not written)."""

    folder: Path = field(default=Path("."), metadata={"local": True})
    source: Source
    family: Family
    dims: Dims
    anchor: Anchor
    text: Text
    graphs: Graphs
    embed_table: EmbedTable
    onnx: Onnx
    precision: Precision = field(default_factory=Precision)
    optimizations: Optimizations = field(default_factory=Optimizations)
    versions: Mapping[str, str] = field(default_factory=_empty)
    validation: Validation | None = None
    export: ExportRecord | None = None
    files: Mapping[str, FileRecord] = field(default_factory=_empty)  # every file beside it, engines aside

    # -- files -----------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return Path(self.folder) / name

    def graph_path(self, graph: str) -> Path:
        """The graph's own file (the fp32 form, or the only one), whatever the backend."""
        return self.path(self.graphs[graph].file)

    def graph_file(self, graph: str, backend: str = "ort") -> str:
        """The artifact-relative ONNX file `backend` ("ort" | "trt") opens for `graph`.

        Quantized artifacts name a file per backend under precision.backends (onnxruntime's MatMulNBits
        decoder.onnx, TensorRT's QDQ decoder.trt.onnx); a graph not listed there, and every graph of an
        fp32 artifact, is graphs[graph].file. NoGraphForm when the artifact wrote no form for `backend`."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        files = self.precision.backends.get(backend) or {}
        if graph not in files:
            return self.graphs[graph].file
        if files[graph] is None:
            other = next(b for b in BACKENDS if b != backend)
            raise NoGraphForm(f"this artifact has no {_BACKEND_NAMES[backend]} form of its {graph} graph "
                              f"({self.precision.quant} was written for {_BACKEND_NAMES[other]} only): "
                              f"re-export with the {_BACKEND_FORMS[backend]} form")
        return files[graph]

    def embed_table_memmap(self) -> np.memmap:
        return self.embed_table.open(self.folder)

    def with_files(self, folder: Path, files: Mapping[str, str], precision_graphs=None) -> Manifest:
        """This manifest opening `files` ({graph: file}) on onnxruntime, e.g. one precision form of a staging
        folder (`precision_graphs`: their records, for how each decoder file carries its KV cache)."""
        backends = {**self.precision.backends, "ort": dict(files)}
        graphs = self.precision.graphs if precision_graphs is None else precision_graphs
        precision = dataclasses.replace(self.precision, backends=freeze(backends), graphs=freeze(dict(graphs)))
        return dataclasses.replace(self, folder=Path(folder), precision=precision)

    # -- reading -----------------------------------------------------------------------------------
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
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ArtifactError(f"{path} is not an attanchor-export manifest (format={found!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {version}, this runtime reads {FORMAT_VERSION}: "
                "re-export the model with a matching attanchor-export"
            )
        manifest = cls.from_dict(folder, data)
        if verify != "none":
            manifest.verify_files(sha256=verify == "sha256")
        return manifest

    @classmethod
    def from_dict(cls, folder, data: Mapping) -> Manifest:
        """The sections of manifest.json's data (tests and drafts build manifests in memory with it)."""
        return dataclasses.replace(parse(cls, data, "manifest"), folder=Path(folder))

    def verify_files(self, sha256: bool = False) -> None:
        for name, record in self.files.items():
            path = self.path(name)
            if not path.is_file():
                raise ArtifactError(f"{self.folder}: {name} listed in the manifest is missing")
            size = path.stat().st_size
            if size != record.bytes:
                raise ArtifactError(
                    f"{self.folder}: {name} is {size} bytes, the manifest says {record.bytes} (truncated copy?)"
                )
            if sha256 and sha256_of(path) != record.sha256:
                raise ArtifactError(f"{self.folder}: {name} does not match its sha256 in the manifest")


def listed_files(folder) -> frozenset[str] | None:
    """The files manifest.json in `folder` lists, when this tool wrote it (any format_version: an older
    artifact may still be replaced by a new export); None when it is missing or unreadable; ArtifactError
    when it is another tool's."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{Path(folder) / MANIFEST} was not written by this tool")
    files = data.get("files")
    return frozenset(files if isinstance(files, Mapping) else ())


def write_manifest(manifest: Manifest) -> Manifest:
    """The one writer: records every file beside the manifest (size + sha256), writes manifest.json into
    `manifest.folder` and returns the manifest as written."""
    folder = Path(manifest.folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith("engines/"):
            continue  # engines are built per device and described by their own engine.json
        files[rel] = FileRecord.of(path)
    manifest = dataclasses.replace(manifest, files=types.MappingProxyType(files))
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **to_json(manifest)}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return manifest


__all__ = [
    "Anchor", "AdapterRecord", "BACKENDS", "Calibration", "Dims", "EmbedTable", "ExportRecord", "FORMAT",
    "FORMAT_VERSION", "Family", "FileRecord", "FormRecord", "GRAPHS", "Gate", "GateResult", "GraphNotes",
    "GraphSpec", "Graphs", "KV_APPEND", "KV_CONCAT", "LOGITS_TO_KEEP", "MANIFEST", "Manifest", "ModelTypes", "NEXT_TOKEN",
    "NoGraphForm", "Onnx", "Optimizations", "OutlierRatio", "Precision", "Smoothing", "Source", "TaskResult",
    "TensorSpec", "Text", "Validation", "freeze", "listed_files", "parse", "sha256_of", "to_json", "write_manifest",
]
