"""checkpoint -> graphs -> artifact folder: the export job, step by step.

Each step is announced through `steps` (a callable returning a context manager) so the CLI can show
progress, stay quiet or emit JSON without this module knowing which.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import platform
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import onnxruntime
import torch
import transformers
from attanchor_runtime.manifest import (
    Anchor,
    Graphs,
    Manifest,
    Onnx,
    Optimizations,
    Source,
    Text,
    Validation,
    write_manifest,
)

from attanchor_export import __version__
from attanchor_export.artifact import check_target, remove_stale_staging, staging_folder
from attanchor_export.checks.parity import compare_with_source, source_outputs
from attanchor_export.errors import ExportError, ValidationFailed
from attanchor_export.export_cost import (
    ExportCost,
    MemoryPlan,
    disk_needed_bytes,
    fp32_graph_bytes,
    free_disk_bytes,
    int8_calibration_problem,
    memory_budget_bytes,
    release_heap,
    size,
)
from attanchor_export.load.checkpoint import load_checkpoint, locate
from attanchor_export.load.lora import apply_adapter, locate_adapter
from attanchor_export.options import (
    ARTIFACT_IR_VERSION,
    MODES,
    ExportOptions,
    no_steps,
    prefill_int8_problem,
    vision_quant_problem,
)
from attanchor_export.precision.gate import AccuracyGateFailed, source_model_baseline
from attanchor_export.precision.quantize import FORMS, quantize_artifact
from attanchor_export.source_model import drop_front_weights
from attanchor_export.trace.candidates import excluded_token_ids
from attanchor_export.trace.decoder import export_decoder
from attanchor_export.trace.embedding import build_embedding_model, save_embedding_model, write_embed_table
from attanchor_export.trace.optimize import optimize_decoder
from attanchor_export.trace.threshold import calibrate
from attanchor_export.trace.vision import export_vision

CHECKPOINT_DEFAULTS = "attanchor_config.json"  # per-checkpoint AttAnchor defaults (checkpoint_defaults)

# Files the runtime needs to tokenize, template and preprocess without transformers.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
)


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    checks: list = field(default_factory=list)
    passed: bool = True


def _finalize_onnx(path: Path) -> None:
    """Pin the IR version and run the checker (by path, so >2 GB models with external data work)."""
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version != ARTIFACT_IR_VERSION:
        model.ir_version = ARTIFACT_IR_VERSION
        path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


def _versions() -> dict:
    return {
        "attanchor_export": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _load_tokenizer(loaded):
    from transformers import AutoTokenizer

    folder = loaded.processor_folder or loaded.folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise ExportError(f"cannot load the tokenizer from {folder}: {str(e).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{folder} has no fast tokenizer (tokenizer.json): the torch-free runtime needs one")
    return tokenizer


def _text_section(loaded, tokenizer) -> Text:
    tokens = loaded.tokens
    template = getattr(tokenizer, "chat_template", None)
    return Text(
        tokenizer_file="tokenizer.json",
        chat_template=template if isinstance(template, str) else None,
        image_token=tokenizer.convert_ids_to_tokens(tokens.image_token_id),
        image_token_id=tokens.image_token_id,
        bos_token_id=tokens.bos_token_id,
        eos_token_ids=tokens.eos_token_ids,
        pad_token_id=tokens.pad_token_id,
        add_bos=bool(getattr(tokenizer, "add_bos_token", True)),
    )


def checkpoint_defaults(folder: Path) -> dict:
    """AttAnchor settings a checkpoint declares for itself (attanchor_config.json: threshold, calib, task,
    gate_floors, int4_8bit), e.g. a model fine-tuned on the anchored layout at a known threshold, or the tiny random
    test checkpoints whose chaotic weights support only loose gate floors. Options given explicitly win."""
    path = Path(folder) / CHECKPOINT_DEFAULTS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    return {k: data[k] for k in ("threshold", "calib", "task", "gate_floors", "int4_8bit") if k in data}


def _anchor_defaults(loaded, tokenizer, options: ExportOptions, steps, excluded=()):
    """Fill threshold/calib/task from the checkpoint's declared defaults, then resolve threshold "auto"."""
    declared = checkpoint_defaults(loaded.folder)
    threshold = options.threshold if options.threshold is not None else declared.get("threshold", loaded.family.default_threshold)
    calib = options.calib if options.calib is not None else declared.get("calib")
    task = options.task if options.task is not None else declared.get("task")
    floors = _merge_floors(declared.get("gate_floors"), options.gate_floors, options)
    int4_8bit = options.int4_8bit if options.int4_8bit is not None else (declared.get("int4_8bit") or ())
    # a bare string would pass as a tuple of one-letter names
    if not isinstance(int4_8bit, (list, tuple)) or not all(isinstance(p, str) and p for p in int4_8bit):
        raise ExportError(f"int4_8bit must be a list of non-empty linear names, got {int4_8bit!r}")
    calibration = None
    if threshold == "auto":
        from transformers import AutoImageProcessor

        with steps("calibrate the anchor threshold (target anchor rate)"):
            processor = AutoImageProcessor.from_pretrained(str(loaded.processor_folder or loaded.folder))
            calibration = calibrate(loaded, tokenizer, processor, calib, excluded_token_ids=excluded)
        threshold = calibration.threshold
    elif not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ExportError(f'threshold must be a number or "auto", got {threshold!r}')
    elif not math.isfinite(threshold):
        # Stored as the runtime's default, a NaN or infinite threshold would break every later run.
        raise ExportError(f"threshold must be a finite number, got {threshold}")
    return replace(options, threshold=float(threshold), calib=calib, task=task, gate_floors=floors,
                   int4_8bit=tuple(int4_8bit)), calibration


def _merge_floors(declared: dict | None, given: dict | None, options: ExportOptions) -> dict | None:
    """Per-format floors the checkpoint declares ({"int4": {"cos_mean": ...}}), then --gate-floor on top
    (flat METRIC=VALUE pairs apply to the format being exported)."""
    if not declared:
        return given
    merged = {fmt: dict(v) for fmt, v in declared.items()}
    if given:
        fmt = _precision_name(options)
        flat = {k: v for k, v in given.items() if not isinstance(v, dict)}
        merged.setdefault(fmt, {}).update(flat)
        for k, v in given.items():
            if isinstance(v, dict):
                merged.setdefault(k, {}).update(v)
    return merged


def export_artifact(model_name: str, options: ExportOptions, steps=no_steps) -> ExportResult:
    """The export job as its list of steps; the manifest is written (and every file hashed) once, at the end."""
    cost = ExportCost()
    _check_options(options)
    # Fail before minutes of loading; the paths are checked again once the model and adapter are located.
    check_target(Path(options.output).absolute(), options.force, _protected_paths(model_name, options.adapter))
    remove_stale_staging(options.output)  # what killed exports to this place left (their owner is gone)
    # A missing or pickled adapter fails here, before the model loads.
    located_adapter = locate_adapter(options.adapter, offline=options.offline, allow_pickle=options.allow_pickle) \
        if options.adapter else None
    # Download (if needed) before the step's spinner: huggingface_hub draws its own progress bars.
    located = locate(model_name, options.revision, offline=options.offline, allow_pickle=options.allow_pickle,
                     trust_remote_code=options.trust_remote_code)
    protected = _protected_paths(located.folder, located_adapter.folder if located_adapter else None)
    with steps("load checkpoint"):
        # Streamed: the decoder's weights stay in the shards until written (a LoRA merge needs them loaded).
        loaded = load_checkpoint(located, trust_remote_code=options.trust_remote_code, streamed=not options.adapter)
        if options.image_size is not None:
            loaded.family.configure(image_size=options.image_size)
        if loaded.processor_folder:
            protected.append(("the checkpoint's processor files", Path(loaded.processor_folder)))
        _check_budget_fits(loaded, options)
        tokenizer = _load_tokenizer(loaded)
        cost.record_checkpoint(loaded)
        fp32_bytes = fp32_graph_bytes(loaded)
        _check_int8_fits(fp32_bytes["decoder"], options)
        cost.disk = _check_disk(fp32_bytes, options)
        # Read now, so a bad tokenizer or image processor fails before minutes of tracing.
        family = loaded.family.manifest_section(loaded.processor_folder or loaded.folder)
        text = _text_section(loaded, tokenizer)
        excluded = excluded_token_ids(tokenizer)  # never anchors: special (and whitespace-only) tokens
    options, calibration = _anchor_defaults(loaded, tokenizer, options, steps, excluded)
    adapter = None
    if located_adapter is not None:
        with steps("merge LoRA adapter"):  # merged before anything is traced: graphs and checks see one model
            adapter = apply_adapter(loaded, located_adapter)
    if loaded.streamed is None:
        _check_finite_parameters(loaded, steps)  # a streamed load checks each tensor as it is read
    graphs = loaded.family.graph_specs(options.max_anchors, options.last_logits_only)
    with staging_folder(options.output, options.force, protected) as staging:
        table, optimizations = _write_graphs(loaded, graphs, staging.path, options, steps, excluded)
        _write_processor_files(loaded, tokenizer, staging.path)
        manifest = Manifest(
            folder=staging.path,
            source=Source(model_name, str(loaded.source), loaded.alias, loaded.revision, loaded.commit, adapter),
            family=family, dims=loaded.dims,
            anchor=Anchor(mode=options.mode, threshold=float(options.threshold), max_anchors=options.max_anchors,
                          calibration=calibration, op_version=2, excluded_token_ids=tuple(excluded)),
            text=text, graphs=graphs, embed_table=table,
            onnx=Onnx(options.opset, ARTIFACT_IR_VERSION), optimizations=optimizations, versions=_versions(),
        )
        memory = cost.memory = MemoryPlan.for_export(staging.path / graphs.decoder.file, options.dtype, options.quant,
                                                     options.memory_budget)
        # PyTorch first, then the model is freed before onnxruntime opens the same weights: the two never
        # sit in memory side by side.
        source = None
        if options.validate:
            with steps("PyTorch reference outputs for validation"):
                source = source_outputs(loaded, manifest, decoder=memory.fp32_decoder_fits)
        baseline = None
        if _reduces_precision(options) and memory.pytorch_gate_baseline:
            with steps("PyTorch baseline for the accuracy gate (decoder layers streamed, fp32)"):
                baseline = source_model_baseline(loaded, manifest)
                # The reference keeps the decoder (its layers stay on disk) for each form's tokens at the
                # gate; nothing reads the vision tower or the token table again.
                drop_front_weights(loaded)
        _free_model(loaded)
        checks = []
        if source is not None:
            manifest, checks = _validate(source, staging, manifest, options, steps, cost)
        if _reduces_precision(options):
            manifest = _quantize(staging, manifest, options, steps, cost, baseline, memory)
            baseline = None  # the reference's decoder and prompt KV cache go with it
        with steps("write manifest (sizes and sha256 of every file)"):
            manifest = _write_final_manifest(manifest, cost)
    return ExportResult(folder=options.output, manifest=dataclasses.replace(manifest, folder=Path(options.output)),
                        checks=checks)


def _protected_paths(model, adapter) -> list[tuple[str, Path]]:
    """What an output folder must never be or contain: the checkpoint and adapter folders (when local)."""
    out = []
    for what, path in (("the source checkpoint", model), ("the adapter", adapter)):
        if path and Path(path).expanduser().exists():
            out.append((what, Path(path).expanduser()))
    return out


def _check_budget_fits(loaded, options: ExportOptions) -> None:
    """An anchor budget K adds K positions to every prompt's static shape: K beyond the context is a
    (huge) allocation that can never run."""
    dims = loaded.dims
    room = dims.max_position_embeddings - dims.image_tokens
    if options.max_anchors is not None and options.max_anchors > room:
        raise ExportError(f"--max-anchors {options.max_anchors} does not fit the model's context of "
                          f"{dims.max_position_embeddings} positions ({dims.image_tokens} of them image tokens): "
                          f"use at most {max(room, 0)}")


def _check_int8_fits(fp32_decoder_bytes: int, options: ExportOptions) -> None:
    """Fail in the first minute, not in the calibration after the checks, when int8's TensorRT form
    cannot be calibrated within the memory budget (a 7B decoder: ~37 GiB)."""
    if options.quant == "int8":
        problem = int8_calibration_problem(fp32_decoder_bytes, memory_budget_bytes(options.memory_budget))
        if problem:
            raise ExportError(problem)


def _check_finite_parameters(loaded, steps) -> None:
    """A model loaded whole (adapter merge, no safetensors): every weight checked for NaN/Inf before tracing."""
    from attanchor_export.load.streamed import check_finite

    with steps("check weights for NaN/Inf"):
        for name, parameter in loaded.model.named_parameters():
            check_finite(parameter.detach(), name)


def _check_disk(fp32_bytes: dict, options: ExportOptions) -> dict:
    """Fail in the first minute, not after the trace, when the output's disk cannot hold the export's peak
    (the fp32 graphs, `fp32_bytes` of export_cost.fp32_graph_bytes, and the reduced files beside them)."""
    need = disk_needed_bytes(fp32_bytes, options.dtype, options.quant, len(FORMS),
                             options.quantize_vision or options.vision_quant != "none", options.prefill_int8)
    parent = Path(options.output).absolute().parent
    free = free_disk_bytes(parent)
    if need > free:
        raise ExportError(f"not enough free disk for the export at {parent}: it needs about {size(need)} at its "
                          f"peak (fp32 graphs and the {_precision_name(options)} files beside them), "
                          f"{size(free)} is free{_leftovers_note(parent)}")
    return {"disk_needed_bytes": need, "disk_free_bytes": free}


def _leftovers_note(parent: Path) -> str:
    """Staging or half-replaced folders in `parent` that are still there (their export may be running):
    named in the free-disk error, since they may be what fills the disk."""
    from attanchor_export.artifact import staging_leftovers

    found = staging_leftovers(parent)
    if not found:
        return ""
    listed = ", ".join(f"{p} ({size(n)})" for p, n in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return f"; unfinished exports' folders take space there: {listed} (remove them once no export is running)"


def _precision_name(options: ExportOptions) -> str:
    """The gate's format name (precision.quantize: an fp32 decoder behind an int8 vision tower is int8)."""
    if options.quant != "none":
        return options.quant
    return options.vision_quant if options.dtype == "fp32" and options.vision_quant != "none" else options.dtype


def _reduces_precision(options: ExportOptions) -> bool:
    return options.dtype != "fp32" or options.quant != "none" or options.vision_quant != "none"


def _check_options(options: ExportOptions) -> None:
    if options.mode not in MODES:
        raise ExportError(f"unknown anchor mode {options.mode!r}: choose {' or '.join(MODES)}")
    if options.max_anchors is not None and options.max_anchors < 1:
        raise ExportError("--max-anchors must be a positive integer")
    number = isinstance(options.threshold, (int, float)) and not isinstance(options.threshold, bool)
    if number and not math.isfinite(options.threshold):
        raise ExportError(f"threshold must be a finite number, got {options.threshold}")
    problem = vision_quant_problem(options.dtype, options.vision_quant, options.quantize_vision) or \
        prefill_int8_problem(options.dtype, options.quant, options.prefill_int8)
    if problem:
        raise ExportError(problem)


def _write_graphs(loaded, graphs: Graphs, folder: Path, options: ExportOptions, steps, excluded):
    """vision.onnx, embedding.onnx (+ the embed table), decoder.onnx; returns (embed table, optimizations)."""
    family, model = loaded.family, loaded.model
    path = folder / graphs.vision.file
    export_vision(family, model, graphs.vision, path, options.opset, steps=steps)
    with steps("check vision graph"):
        _finalize_onnx(path)
    with steps("build embedding graph"):
        weight = family.embed_tokens(model).weight.detach().to(torch.float32).numpy()
        table = write_embed_table(weight, folder)
        embedding = build_embedding_model(family, graphs.embedding, table, loaded.tokens.image_token_id,
                                          options.mode, options.max_anchors, ARTIFACT_IR_VERSION,
                                          excluded_token_ids=excluded)
        save_embedding_model(embedding, folder / graphs.embedding.file)
        onnx.checker.check_model(str(folder / graphs.embedding.file))
    path = folder / graphs.decoder.file
    export_decoder(family.language_model(model), family.lm_head(model), loaded.dims, graphs.decoder, path,
                   options.opset, streamed=loaded.streamed, steps=steps)
    with steps("check decoder graph"):
        _finalize_onnx(path)
    optimizations = Optimizations()
    if options.optimize:
        # Rewrites only the .onnx protobuf (weights untouched); validation then checks the optimised
        # graph against PyTorch, so no extra ONNX-vs-ONNX check here.
        with steps("optimize decoder graph"):
            optimizations = Optimizations(decoder=optimize_decoder(path, loaded.dims))
    return table, optimizations


def _write_processor_files(loaded, tokenizer, folder: Path) -> None:
    # Saved by the loaded tokenizer, not copied: transformers 5 rebuilds some tokenizers (Llama) on
    # load, and only the re-saved tokenizer.json carries the pipeline the runtime must mirror.
    tokenizer.save_pretrained(str(folder))
    source = Path(loaded.processor_folder or loaded.folder)
    for name in PROCESSOR_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)


def _validate(source, staging, manifest: Manifest, options: ExportOptions, steps, cost: ExportCost):
    """(the manifest with its validation section, the checks); ValidationFailed when one fails."""
    with steps("validate against PyTorch"):
        checks = compare_with_source(source, manifest, atol=options.atol)
    passed = all(c.passed for c in checks)
    manifest = dataclasses.replace(manifest, validation=Validation(
        atol=options.atol, passed=passed, **source.method, checks=tuple(c.to_json() for c in checks)))
    if not passed:
        with steps("validate again (onnxruntime, same inputs)"):
            rerun = _rerun_note(source, manifest, options, checks)
        _write_final_manifest(manifest, cost)
        failed_folder = staging.fail()
        raise ValidationFailed(
            f"validation failed: {sum(not c.passed for c in checks)} of {len(checks)} checks; {rerun}; "
            f"the artifact is kept for inspection at {failed_folder}",
            checks=checks,
        )
    return manifest, checks


def _rerun_note(source, manifest: Manifest, options: ExportOptions, checks) -> str:
    """Which side a failed parity check points at: the artifact's outputs again on the same feeds. If they
    repeat, the graph or this process's one PyTorch reference is off, and `check` recomputes that
    reference in a fresh process; if they do not, onnxruntime's outputs varied within this process."""
    again = {(c.graph, c.case, c.metric): c.value for c in compare_with_source(source, manifest, atol=options.atol)}
    changed = [(c, again.get((c.graph, c.case, c.metric))) for c in checks if not c.passed]
    changed = [(c, v) for c, v in changed if v != c.value]
    if not changed:
        return ("onnxruntime gave the same values on a second run (`attanchor-export check FOLDER` recomputes "
                "the PyTorch reference in a fresh process)")
    c, v = changed[0]
    return f"onnxruntime's second run differs from its first ({c.graph} {c.case} {c.metric}: {c.value:.3g} then {v:.3g})"


def _quantize(staging, manifest: Manifest, options: ExportOptions, steps, cost: ExportCost, baseline,
              memory: MemoryPlan) -> Manifest:
    """After the fp32 graphs passed parity: rewrite them to the requested precision and gate them
    (against `baseline` when given: the PyTorch model's outputs, else the fp32 graphs')."""
    try:
        precision = quantize_artifact(
            manifest, options.dtype, options.quant, options.block_size, options.calib,
            quantize_lm_head=options.quantize_lm_head, quantize_vision=options.quantize_vision, steps=steps,
            floors=options.gate_floors, task=options.task, baseline=baseline, low_memory=memory.low_memory_gate,
            ort_fusions=options.ort_fusions, gate=memory.gate_skipped is None,
            smooth_alpha=options.smooth_alpha, int4_8bit=options.int4_8bit or (), vision_quant=options.vision_quant,
            prefill_int8=options.prefill_int8,
        )
    except AccuracyGateFailed as e:
        if e.precision is not None:
            manifest = dataclasses.replace(manifest, precision=e.precision)
        _write_final_manifest(manifest, cost)
        failed_folder = staging.fail()
        raise AccuracyGateFailed(f"{e}; the artifact is kept for inspection at {failed_folder}",
                                 results=e.results, precision=e.precision) from None
    if memory.gate_skipped:
        precision = dataclasses.replace(precision, gate=dataclasses.replace(precision.gate,
                                                                            skipped=memory.gate_skipped))
    return dataclasses.replace(manifest, precision=precision)


def _free_model(loaded) -> None:
    """Drop the torch model (the export needs only its outputs from here on) and give the heap back."""
    loaded.model = loaded.streamed = None
    gc.collect()
    release_heap()


def _write_final_manifest(manifest: Manifest, cost: ExportCost) -> Manifest:
    return write_manifest(dataclasses.replace(manifest, export=cost.record(manifest.folder)))


__all__ = ["ExportOptions", "ExportResult", "export_artifact"]
