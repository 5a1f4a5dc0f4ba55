"""The TensorRT engine build plan as plain, JSON-serialisable data. No tensorrt import.

    plan = make_plan(manifest_or_folder, BuildOptions(max_batch=1, max_input_len=768, max_seq_len=2048))
    plan.to_json()          # what trt/build.py executes and engine.json records
    print(plan.format_table())

Per graph (``plan.engines[name]`` is an :class:`EngineSpec`):

* vision: one profile, batch 1..max_batch, height/width fixed from the manifest.
* decoder: two optimization profiles.
  - ``prefill``: seq_len 1..max_input_len with an empty past, past_len 0..0 (TensorRT 10 accepts
    zero-volume tensors and zero-sized profile dimensions; the past buffers are still bound to a
    valid device address). ``empty_past="masked-slot"`` is the fallback for a TensorRT that
    rejects it: the past holds one zero slot whose attention-mask column is 0, so prefill is
    past_len 1..1 and every later length is one larger (the runtime adds the slot and the column).
  - ``decode``: seq_len 1, past_len 1..max_seq_len-1.
  Every input's min/opt/max comes from one table of named dimensions (batch, seq_len, past_len,
  total_len = past_len + seq_len) applied to the manifest's symbolic shapes, so all KV inputs and
  the attention mask agree by construction (TensorRT #1808 / #4199 are profiles where they did not);
  :func:`profile_problems` re-checks it.
* embedding: an engine only for a static-K artifact (manifest ``anchor.max_anchors``): output
  length T - 1 + M + K is a function of input shapes. Without K the output length depends on the
  data, so it runs on onnxruntime (CPU) and the spec says why.

Precision: every engine is a strongly typed network, on TensorRT 10.x as on 11.x (which has no
other kind and no precision builder flags): each tensor's type is the one the ONNX graph gives it, so
the artifact's graphs carry the precision and the plan only records it (``EngineSpec.precision``):

* fp32: every tensor fp32. TF32 is cleared (TensorRT enables it by default; fp32 parity and the
  anchor cosine scores need IEEE fp32 MatMuls) unless ``allow_tf32``.
* fp16 (precision.fp16): fp16 weights and activations, fp32 islands (norms, softmax, the RoPE
  angle path, the logits) joined by Cast nodes, fp32 graph inputs and outputs. Strongly typed, each
  node runs in the type the graph says, which the 10.x FP16 flag could only approximate (it needed
  OBEY_PRECISION_CONSTRAINTS and every fp32 layer pinned; 11.x has neither).
* int8 / int4 QDQ (``decoder.trt.onnx``): QuantizeLinear/DequantizeLinear with symmetric scales (zero
  point 0) mark where int8/int4 starts and ends, on top of an fp32 or fp16 graph: explicit
  quantization, no calibrator and no INT8/INT4 flag.
* the embedding graph is always fp32: its cosine scores decide discrete anchor indices.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attanchor_runtime.manifest import Manifest, NoGraphForm, Precision, TensorSpec

from attanchor_export.errors import ExportError

__all__ = [
    "BuildOptions", "BuildPlan", "EngineSpec", "Gate", "PlanError", "Profile", "make_plan", "profile_problems",
    "trt_file",
]

EMPTY_PAST_MODES = ("zero", "masked-slot")
# 2: strongly typed only (EngineSpec.precision replaced the builder flags); 3: the artifact's precision as
# its label ("fp16/int4"), not a copy of the manifest section
PLAN_VERSION = 3


class PlanError(ExportError):
    """Build options that cannot make a valid engine (one line, names the option and the limit)."""


@dataclass
class BuildOptions:
    max_batch: int = 1
    max_input_len: int | None = None  # prefill positions incl. image tokens and anchors; default below
    max_seq_len: int | None = None  # prompt + generated positions; default min(model max, 2048)
    opt_batch: int | None = None  # default 1 (TensorRT tunes kernels for the opt shape)
    opt_input_len: int | None = None  # default min(max_input_len, image tokens + 64): one image, a question
    opt_past_len: int | None = None  # default min(max_seq_len - 1, opt_input_len + 32)
    workspace_mib: int = 1024
    timing_cache: str | None = None  # None: <engine dir>/timing.cache; reused across builds on one device
    builder_optimization_level: int = 3
    allow_tf32: bool = False
    empty_past: str = "zero"
    embedding_engine: bool = True  # build the static-K embedding engine when the artifact allows it
    gate_cosine: float = 0.99  # non-fp32 engines: logits cosine vs onnxruntime
    gate_fp32_atol: float = 1e-3  # fp32 engines: max |logits - onnxruntime|


@dataclass
class Profile:
    name: str
    dims: dict[str, list[int]]  # named dimension -> [min, opt, max]
    shapes: dict[str, dict[str, list[int]]]  # input -> {"min": [...], "opt": [...], "max": [...]}


@dataclass
class Gate:
    output: str
    metric: str  # "max_abs_diff" | "cosine" | "exact"
    limit: float


@dataclass
class EngineSpec:
    graph: str
    backend: str  # "tensorrt" | "onnxruntime"
    onnx: str  # artifact-relative ONNX file
    engine: str | None = None  # plan file name inside the engine folder
    profiles: list[Profile] = field(default_factory=list)
    precision: str = "fp32"  # what the graph's tensor types say: "fp32", "fp16", "fp16 + int4 QDQ", ...
    gates: list[Gate] = field(default_factory=list)
    reason: str | None = None  # why onnxruntime, when it is
    notes: list[str] = field(default_factory=list)

    def profile(self, name: str) -> Profile:
        return next(p for p in self.profiles if p.name == name)


@dataclass
class BuildPlan:
    artifact: str
    precision: str  # the artifact's, as its label: "fp32/none", "fp16/int4"
    options: BuildOptions
    engines: dict[str, EngineSpec]
    version: int = PLAN_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, data: dict) -> BuildPlan:
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"build plan version {data.get('version')} is not {PLAN_VERSION}: make the plan again")
        engines = {}
        for name, e in data["engines"].items():
            e = dict(e)
            e["profiles"] = [Profile(**p) for p in e.get("profiles", [])]
            e["gates"] = [Gate(**g) for g in e.get("gates", [])]
            engines[name] = EngineSpec(**e)
        return cls(data["artifact"], data["precision"], BuildOptions(**data["options"]), engines, data["version"])

    def format_table(self) -> str:
        lines = [f"build plan for {self.artifact} ({self.precision}, workspace {self.options.workspace_mib} MiB)"]
        for spec in self.engines.values():
            if spec.backend != "tensorrt":
                lines.append(f"  {spec.graph:<10} onnxruntime: {spec.reason}")
                continue
            mode = f"{spec.precision}, strongly typed" + ("" if self.options.allow_tf32 else ", TF32 off")
            lines.append(f"  {spec.graph:<10} {spec.engine} ({mode})")
            for p in spec.profiles:
                dims = ", ".join(f"{k} {v[0]}..{v[2]} (opt {v[1]})" for k, v in p.dims.items())
                lines.append(f"    profile {p.name}: {dims}")
        return "\n".join(lines)


# ---- plan construction ------------------------------------------------------------------------
def trt_file(manifest: Manifest, graph: str) -> str:
    """The ONNX file TensorRT builds for `graph` (Manifest.graph_file(graph, "trt")), PlanError without one."""
    try:
        return manifest.graph_file(graph, "trt")
    except NoGraphForm as e:
        raise PlanError(str(e)) from None


def _graph_qdq_bits(path: Path) -> int | None:
    """The narrowest integer the graph's Q/DQ nodes hold (4 or 8), 0 for a graph without Q/DQ, None when
    the file is not there (a plan made from a manifest alone)."""
    if not path.is_file():
        return None
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    weight_types = {i.name: i.data_type for i in model.graph.initializer}
    bits = set()
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        if node.op_type == "QuantizeLinear":
            bits.add(8)  # activations: quantize.py writes int8 ones only
        elif node.op_type == "DequantizeLinear":
            int4 = weight_types.get(node.input[0]) in (TensorProto.INT4, TensorProto.UINT4)
            bits.add(4 if int4 else 8)
    return min(bits) if bits else 0


def _graph_precision(graph: str, precision: Precision, qdq_bits: int | None) -> str:
    """What one graph's tensor types are: "fp32", "fp16", "fp32 + int8 QDQ", "fp16 + int4 QDQ"."""
    dtype, quant = precision.dtype, precision.quant
    if dtype not in ("fp32", "fp16") or quant not in ("none", "int8", "int4"):
        raise PlanError(f"unknown artifact precision dtype={dtype!r} quant={quant!r}: expected fp32|fp16 and "
                        "none|int8|int4")
    if graph == "embedding":  # never converted: its cosine scores pick discrete anchor indices
        return "fp32"
    if qdq_bits is None:  # no file to look at: what the manifest says was quantized
        if graph == "vision" and precision.vision_int8:  # --vision-quant: its own precision
            qdq_bits = 8
        else:
            quantized = quant != "none" and (graph == "decoder" or precision.vision_quantized)
            qdq_bits = {"int4": 4, "int8": 8}[quant] if quantized else 0
    return f"{dtype} + int{qdq_bits} QDQ" if qdq_bits else dtype


def _axis_range(axis: str | int, dims: dict[str, list[int]]) -> list[int] | None:
    """[min, opt, max] of one manifest axis: a fixed size, a named dimension, or a product of those
    ("batch * 64": Qwen2.5-VL's vision input holds every image's patch rows); None when a name is unknown."""
    if isinstance(axis, int):
        return [axis] * 3
    if axis in dims:
        return list(dims[axis])
    values = [1, 1, 1]
    for factor in str(axis).split("*"):
        factor = factor.strip()
        if factor.isdigit():
            factor_range = [int(factor)] * 3
        elif factor in dims:
            factor_range = dims[factor]
        else:
            return None
        values = [v * f for v, f in zip(values, factor_range)]
    return values


def _shapes(inputs: tuple[TensorSpec, ...], dims: dict[str, list[int]], graph: str) -> dict[str, dict[str, list[int]]]:
    shapes = {}
    for spec in inputs:
        ranges = {"min": [], "opt": [], "max": []}
        for axis in spec.shape:
            values = _axis_range(axis, dims)
            if values is None:
                raise PlanError(f"{graph} input {spec.name} has a dimension {axis!r} the build plan does not know")
            for key, value in zip(("min", "opt", "max"), values):
                ranges[key].append(int(value))
        shapes[spec.name] = ranges
    return shapes


def _check_range(name: str, value: int, lo: int, hi: int, hint: str = "") -> int:
    if not lo <= value <= hi:
        raise PlanError(f"{name} must be within {lo}..{hi}, got {value}{hint}")
    return value


def make_plan(manifest: Manifest | str | Path, options: BuildOptions | None = None,
              inspect_onnx: bool = True) -> BuildPlan:
    """The engine specs for an artifact (its Manifest or folder); raises PlanError (one line) for options
    that cannot work."""
    options = options or BuildOptions()
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest, verify="none")
    folder, dims, graphs, precision = Path(manifest.folder), manifest.dims, manifest.graphs, manifest.precision
    image_tokens = dims.image_tokens
    max_positions = dims.max_position_embeddings

    # -- options -----------------------------------------------------------------------------
    if options.max_batch < 1:
        raise PlanError(f"max_batch must be >= 1, got {options.max_batch}")
    max_seq = options.max_seq_len if options.max_seq_len is not None else min(max_positions, 2048)
    if max_seq > max_positions:
        raise PlanError(f"max_seq_len {max_seq} exceeds the model's max_position_embeddings ({max_positions})")
    if max_seq < 2:
        raise PlanError(f"max_seq_len must be >= 2 (a prompt position and a generated token), got {max_seq}")
    max_in = options.max_input_len if options.max_input_len is not None else min(max_seq, image_tokens + 512)
    if max_in > max_seq:
        raise PlanError(f"max_input_len {max_in} exceeds max_seq_len {max_seq}")
    if max_in < image_tokens + 1:
        raise PlanError(f"max_input_len {max_in} cannot hold the {image_tokens} image tokens and a text token: "
                        f"use a max_input_len >= {image_tokens + 1}")
    opt_batch = _check_range("opt_batch", options.opt_batch or 1, 1, options.max_batch)
    opt_in = _check_range("opt_input_len", options.opt_input_len or min(max_in, image_tokens + 64), 1, max_in)
    opt_past = _check_range("opt_past_len", options.opt_past_len or min(max_seq - 1, opt_in + 32), 1, max_seq - 1)
    if options.workspace_mib < 1:
        raise PlanError(f"workspace must be >= 1 MiB, got {options.workspace_mib}")
    _check_range("builder_optimization_level", options.builder_optimization_level, 0, 5)
    if options.empty_past not in EMPTY_PAST_MODES:
        raise PlanError(f"empty_past must be one of {', '.join(EMPTY_PAST_MODES)}, got {options.empty_past!r}")
    batch = [1, opt_batch, options.max_batch]

    def gates(output: str, graph_precision: str) -> list[Gate]:
        """fp32 graphs (no QDQ) get the fp32 tolerance, fp16 and quantized ones the cosine floor."""
        if graph_precision == "fp32":
            return [Gate(output, "max_abs_diff", options.gate_fp32_atol)]
        return [Gate(output, "cosine", options.gate_cosine)]

    def graph_precision(graph: str, file: str) -> str:
        return _graph_precision(graph, precision, _graph_qdq_bits(folder / file) if inspect_onnx else None)

    engines: dict[str, EngineSpec] = {}

    # -- vision --------------------------------------------------------------------------------
    vision = graphs.vision
    vision_file = trt_file(manifest, "vision")
    vision_precision = graph_precision("vision", vision_file)
    engines["vision"] = EngineSpec(
        "vision", "tensorrt", vision_file, "vision.plan",
        [Profile("all", {"batch": batch}, _shapes(vision.inputs, {"batch": batch}, "vision"))],
        vision_precision, gates(vision.output_names[0], vision_precision),
    )

    # -- embedding -----------------------------------------------------------------------------
    emb = graphs.embedding
    emb_embeds, emb_mask, _, emb_gather = emb.output_names
    k = manifest.anchor.max_anchors
    if emb.notes.data_dependent_shapes or not k:
        engines["embedding"] = EngineSpec(
            "embedding", "onnxruntime", emb.file,
            reason="output length depends on how many anchors each prompt gets (no max_anchors budget in the "
                   "artifact); it runs on onnxruntime CPU. Export with --max-anchors K for a TensorRT engine",
        )
    elif not options.embedding_engine:
        engines["embedding"] = EngineSpec("embedding", "onnxruntime", emb.file,
                                          reason="embedding engine disabled by the build options")
    else:
        max_text = max_in - image_tokens - int(k) + 1  # L = T - 1 + M + K <= max_input_len
        if max_text < 1:
            raise PlanError(f"max_input_len {max_in} leaves no room for text with {image_tokens} image tokens and "
                            f"{k} anchors: use a max_input_len >= {image_tokens + int(k)}")
        opt_text = max(1, min(max_text, opt_in - image_tokens - int(k) + 1))
        emb_dims = {"batch": batch, "text_len": [1, opt_text, max_text]}
        engines["embedding"] = EngineSpec(
            "embedding", "tensorrt", emb.file, "embedding.plan",
            [Profile("all", emb_dims, _shapes(emb.inputs, emb_dims, "embedding"))],
            graph_precision("embedding", emb.file),
            [Gate(emb_gather, "exact", 0.0), Gate(emb_mask, "exact", 0.0), Gate(emb_embeds, "max_abs_diff", 1e-6)],
            notes=[f"text_len <= {max_text} so that T - 1 + {image_tokens} + {k} <= max_input_len {max_in}",
                   "the engine embeds the token table as weights (a second copy beside embed_tokens.bin)"],
        )

    # -- decoder -------------------------------------------------------------------------------
    dec = graphs.decoder
    dec_file = trt_file(manifest, "decoder")
    slot = 1 if options.empty_past == "masked-slot" else 0
    prefill = {"batch": batch, "seq_len": [1, opt_in, max_in], "past_len": [slot, slot, slot]}
    decode = {"batch": batch, "seq_len": [1, 1, 1], "past_len": [1 + slot, opt_past + slot, max_seq - 1 + slot]}
    profiles = []
    for name, d in (("prefill", prefill), ("decode", decode)):
        d["total_len"] = [p + s for p, s in zip(d["past_len"], d["seq_len"])]
        profiles.append(Profile(name, d, _shapes(dec.inputs, d, "decoder")))
    dec_precision = graph_precision("decoder", dec_file)
    notes = [f"max_seq_len {max_seq}: prompt + generated positions; max_input_len {max_in}: prefill positions "
             "including image tokens and anchors"]
    if slot:
        notes.append("masked-slot empty past: the cache holds one extra zero slot masked out by attention_mask")
    engines["decoder"] = EngineSpec("decoder", "tensorrt", dec_file, "decoder.plan", profiles, dec_precision,
                                    gates(dec.output_names[0], dec_precision), notes=notes)

    options = BuildOptions(**{**asdict(options), "max_seq_len": max_seq, "max_input_len": max_in,
                              "opt_batch": opt_batch, "opt_input_len": opt_in, "opt_past_len": opt_past})
    plan = BuildPlan(str(folder), precision.label, options, engines)
    symbolic = {name: {t.name: t.shape for t in graphs[name].inputs} for name in engines}
    problems = [p for name, spec in engines.items() for p in profile_problems(spec, symbolic[name])]
    if problems:  # construction above makes this unreachable; a guard against future edits
        raise PlanError(f"inconsistent TensorRT profiles: {problems[0]}")
    return plan


def profile_problems(spec: EngineSpec, axes: dict[str, tuple] | None = None) -> list[str]:
    """Consistency checks TensorRT would otherwise report at build or run time (one string each).
    `axes`: each input's symbolic shape (the manifest's); with it every axis is checked against the
    profile's named dimensions, without it (a bare spec) axis 0 is taken for the batch axis."""
    problems = []
    for p in spec.profiles:
        for name, r in p.shapes.items():
            if not (len(r["min"]) == len(r["opt"]) == len(r["max"])):
                problems.append(f"{p.name}: {name} min/opt/max ranks differ")
                continue
            for lo, mid, hi in zip(r["min"], r["opt"], r["max"]):
                if not 0 <= lo <= mid <= hi:
                    problems.append(f"{p.name}: {name} needs 0 <= min <= opt <= max, got {r}")
                    break
        kv = {n: r for n, r in p.shapes.items() if n.startswith("past_key_values.")}
        if kv:
            first = next(iter(kv.values()))
            for name, r in kv.items():
                if r != first:
                    problems.append(f"{p.name}: {name} differs from the other KV inputs")
        if "attention_mask" in p.shapes and "inputs_embeds" in p.shapes and kv:
            mask, emb, past = p.shapes["attention_mask"], p.shapes["inputs_embeds"], next(iter(kv.values()))
            for key in ("min", "opt", "max"):
                if mask[key][1] != past[key][2] + emb[key][1]:
                    problems.append(f"{p.name}: attention_mask {key} length {mask[key][1]} != past "
                                    f"{past[key][2]} + seq {emb[key][1]}")
        if axes is not None:
            for name, r in p.shapes.items():
                for i, axis in enumerate(axes.get(name, ())):
                    want = _axis_range(axis, p.dims)
                    if want is not None and [r["min"][i], r["opt"][i], r["max"][i]] != want:
                        problems.append(f"{p.name}: {name} axis {i} ({axis}) range differs from {want}")
        elif "batch" in p.dims:
            for name, r in p.shapes.items():
                if r["min"] and [r["min"][0], r["opt"][0], r["max"][0]] != list(p.dims["batch"]):
                    problems.append(f"{p.name}: {name} batch range differs from {p.dims['batch']}")
    return problems
