"""fp16 / int8 / int4 artifacts: rewrite the fp32 graphs of a staging folder in place, gate them.

The exporter writes fp32 graphs, then calls `quantize_artifact(folder, manifest_data, ...)`, which
reads as its steps: the fp32 gate reference, calibration inputs, each graph rewritten (fp16 in
precision.fp16, weight forms in precision.weights), the accuracy gate (precision.gate), and returns
the manifest's precision section. It rewrites decoder.onnx (and vision.onnx when asked) and writes the
TensorRT form beside it where that differs (decoder.trt.onnx). docs/QUANTIZATION.md explains every
choice; the short version:

- fp16 (`dtype="fp16"`): onnxruntime's converter with normalisations, Softmax, the RoPE angle path and
  the lm_head kept fp32, graph inputs/outputs float32.
- int4 (`quant="int4"`): weight-only, blockwise, on the decoder's linear MatMuls (lm_head and vision
  optional). Two forms:
    "MatMulNBits" (com.microsoft, asymmetric uint4 + zero points, any block size 16..): decoder.onnx, read
        by onnxruntime CPU/CUDA, where MatMulNBits is the native fused int4 GEMM/GEMV kernel.
    "QDQ" (opset 21 blocked DequantizeLinear of symmetric INT4 weights + MatMul): decoder.trt.onnx, what
        TensorRT reads for weight-only INT4 (signed INT4, zero points must be 0, block size 64 or 128).
  Both are written by default (`forms`); precision["backends"] says which file each backend opens.
- int8 (`quant="int8"`): the onnxruntime form is weight-only MatMulNBits with bits=8 (blockwise,
  asymmetric); the TensorRT form is QDQ int8 from quantize_static: per-channel symmetric weights and
  per-tensor symmetric activations calibrated over real decoder inputs (images + prompts through the
  artifact's vision and embedding graphs, `calib`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import onnx
from attanchor_graphs.onnx_utils import name_nodes

from attanchor_export.errors import ExportError
from attanchor_export.options import ARTIFACT_IR_VERSION as IR_VERSION
from attanchor_export.options import BLOCK_SIZES, DTYPES, QUANTS
from attanchor_export.precision.calibration import (
    ArtifactFrontEnd,
    DecoderCalibrationReader,
    VisionCalibrationReader,
    gate_samples,
    load_calibration_set,
)
from attanchor_export.precision.fp16 import convert_fp16
from attanchor_export.precision.gate import AccuracyGateFailed, compute_reference, fp32_task_answers, run_gate
from attanchor_export.precision.weights import (
    DEFAULT_ACCURACY_LEVEL,
    count_quantized,
    int8_static_qdq,
    k_dims,
    linear_matmuls,
    normalize_linears,
    quantize_weights_nbits,
    trt_int4_block,
)

FORMS = ("MatMulNBits", "QDQ")
TRT_SUFFIX = ".trt.onnx"


def _no_steps(name):
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ graph files


def save_model(model, path: Path) -> None:
    """Write `model` to `path` + `path.data` (external data), replacing both, IR pinned, checked."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    onnx.checker.check_model(str(path))


def remove_model(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def trt_name(file: str) -> str:
    return file[: -len(".onnx")] + TRT_SUFFIX if file.endswith(".onnx") else file + TRT_SUFFIX


def _opsets(model) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}


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

    @property
    def fmt(self) -> str:  # the gate's format name
        return self.quant if self.quant != "none" else self.dtype

    @property
    def bits(self) -> int:
        return 4 if self.quant == "int4" else 8

    @property
    def targets(self) -> list[str]:
        """The graphs to rewrite: the decoder always, vision when it is converted or quantized."""
        return ["decoder"] + (["vision"] if (self.dtype == "fp16" or self.quantize_vision) else [])

    def quantizes(self, graph: str) -> bool:
        return self.quant != "none" and (graph != "vision" or self.quantize_vision)


def _check_options(dtype, quant, block_size, forms):
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quant not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    if quant != "none" and block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {block_size} is not supported: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if dtype == "fp16" and quant == "int8":
        raise ExportError(
            "--dtype fp16 with --quant int8 is not supported: use --quant int8 (fp32 activations, int8 weights "
            "for onnxruntime, calibrated int8 QDQ for TensorRT) or --dtype fp16 --quant int4"
        )
    forms = tuple(forms)
    if not forms or any(f not in FORMS for f in forms):
        raise ExportError(f"forms must be a non-empty subset of {', '.join(FORMS)}, got {forms!r}")
    return forms


# ------------------------------------------------------------------------------------------ entry point


def quantize_artifact(
    folder: Path,
    manifest_data: dict,
    dtype: str = "fp32",
    quant: str = "none",
    block_size: int = 128,
    calib: str | None = None,
    quantize_lm_head: bool = False,
    quantize_vision: bool = False,
    steps=_no_steps,
    *,
    forms: tuple[str, ...] = FORMS,
    gate: bool = True,
    floors: dict | None = None,
    gate_tokens: int = 32,
    calibrate_method: str = "MinMax",
    accuracy_level: int | None = None,
    task: str | None = None,
) -> dict:
    """Rewrite the fp32 graphs in `folder` to `dtype`/`quant` in place and gate them against fp32.

    Call after the fp32 graphs, embed table and tokenizer files are in `folder` (without tokenizer.json
    the gate and calibration fall back to synthetic prompt ids). `manifest_data` is the manifest dict
    being built (dims, graphs, anchor, embed_table, image_preprocessing, text); it is not modified.

    Returns {"precision": {...}}, the manifest updates: dtype, quant, block_size, per-file records
    ("graphs": format, bits, block size, symmetric, opsets, quantized node count, bytes, TensorRT
    compatibility), "backends" (which file each backend opens), calibration and "gate" (floors, target,
    per-form metrics, passed). Raises AccuracyGateFailed (results and precision attached) when a form is
    below its floor, ExportError on bad options. fp32/none returns the plain precision section untouched.
    """
    folder = Path(folder)
    forms = _check_options(dtype, quant, block_size, forms)
    if dtype == "fp32" and quant == "none":
        return {"precision": {"dtype": "fp32", "quant": "none"}}
    req = _Request(
        folder, {g: manifest_data["graphs"][g]["file"] for g in ("vision", "embedding", "decoder")}, dtype, quant,
        block_size, forms, bool(quantize_lm_head), bool(quantize_vision),
        accuracy_level if accuracy_level is not None else DEFAULT_ACCURACY_LEVEL.get(quant, 0), calibrate_method,
    )
    precision = _precision_header(req)
    with steps("fp32 reference for the accuracy gate"):
        front = ArtifactFrontEnd(folder, manifest_data)
        reference = _fp32_reference(req, manifest_data, front, gate_tokens, task) if gate else None
    readers = _calibration(req, front, calib, precision, steps)
    del front
    records: dict[str, dict] = {}
    backends = {b: dict(req.files) for b in ("ort", "trt")}
    for graph in req.targets:
        _rewrite_graph(req, graph, readers.get(graph), records, backends, steps)
    precision["graphs"] = records
    precision["backends"] = backends
    if not gate:
        precision["gate"] = {"format": req.fmt, "skipped": True, "passed": None}
    else:
        with steps(f"accuracy gate ({req.fmt})"):
            changed = {g: g in req.targets for g in ("vision", "decoder")}
            precision["gate"] = run_gate(folder, manifest_data, reference, req.fmt, backends, changed, floors)
        _raise_if_failed(req.fmt, precision)
    return {"precision": precision}


# ------------------------------------------------------------------------------------------ the steps


def _precision_header(req: _Request) -> dict:
    precision: dict = {"dtype": req.dtype, "quant": req.quant}
    if req.quant != "none":
        precision.update(block_size=req.block_size, lm_head_quantized=req.quantize_lm_head,
                         vision_quantized=req.quantize_vision, forms=list(req.forms))
    return precision


def _fp32_reference(req: _Request, manifest_data: dict, front: ArtifactFrontEnd, new_tokens: int, task: str | None):
    """What the fp32 graphs produce on the gate set (and on the task's questions), before any is rewritten."""
    from attanchor_runtime.sessions import ort_session

    decoder32 = ort_session(req.folder / req.files["decoder"])
    reference = compute_reference(front, decoder32, gate_samples(), new_tokens=new_tokens)
    del decoder32
    if task:
        reference.task = fp32_task_answers(req.folder, manifest_data, req.files, task)
    return reference


def _calibration(req: _Request, front: ArtifactFrontEnd, calib, precision: dict, steps) -> dict:
    """Calibration readers per graph for int8 QDQ (none for weight-only forms); records the set used."""
    if req.quant == "int8" and "QDQ" in req.forms:
        with steps("calibration inputs (images + prompts through vision and embedding)"):
            samples = load_calibration_set(calib)
            readers = {"decoder": DecoderCalibrationReader.from_samples(front, samples)}
            if req.quantize_vision:
                readers["vision"] = VisionCalibrationReader.from_samples(front, samples)
            precision["calibration"] = {
                "source": str(calib) if calib else "builtin", "samples": len(samples),
                "method": req.calibrate_method, "prompts": front.encoder.source,
                "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel",
            }
        return readers
    if calib is not None:
        precision["calibration"] = {"source": str(calib), "used": False,
                                    "note": "weight-only formats need no calibration"}
    return {}


def _rewrite_graph(req: _Request, graph: str, reader, records: dict, backends: dict, steps) -> None:
    """One graph: fp16 first when asked, then its weight forms; records each file written."""
    file = req.files[graph]
    path = req.folder / file
    base = {"graph": graph, "dtype": req.dtype}
    if req.dtype == "fp16":
        with steps(f"fp16 {file}"):
            model, kept = convert_fp16(onnx.load(str(path)), "logits" if graph == "decoder" else None)
            save_model(model, path)
            base["fp16"] = {"converter": "onnxruntime.transformers.float16", "kept_fp32_nodes": kept}
            del model
    if not req.quantizes(graph):
        records[file] = {**base, "format": "fp16", "backend": ["ort", "trt"],
                         "opset": _opsets(onnx.load(str(path), load_external_data=False)), "bytes": graph_bytes(path)}
        return
    normalized = req.folder / f".{file}.normalized.onnx"
    names, head, ks = _normalized_copy(req, graph, normalized)
    written = []
    try:
        if "QDQ" in req.forms:
            trt_file = trt_name(file) if "MatMulNBits" in req.forms else file
            with steps(f"{req.quant} QDQ {trt_file} (TensorRT)"):
                records[trt_file] = _qdq_form(req, graph, base, normalized, trt_file, names, ks, reader)
            backends["trt"][graph] = trt_file
            written.append(records[trt_file])
        if "MatMulNBits" in req.forms:
            with steps(f"{req.quant} MatMulNBits {file} (onnxruntime)"):
                records[file] = _nbits_form(req, path, base, normalized, names)
            if "QDQ" not in req.forms:
                backends["trt"][graph] = None
            written.append(records[file])
    finally:
        remove_model(normalized)
    for record in written:
        _count_linears(record, graph, names, head if req.quantize_lm_head else None)


def _normalized_copy(req: _Request, graph: str, normalized: Path) -> tuple[list[str], str | None, list[int]]:
    """Named nodes, every constant-weight linear as MatMul(x, W): the copy both forms start from.
    Returns the linears to quantize, the lm_head's name, and their K dims."""
    file = req.files[graph]
    model = onnx.load(str(req.folder / file))
    name_nodes(model.graph)
    normalize_linears(model.graph)
    names, head = linear_matmuls(model.graph, req.quantize_lm_head, "logits" if graph == "decoder" else None)
    if not names:
        raise ExportError(f"{file}: found no MatMul with a constant weight to quantize")
    ks = k_dims(model.graph, names)
    save_model(model, normalized)
    return names, head, ks


def _qdq_form(req: _Request, graph: str, base: dict, normalized: Path, trt_file: str, names, ks, reader) -> dict:
    """The TensorRT form: INT4 blocked DequantizeLinear weights, or calibrated int8 QDQ; its record."""
    record = {**base, "format": "QDQ", "bits": req.bits, "backend": ["trt"]}
    if req.quant == "int4":
        trt_block = trt_int4_block(req.block_size, ks)
        record.update(block_size=trt_block or req.block_size, symmetric=True,
                      weights="INT4 blocked DequantizeLinear (axis 0)")
        record["tensorrt_compatible"] = trt_block is not None
        if trt_block is None:
            record["note"] = f"K dims {sorted(set(ks))} are not multiples of 64: TensorRT INT4 needs blocks of 64 or 128"
        elif trt_block != req.block_size:
            record["note"] = f"TensorRT INT4 takes blocks of 64/128 dividing K: block {trt_block} used"
        qmodel = quantize_weights_nbits(onnx.load(str(normalized)), names, 4, trt_block or req.block_size,
                                        symmetric=True, qdq=True)
    else:
        qmodel = int8_static_qdq(normalized, req.folder / trt_file, names, reader, req.calibrate_method)
        record.update(symmetric=True, weights="int8 per-channel", activations="int8 per-tensor (calibrated)",
                      tensorrt_compatible=True)
    record["quantized_nodes"] = count_quantized(qmodel)["QDQ_int4" if req.quant == "int4" else "QDQ_int8"]
    record["opset"] = _opsets(qmodel)
    if "MatMulNBits" not in req.forms:  # the only form: both backends open it, under the graph's own name
        remove_model(req.folder / req.files[graph])
        record["backend"] = ["ort", "trt"]
    save_model(qmodel, req.folder / trt_file)
    record["bytes"] = graph_bytes(req.folder / trt_file)
    return record


def _nbits_form(req: _Request, path: Path, base: dict, normalized: Path, names) -> dict:
    """The onnxruntime form: weight-only MatMulNBits, asymmetric, in the graph's own file; its record."""
    qmodel = quantize_weights_nbits(onnx.load(str(normalized)), names, req.bits, req.block_size,
                                    symmetric=False, qdq=False, accuracy_level=req.accuracy_level or None)
    record = {**base, "format": "MatMulNBits", "bits": req.bits, "block_size": req.block_size,
              "symmetric": False, "backend": ["ort"],
              "quantized_nodes": count_quantized(qmodel)["MatMulNBits"], "opset": _opsets(qmodel),
              "tensorrt_compatible": False, "accuracy_level": req.accuracy_level}
    save_model(qmodel, path)
    record["bytes"] = graph_bytes(path)
    return record


def _count_linears(record: dict, graph: str, names: list[str], head: str | None) -> None:
    """Every linear layer must have been quantized: a shortfall means a linear form the quantizer missed."""
    record["linear_layers"] = len(names)
    record["lm_head"] = head
    if record["quantized_nodes"] != len(names):
        raise ExportError(
            f"{graph}: quantized {record['quantized_nodes']} of {len(names)} linear layers; "
            "the graph has a linear form the quantizer does not catch"
        )


def _raise_if_failed(fmt: str, precision: dict) -> None:
    gate = precision["gate"]
    if gate["passed"]:
        return
    first = next(r for r in gate["results"] if not r["passed"])
    raise AccuracyGateFailed(
        f"{fmt} accuracy gate failed for {first['decoder']}"
        f"{' + ' + first['vision'] if first.get('vision_changed') else ''}: {'; '.join(first['failures'])}",
        results=gate["results"], precision=precision,
    )


__all__ = ["BLOCK_SIZES", "DTYPES", "FORMS", "QUANTS", "graph_bytes", "quantize_artifact", "save_model", "trt_name"]
