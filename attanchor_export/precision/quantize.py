"""fp16 / int8 / int4 artifacts: rewrite the fp32 graphs of a staging folder in place, gate them.

The exporter writes fp32 graphs, then calls `quantize_artifact(manifest, ...)` (the staging folder's
draft manifest), which reads as its steps: the fp32 gate baseline, calibration inputs, each graph
rewritten (fp16 in precision.fp16, weight forms in precision.weights), the accuracy gate
(precision.gate), and returns the manifest's precision section. It rewrites decoder.onnx (and vision.onnx when asked) and writes the
TensorRT form beside it where that differs (decoder.trt.onnx). docs/QUANTIZATION.md explains every
choice; the short version:

- fp16 (`dtype="fp16"`): onnxruntime's converter with normalisations, Softmax, the RoPE angle path and
  the lm_head kept fp32, graph inputs/outputs float32.
- int4 (`quant="int4"`): weight-only, blockwise, on the decoder's linear MatMuls, the lm_head included
  unless kept fp32 (LM_HEAD_QUANTIZED_BY_DEFAULT); the vision tower optional. Two forms:
    "MatMulNBits" (com.microsoft, asymmetric uint4 + zero points, any block size 16..): decoder.onnx, read
        by onnxruntime CPU/CUDA, where MatMulNBits is the native fused int4 GEMM/GEMV kernel.
    "QDQ" (opset 21 blocked DequantizeLinear of symmetric INT4 weights + MatMul): decoder.trt.onnx, what
        TensorRT reads for weight-only INT4 (signed INT4, zero points must be 0, block size 64 or 128).
  Both are written by default (`forms`); precision.backends says which file each backend opens.
- int8 (`quant="int8"`): the onnxruntime form is weight-only MatMulNBits with bits=8 (blockwise,
  asymmetric); the TensorRT form is QDQ int8 as quantize_static makes it (written streamed:
  write_int8_qdq below): per-channel symmetric weights and per-tensor symmetric activations calibrated
  over real decoder inputs (images + prompts through the artifact's vision and embedding graphs,
  `calib`), after SmoothQuant has moved the activations'
  outlier channels into the weights (precision.smoothing, `smooth_alpha`).
- int8 vision (`vision_quant="int8"`, whatever `quant` the decoder gets): weights and activations int8.
  vision.onnx is quantize_dynamic's MatMulInteger form (activations quantized per call; onnxruntime fuses
  it into DynamicQuantizeMatMul), vision.trt.onnx the calibrated QDQ form TensorRT reads (the decoder's int8
  QDQ writer over the calibration set's images, symmetric, no smoothing). On the CPU the QDQ form runs no faster than
  fp32 and the dynamic one 1.26x (tiny-vqa) to 2.1x (CLIP ViT-L/14-336, TinyLLaVA-1B dims) faster, with the
  higher feature cosine (scripts/measure_vision_int8.py, docs/QUANTIZATION.md).
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
from attanchor_graphs.onnx_utils import name_nodes
from attanchor_runtime.manifest import Dims, FormRecord, Gate, Manifest, Precision, freeze
from attanchor_runtime.pipeline import Pipeline

from attanchor_export.errors import ExportError
from attanchor_export.export_cost import graph_bytes
from attanchor_export.load.datasets import gate_samples, load_calibration_set
from attanchor_export.options import ARTIFACT_IR_VERSION as IR_VERSION
from attanchor_export.options import (
    BLOCK_SIZES,
    DEFAULT_SMOOTH_ALPHA,
    DTYPES,
    QUANTS,
    no_steps,
    prefill_int8_problem,
    vision_quant_problem,
)
from attanchor_export.precision.calibration import (
    DecoderCalibrationReader,
    VisionCalibrationReader,
    channel_absmax,
)
from attanchor_export.precision.fp16 import convert_fp16_file
from attanchor_export.precision.gate import (
    DEFAULT_NEW_TOKENS,
    AccuracyGateFailed,
    GateBaseline,
    fp32_baseline,
    fp32_task_answers,
    gate_pipeline,
    run_gate,
)
from attanchor_export.precision.graph_files import opsets, remove_model, save_model, trt_name
from attanchor_export.precision.ort_fusions import fuse_decoder_file
from attanchor_export.precision.prefill_int8 import prefill_name, write_prefill_graph
from attanchor_export.precision.smoothing import smooth_file
from attanchor_export.precision.streamed_weights import (
    linear_nodes,
    merge_shared_input_linears,
    quantize_graph,
    quantize_graph_int8_qdq,
    save_beside,
)
from attanchor_export.precision.weights import (
    DEFAULT_ACCURACY_LEVEL,
    count_quantized,
    int8_dynamic,
    int8_static_qdq,
    normalize_linears,
    trt_int4_block,
)

FORMS = ("MatMulNBits", "QDQ")
# Whether the lm_head is quantized when the user does not say. int4: yes. On tiny-vqa (trained) the int4
# lm_head at block 128 scores 0.991 vs 0.990 with it fp32 (fp32 0.995), and at TinyLLaVA-1B dims the
# fp32 lm_head is a third of what an int4 decode step reads (scripts/bench_peers.py). int8: no (its
# static calibration of the logits has not been measured).
LM_HEAD_QUANTIZED_BY_DEFAULT = {"int4": True, "int8": False}


def lm_head_quantized(quant: str, asked: bool | None) -> bool:
    """The lm_head choice for `quant`: what the user asked, else the format's default."""
    return bool(asked) if asked is not None else LM_HEAD_QUANTIZED_BY_DEFAULT.get(quant, False)


# ------------------------------------------------------------------------------------------ the request


@dataclass(frozen=True)
class _Request:
    """What quantize_artifact was asked for, checked, and what every step reads."""

    folder: Path
    files: dict[str, str]  # graph -> its fp32 file
    dtype: str
    quant: str
    block_size: int
    forms: tuple[str, ...]
    quantize_lm_head: bool
    quantize_vision: bool
    accuracy_level: int
    calibrate_method: str
    smooth_alpha: float | None  # int8 QDQ: SmoothQuant's alpha (precision.smoothing); None = not smoothed
    ort_fusions: bool  # fuse the onnxruntime-only decoder form (precision.ort_fusions)
    dims: Dims
    logits: str  # the decoder's logits output: its lm_head is found (and kept fp32 in fp16) by it
    int4_8bit: tuple[str, ...] = ()  # int4: decoder linears whose weight name holds one of these stay 8-bit
    vision_quant: str = "none"  # int8: the vision tower's weights and activations, whatever `quant` is
    prefill_int8: bool = False  # also the decoder's int8 prompt graph (precision.prefill_int8)

    @property
    def fmt(self) -> str:
        """The gate's format name: the decoder's precision; an fp32 decoder behind an int8 vision tower is
        judged as int8."""
        if self.quant != "none":
            return self.quant
        return self.dtype if self.dtype != "fp32" else (self.vision_quant if self.vision_int8 else self.dtype)

    @property
    def vision_int8(self) -> bool:
        return self.vision_quant == "int8"

    @property
    def bits(self) -> int:
        return 4 if self.quant == "int4" else 8

    @property
    def targets(self) -> list[str]:
        """The graphs to rewrite: the decoder (unless only the vision tower changes), vision when it is
        converted or quantized."""
        decoder = ["decoder"] if (self.dtype, self.quant) != ("fp32", "none") else []
        return decoder + (["vision"] if (self.dtype == "fp16" or self.quantize_vision or self.vision_int8) else [])

    def quantizes(self, graph: str) -> bool:
        return self.quant != "none" and (graph != "vision" or self.quantize_vision)


def _check_options(dtype, quant, block_size, forms, smooth_alpha=None, vision_quant="none", quantize_vision=False,
                   prefill_int8=False):
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quant not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    problem = vision_quant_problem(dtype, vision_quant, quantize_vision) or prefill_int8_problem(dtype, quant,
                                                                                                 prefill_int8)
    if problem:
        raise ExportError(problem)
    if prefill_int8 and "MatMulNBits" not in forms:
        raise ExportError("--prefill-int8 is written from the onnxruntime (MatMulNBits) decoder form")
    if quant != "none" and block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {block_size} is not supported: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if dtype == "fp16" and quant == "int8":
        raise ExportError(
            "--dtype fp16 with --quant int8 is not supported: use --quant int8 (fp32 activations, int8 weights "
            "for onnxruntime, calibrated int8 QDQ for TensorRT) or --dtype fp16 --quant int4"
        )
    if smooth_alpha is not None and not (isinstance(smooth_alpha, (int, float)) and 0 < smooth_alpha <= 1):
        raise ExportError(f"smooth_alpha must be in (0, 1] or None (no smoothing), got {smooth_alpha!r}")
    forms = tuple(forms)
    if not forms or any(f not in FORMS for f in forms):
        raise ExportError(f"forms must be a non-empty subset of {', '.join(FORMS)}, got {forms!r}")
    return forms


# ------------------------------------------------------------------------------------------ entry point


def quantize_artifact(
    manifest: Manifest,
    dtype: str = "fp32",
    quant: str = "none",
    block_size: int = 128,
    calib: str | None = None,
    quantize_lm_head: bool | None = None,
    quantize_vision: bool = False,
    steps=no_steps,
    *,
    forms: tuple[str, ...] = FORMS,
    gate: bool = True,
    floors: dict | None = None,
    gate_tokens: int = DEFAULT_NEW_TOKENS,
    calibrate_method: str = "MinMax",
    accuracy_level: int | None = None,
    task: str | None = None,
    baseline: GateBaseline | None = None,
    low_memory: bool = False,
    ort_fusions: bool = True,
    smooth_alpha: float | None = DEFAULT_SMOOTH_ALPHA,
    int4_8bit: tuple[str, ...] = (),
    vision_quant: str = "none",
    prefill_int8: bool = False,
) -> Precision:
    """Rewrite the fp32 graphs in `manifest.folder` to `dtype`/`quant` in place and gate them against fp32.

    Call after the fp32 graphs, embed table and tokenizer files are in the folder; `manifest` is the
    manifest being built (its fp32 precision section), read and not modified.

    Returns the manifest's precision section: dtype, quant, block_size, per-file records ("graphs":
    format, bits, block size, symmetric, opsets, quantized node count, bytes, TensorRT compatibility),
    "backends" (which file each backend opens), calibration and "gate" (floors, target, per-form metrics,
    passed). Raises AccuracyGateFailed (results and precision attached) when a form is below its floor,
    ExportError on bad options. fp32/none returns the fp32 precision section.
    `baseline`: the gate's baseline computed beforehand (gate.source_model_baseline, when the fp32 decoder
    graph is over the memory budget); None runs the fp32 graphs for it. `low_memory`: the gate's decoder
    sessions keep no arena and feed fp16 weights from disk (gate.run_gate), for a decoder over the budget.
    `smooth_alpha`: SmoothQuant's migration strength for the int8 QDQ form (precision.smoothing; recorded
    as its FormRecord.smoothing), None = calibrate the graph as it is.
    `int4_8bit`: int4 only: the decoder linears whose weight name contains one of these strings keep 8 bits
    (an 8-bit MatMulNBits in the onnxruntime form, unquantized in the TensorRT form: mixed precision for
    the layers a model is most sensitive to, as llama.cpp's Q4_K_M keeps some at 6 bits).
    `vision_quant`: "int8": the vision tower's weights and activations int8 (its own precision, with any
    `quant`, "none" included; not with `quantize_vision`, which gives it `quant`'s weight-only format); its
    image-feature cosine is judged against int8's floor.
    `prefill_int8`: also write the decoder's prompt graph (precision.prefill_int8, recorded as the onnxruntime
    decoder's FormRecord.prefill); the gate then judges the two together, as the runtime runs them.
    """
    forms = _check_options(dtype, quant, block_size, forms, smooth_alpha, vision_quant, quantize_vision, prefill_int8)
    if dtype == "fp32" and quant == "none" and vision_quant == "none":
        return Precision()
    req = _Request(
        Path(manifest.folder), {g: manifest.graphs[g].file for g in ("vision", "embedding", "decoder")}, dtype,
        quant, block_size, forms, lm_head_quantized(quant, quantize_lm_head), bool(quantize_vision),
        accuracy_level if accuracy_level is not None else DEFAULT_ACCURACY_LEVEL.get(quant, 0), calibrate_method,
        smooth_alpha, ort_fusions, manifest.dims, manifest.graphs.decoder.output_names[0],
        tuple(int4_8bit) if quant == "int4" else (), vision_quant, bool(prefill_int8),
    )
    calibrated = quant == "int8" or (req.vision_int8 and "QDQ" in forms)
    fp32 = gate_pipeline(manifest) if (gate and baseline is None) or calibrated else None
    if gate and baseline is None:
        with steps("fp32 baseline for the accuracy gate"):
            baseline = fp32_baseline(fp32, gate_samples(), new_tokens=gate_tokens)
            if task:
                baseline.task = fp32_task_answers(manifest, req.files, task, pipe=fp32)
    readers, calibration = _calibration(req, fp32, calib, steps)
    del fp32
    records: dict[str, dict] = {}
    backends = {b: dict(req.files) for b in ("ort", "trt")}
    for graph in req.targets:
        _rewrite_graph(req, graph, readers.get(graph), records, backends, steps)
    extra = ({"block_size": req.block_size, "lm_head_quantized": req.quantize_lm_head,
              "vision_quantized": req.quantize_vision, "forms": req.forms, "int4_8bit": req.int4_8bit}
             if req.quant != "none" else {})
    if req.vision_int8:
        extra.update(vision_quantized=True, vision_quant=req.vision_quant, forms=req.forms)
    precision = Precision(
        dtype=req.dtype, quant=req.quant, calibration=calibration,
        graphs=freeze({f: FormRecord.from_json(r, f"precision.graphs.{f}") for f, r in records.items()}),
        backends=freeze(backends), **extra,
    )
    if not gate:
        return dataclasses.replace(precision, gate=Gate(format=req.fmt, skipped=True, passed=None))
    with steps(f"accuracy gate ({req.fmt})"):
        changed = {g: g in req.targets for g in ("vision", "decoder")}
        result = run_gate(manifest, baseline, req.fmt, backends, changed, floors, low_memory=low_memory,
                          graphs=precision.graphs, vision_format=req.vision_quant if req.vision_int8 else None)
    precision = dataclasses.replace(precision, gate=result)
    _raise_if_failed(req.fmt, precision)
    return precision


# ------------------------------------------------------------------------------------------ the steps


def _calibration(req: _Request, fp32: Pipeline | None, calib, steps) -> tuple[dict, dict | None]:
    """Calibration readers per graph for int8 QDQ (none for weight-only forms), and the record of the set."""
    decoder = req.quant == "int8"
    vision = (decoder and req.quantize_vision) or req.vision_int8
    if "QDQ" in req.forms and (decoder or vision):
        with steps(f"calibration inputs ({'images + prompts through vision and embedding' if decoder else 'images'})"):
            samples = load_calibration_set(calib)
            readers = {}
            if decoder:
                readers["decoder"] = DecoderCalibrationReader.from_samples(fp32, samples)
            if vision:
                readers["vision"] = VisionCalibrationReader.from_samples(fp32, samples)
        return readers, {
            "source": str(calib) if calib else "builtin", "samples": len(samples),
            "method": req.calibrate_method, "prompts": "tokenizer",
            "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel",
            "graphs": sorted(readers), **({"images": len(readers["vision"])} if vision else {}),
        }
    if calib is not None:
        return {}, {"source": str(calib), "used": False, "note": "weight-only formats need no calibration"}
    return {}, None


def _rewrite_graph(req: _Request, graph: str, reader, records: dict, backends: dict, steps) -> None:
    """One graph: fp16 first when asked, then its weight forms; records each file written."""
    file = req.files[graph]
    path = req.folder / file
    base = {"graph": graph, "dtype": req.dtype}
    if req.dtype == "fp16":
        with steps(f"fp16 {file}"):
            kept = convert_fp16_file(path, req.logits if graph == "decoder" else None)
            base["fp16"] = {"converter": "onnxruntime.transformers.float16", "kept_fp32_nodes": kept}
    if graph == "vision" and req.vision_int8:
        _vision_int8(req, file, base, reader, records, backends, steps)
        return
    if not req.quantizes(graph):
        records[file] = {**base, "format": "fp16", "backend": ["ort", "trt"],
                         "opset": opsets(onnx.load(str(path), load_external_data=False)), "bytes": graph_bytes(path)}
        return
    source, copied = _linear_source(req, graph)
    written = []
    try:
        names, head, ks, eight = _linears(req, graph, source)
        if "QDQ" in req.forms:
            trt_file = trt_name(file) if "MatMulNBits" in req.forms else file
            with steps(f"{req.quant} QDQ {trt_file} (TensorRT)"):
                records[trt_file] = _qdq_form(req, graph, base, source, trt_file, names, ks, reader, eight)
            backends["trt"][graph] = trt_file
            written.append(records[trt_file])
        if "MatMulNBits" in req.forms:
            with steps(f"{req.quant} MatMulNBits {file} (onnxruntime)"):
                records[file] = _nbits_form(req, graph, path, base, source, names, eight)
            if req.prefill_int8 and graph == "decoder":
                with steps(f"int8 prompt graph {prefill_name(file)} (onnxruntime)"):
                    records[file]["prefill"] = write_prefill_graph(path, req.folder / prefill_name(file))
            if "QDQ" not in req.forms:
                backends["trt"][graph] = None
            written.append(records[file])
    finally:
        if copied:
            remove_model(source)
    for record in written:
        kept = len(eight) if record["format"] == "QDQ" else 0  # the TensorRT form leaves them unquantized
        _count_linears(record, graph, names, head if req.quantize_lm_head else None, kept)


def _vision_int8(req: _Request, file: str, base: dict, reader, records: dict, backends: dict, steps) -> None:
    """The vision tower with int8 weights and activations: for TensorRT the QDQ form calibrated on the
    calibration set's images (symmetric, as the int8 decoder's but without smoothing: on
    tiny-vqa it changes no cosine); for onnxruntime quantize_dynamic's MatMulInteger form, activations
    quantized per call, which onnxruntime runs faster than the QDQ form and closer to fp32. Linear layers
    only: the patch Conv and attention's activation x activation MatMuls stay fp32."""
    source, copied = _linear_source(req, "vision")
    base = {**base, "bits": 8, "symmetric": True, "weights": "int8 per-channel"}
    written = []
    try:
        names, _, _, _ = _linears(req, "vision", source)
        if "QDQ" in req.forms:
            trt_file = trt_name(file) if "MatMulNBits" in req.forms else file
            with steps(f"int8 QDQ {trt_file} (TensorRT, calibrated on images)"):
                qmodel = _int8_qdq(req, source, req.folder / trt_file, names, reader)
            records[trt_file] = {
                **base, "format": "QDQ", "backend": ["trt"] if "MatMulNBits" in req.forms else ["ort", "trt"],
                "activations": "int8 per-tensor (calibrated)", "tensorrt_compatible": True,
                "quantized_nodes": count_quantized(qmodel)["QDQ_int8"], "opset": opsets(qmodel),
                "bytes": graph_bytes(req.folder / trt_file)}
            backends["trt"]["vision"] = trt_file
            written.append(records[trt_file])
        if "MatMulNBits" in req.forms:  # the onnxruntime form (the name of the option that asks for it)
            with steps(f"int8 dynamic {file} (onnxruntime)"):
                qmodel = int8_dynamic(source, req.folder / file, names)
            records[file] = {
                **base, "format": "MatMulInteger", "backend": ["ort"],
                "activations": "int8 per call (dynamic: DynamicQuantizeLinear)", "tensorrt_compatible": False,
                "quantized_nodes": count_quantized(qmodel)["MatMulInteger"], "opset": opsets(qmodel),
                "bytes": graph_bytes(req.folder / file)}
            if "QDQ" not in req.forms:
                backends["trt"]["vision"] = None
            written.append(records[file])
    finally:
        if copied:
            remove_model(source)
    for record in written:
        _count_linears(record, "vision", names, None)


def _linear_source(req: _Request, graph: str) -> tuple[Path, bool]:
    """The file both forms start from, with every constant-weight linear a MatMul(x, W[K, N]) and every
    node named: the graph itself (what the dynamo exporter writes), or, for a graph with Gemm or
    MatMul(x, Transpose(W)) linears or unnamed nodes (hand-written or older exporters; small), a
    normalised copy made in memory. Returns (path, whether it is a copy to remove)."""
    path = req.folder / req.files[graph]
    skeleton = onnx.load(str(path), load_external_data=False)
    if not _needs_normalizing(skeleton.graph):
        return path, False
    model = onnx.load(str(path))
    name_nodes(model.graph)
    normalize_linears(model.graph)
    normalized = req.folder / f".{req.files[graph]}.normalized.onnx"
    save_model(model, normalized)
    return normalized, True


def _needs_normalizing(graph) -> bool:
    inits = {i.name for i in graph.initializer}
    transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return any(not n.name for n in graph.node) or any(
        (n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in inits)
        or (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in transposed)
        for n in graph.node
    )


def _linears(req: _Request, graph: str, source: Path) -> tuple[list[str], str | None, list[int], set[str]]:
    """The linears to quantize (node names), the lm_head's name, their K dims (no weight is read), and
    those of them that keep 8 bits (int4_8bit: matched on the weight's name, the decoder only)."""
    model = ir.load(str(source))
    nodes, head = linear_nodes(model.graph, req.quantize_lm_head, req.logits if graph == "decoder" else None)
    if not nodes:
        raise ExportError(f"{req.files[graph]}: found no MatMul with a constant weight to quantize")
    eight = set()
    if graph == "decoder" and req.int4_8bit:
        eight = {n.name for n in nodes if any(p in (n.inputs[1].name or "") for p in req.int4_8bit)}
        unmatched = [p for p in req.int4_8bit if not any(p in (n.inputs[1].name or "") for n in nodes)]
        if unmatched:
            raise ExportError(f"--int4-8bit {','.join(unmatched)}: no decoder linear's weight name contains it "
                              f"(they look like {nodes[0].inputs[1].name!r})")
        if len(eight) == len(nodes):
            raise ExportError("--int4-8bit matches every decoder linear: export with --quant int8 instead")
    return ([n.name for n in nodes], head.name if head is not None else None, [int(n.inputs[1].shape[0]) for n in nodes],
            eight)


def _write_form(source: Path, target: Path, names: list[str], bits: int, merge: bool = False,
                eight: set[str] = frozenset(), **quantization) -> tuple[onnx.ModelProto, list[list[str]]]:
    """Quantize `names` of `source` into `target` with weights streamed (precision.streamed_weights);
    returns `target`'s ModelProto without its weights (for counting and opsets) and the groups of linears
    merged into one node (`merge`: those sharing an input, streamed_weights.merge_shared_input_linears).
    `eight`: names of `names` quantized with 8 bits instead (merged only among themselves)."""
    model = ir.load(str(source))
    merged = []
    for subset, subset_bits in ((set(names) - set(eight), bits), (set(eight), 8)):
        nodes = [n for n in model.graph if n.name in subset]
        if not nodes:
            continue
        if merge:
            nodes, groups = merge_shared_input_linears(model.graph, nodes)
            merged += groups
        quantize_graph(model, nodes, bits=subset_bits, **quantization)
    save_beside(model, target, IR_VERSION)
    del model, nodes
    return _written(target), merged


def _written(target: Path) -> onnx.ModelProto:
    """`target` checked and returned without its weights, once the onnx-ir model that wrote it is dropped.
    Its nodes and values refer to each other, so only the cycle collector frees it, and with it the
    weights it made or mapped: collected here, before the next step opens a session beside it."""
    gc.collect()
    onnx.checker.check_model(str(target))
    return onnx.load(str(target), load_external_data=False)


def _qdq_form(req: _Request, graph: str, base: dict, source: Path, trt_file: str, names, ks, reader,
              eight: set[str]) -> dict:
    """The TensorRT form: INT4 blocked DequantizeLinear weights (the `eight` linears left unquantized), or
    calibrated int8 QDQ; its record."""
    record = {**base, "format": "QDQ", "bits": req.bits, "backend": ["trt"]}
    target = req.folder / trt_file
    if req.quant == "int4":
        if eight:
            ks = [k for n, k in zip(names, ks) if n not in eight]
            names = [n for n in names if n not in eight]
            record["kept_8bit"] = _kept_8bit(req, eight, "unquantized (the engine's float type)")
        trt_block = trt_int4_block(req.block_size, ks)
        record.update(block_size=trt_block or req.block_size, symmetric=True,
                      weights="INT4 blocked DequantizeLinear (axis 0)")
        record["tensorrt_compatible"] = trt_block is not None
        if trt_block is None:
            record["note"] = f"K dims {sorted(set(ks))} are not multiples of 64: TensorRT INT4 needs blocks of 64 or 128"
        elif trt_block != req.block_size:
            record["note"] = f"TensorRT INT4 takes blocks of 64/128 dividing K: block {trt_block} used"
        qmodel, _ = _write_form(source, target, names, bits=4, block_size=trt_block or req.block_size,
                                symmetric=True, qdq=True)
    else:
        smoothed = req.folder / f".{trt_file}.smoothed.onnx"
        try:
            if req.smooth_alpha is not None:  # activation outliers into the weights, same function in fp32
                record["smoothing"] = smooth_file(source, smoothed, names, reader, req.smooth_alpha,
                                                 IR_VERSION).to_json()
            qmodel = _int8_qdq(req, smoothed if req.smooth_alpha is not None else source, target, names, reader)
        finally:
            remove_model(smoothed)
        record.update(symmetric=True, weights="int8 per-channel", activations="int8 per-tensor (calibrated)",
                      tensorrt_compatible=True)
    record["quantized_nodes"] = count_quantized(qmodel)["QDQ_int4" if req.quant == "int4" else "QDQ_int8"]
    record["opset"] = opsets(qmodel)
    if "MatMulNBits" not in req.forms:  # the only form: both backends open it, under the graph's own name
        record["backend"] = ["ort", "trt"]
    record["bytes"] = graph_bytes(target)
    return record


def _int8_qdq(req: _Request, source: Path, target: Path, names: list[str], reader) -> onnx.ModelProto:
    """The calibrated int8 QDQ form written to `target`; returned without its weights. MinMax (the
    default) is written streamed (write_int8_qdq: a 1B decoder never whole in memory); the histogram
    methods, which keep every activation anyway, through quantize_static."""
    if req.calibrate_method == "MinMax":
        return write_int8_qdq(source, target, names, reader)
    qmodel = int8_static_qdq(source, target, names, reader, req.calibrate_method)
    save_model(qmodel, target)
    return qmodel


def write_int8_qdq(source: Path, target: Path, names: list[str], reader) -> onnx.ModelProto:
    """quantize_static's MinMax int8 QDQ form of `source`'s linears `names`, written to `target` (+ .data)
    with the weights streamed (streamed_weights.quantize_graph_int8_qdq): each input's range is its
    largest magnitude over `reader`'s samples (calibration.channel_absmax, one session, no prepacking)."""
    model = ir.load(str(source))
    nodes = [n for n in model.graph if n.name in set(names)]
    absmax = channel_absmax(source, reader, sorted({n.inputs[0].name for n in nodes}))
    quantize_graph_int8_qdq(model, nodes, {name: float(m.max()) for name, m in absmax.items()})
    save_beside(model, target, IR_VERSION)
    del model, nodes
    return _written(target)


def _nbits_form(req: _Request, graph: str, path: Path, base: dict, source: Path, names, eight: set[str]) -> dict:
    """The onnxruntime form: weight-only MatMulNBits, asymmetric, in the graph's own file; its record.
    Only onnxruntime reads this file, so the decoder's linears that share an input are merged (q/k/v,
    gate/up: one weight read and one activation quantization each) and its RMSNorms, rotary and attention
    are fused too (ort_fusions)."""
    fused = graph == "decoder" and req.ort_fusions
    qmodel, merged = _write_form(source, path, names, merge=fused, eight=eight, bits=req.bits,
                                 block_size=req.block_size, symmetric=False, qdq=False,
                                 accuracy_level=req.accuracy_level or None)
    fusions = None
    if fused:
        fusions = fuse_decoder_file(path, req.dims)
        fusions["merged_linears"] = {"groups": len(merged), "linears": sum(len(g) for g in merged)}
        qmodel = onnx.load(str(path), load_external_data=False)
    record = {**base, "format": "MatMulNBits", "bits": req.bits, "block_size": req.block_size,
              "symmetric": False, "backend": ["ort"],
              "quantized_nodes": count_quantized(qmodel)["MatMulNBits"], "opset": opsets(qmodel),
              "tensorrt_compatible": False, "accuracy_level": req.accuracy_level}
    if eight:
        record["kept_8bit"] = _kept_8bit(req, eight, "8-bit MatMulNBits")
    if fusions is not None:
        record["ort_fusions"] = fusions
    record["bytes"] = graph_bytes(path)
    return record


def _kept_8bit(req: _Request, eight: set[str], kept_as: str) -> dict:
    """A form's FormRecord.kept_8bit: what --int4-8bit asked for, how many linears it matched, and as what."""
    return {"patterns": list(req.int4_8bit), "linears": len(eight), "as": kept_as}


def _count_linears(record: dict, graph: str, names: list[str], head: str | None, kept: int = 0) -> None:
    """Every linear layer must have been quantized (but the `kept` ones left as they are on purpose): a
    shortfall means a linear form the quantizer missed."""
    record["linear_layers"] = len(names)
    record["lm_head"] = head
    merged = (record.get("ort_fusions") or {}).get("merged_linears") or {"groups": 0, "linears": 0}
    if record["quantized_nodes"] != len(names) - kept - merged["linears"] + merged["groups"]:
        raise ExportError(
            f"{graph}: quantized {record['quantized_nodes']} of {len(names)} linear layers; "
            "the graph has a linear form the quantizer does not catch"
        )


def _raise_if_failed(fmt: str, precision: Precision) -> None:
    gate = precision.gate
    if gate.passed:
        return
    first = next(r for r in gate.results if not r.passed)
    raise AccuracyGateFailed(
        f"{fmt} accuracy gate failed for {first.decoder}"
        f"{' + ' + first.vision if first.vision_changed else ''}: {'; '.join(first.failures)}",
        results=gate.results, precision=precision,
    )


__all__ = ["BLOCK_SIZES", "DTYPES", "FORMS", "QUANTS", "quantize_artifact", "trt_name"]
