"""checkpoint -> graphs -> artifact folder: the export job, step by step.

Each step is announced through `steps` (a callable returning a context manager) so the CLI can show
progress, stay quiet or emit JSON without this module knowing which.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from attanchor_runtime.manifest import FORMAT, FORMAT_VERSION, Manifest, write_manifest

from attanchor_export import __version__
from attanchor_export.artifact import check_target, staging_folder
from attanchor_export.errors import ExportError, ValidationFailed
from attanchor_export.export_cost import ExportCost, release_heap
from attanchor_export.load.checkpoint import load_checkpoint, locate
from attanchor_export.options import ARTIFACT_IR_VERSION, DEFAULT_THRESHOLD, MODES, ExportOptions
from attanchor_export.trace.embedding import build_embedding_model, save_embedding_model, write_embed_table
from attanchor_export.trace.specs import decoder_spec, embedding_spec, vision_spec

CHECKPOINT_DEFAULTS = "attanchor_config.json"  # per-checkpoint AttAnchor defaults (checkpoint_defaults)

# Files the runtime needs to tokenize, template and preprocess without transformers.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
)


@dataclass
class ExportResult:
    folder: Path
    manifest: dict
    checks: list = field(default_factory=list)
    passed: bool = True


def _no_steps(name):
    return contextlib.nullcontext()


def _finalize_onnx(path: Path) -> None:
    """Pin the IR version and run the checker (by path, so >2 GB models with external data work)."""
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version != ARTIFACT_IR_VERSION:
        model.ir_version = ARTIFACT_IR_VERSION
        path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


def _versions() -> dict:
    import onnxruntime
    import torch
    import transformers

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


def _text_section(loaded, tokenizer) -> dict:
    dims = loaded.dims
    template = getattr(tokenizer, "chat_template", None)
    return {
        "tokenizer_file": "tokenizer.json",
        "chat_template": template if isinstance(template, str) else None,
        "image_token": tokenizer.convert_ids_to_tokens(dims.image_token_id),
        "image_token_id": dims.image_token_id,
        "bos_token_id": dims.bos_token_id,
        "eos_token_ids": list(dims.eos_token_ids),
        "pad_token_id": dims.pad_token_id,
        "add_bos": bool(getattr(tokenizer, "add_bos_token", True)),
    }


def _image_section(loaded) -> dict:
    from attanchor_runtime.preprocess_from_hf import preprocessing_config_from_hf
    from transformers import AutoImageProcessor

    folder = loaded.processor_folder or loaded.folder
    try:
        processor = AutoImageProcessor.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot load the image processor from {folder}: {str(e).splitlines()[0]}") from None
    return preprocessing_config_from_hf(processor)


def checkpoint_defaults(folder: Path) -> dict:
    """AttAnchor settings a checkpoint declares for itself (attanchor_config.json: threshold, calib, task,
    gate_floors), e.g. a model fine-tuned on the anchored layout at a known threshold, or the tiny random
    test checkpoints whose chaotic weights support only loose gate floors. Options given explicitly win."""
    path = Path(folder) / CHECKPOINT_DEFAULTS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    return {k: data[k] for k in ("threshold", "calib", "task", "gate_floors") if k in data}


def _anchor_defaults(loaded, tokenizer, options: ExportOptions, steps):
    """Fill threshold/calib/task from the checkpoint's declared defaults, then resolve threshold "auto"."""
    declared = checkpoint_defaults(loaded.folder)
    threshold = options.threshold if options.threshold is not None else declared.get("threshold", DEFAULT_THRESHOLD)
    calib = options.calib if options.calib is not None else declared.get("calib")
    task = options.task if options.task is not None else declared.get("task")
    floors = _merge_floors(declared.get("gate_floors"), options.gate_floors, options)
    calibration = None
    if threshold == "auto":
        from transformers import AutoImageProcessor

        from attanchor_export.trace.threshold import calibrate

        with steps("calibrate the anchor threshold (target anchor rate)"):
            processor = AutoImageProcessor.from_pretrained(str(loaded.processor_folder or loaded.folder))
            calibration = calibrate(loaded, tokenizer, processor, calib)
        threshold = calibration["threshold"]
    elif not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ExportError(f'threshold must be a number or "auto", got {threshold!r}')
    return replace(options, threshold=float(threshold), calib=calib, task=task, gate_floors=floors), calibration


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


def export_artifact(model_name: str, options: ExportOptions, steps=_no_steps) -> ExportResult:
    """The export job as its list of steps; the manifest is written (and every file hashed) once, at the end."""
    cost = ExportCost()
    _check_options(options)
    check_target(Path(options.output).absolute(), options.force)  # fail before minutes of loading
    located_adapter = _locate_adapter(options)
    # Download (if needed) before the step's spinner: huggingface_hub draws its own progress bars.
    located = locate(model_name, options.revision, offline=options.offline, allow_pickle=options.allow_pickle,
                     trust_remote_code=options.trust_remote_code)
    with steps("load checkpoint"):
        # Streamed: the decoder's weights stay in the shards until written (a LoRA merge needs them loaded).
        loaded = load_checkpoint(located, trust_remote_code=options.trust_remote_code, streamed=not options.adapter)
        tokenizer = _load_tokenizer(loaded)
        cost.record_checkpoint(loaded)
        cost.disk = _check_disk(loaded, options)
        # Read now, so a bad tokenizer or image processor fails before minutes of tracing.
        sections = {"image_preprocessing": _image_section(loaded), "text": _text_section(loaded, tokenizer)}
    options, calibration = _anchor_defaults(loaded, tokenizer, options, steps)
    lora = _merge_adapter(loaded, located_adapter, steps)
    specs = {
        "vision": vision_spec(loaded.dims),
        "embedding": embedding_spec(loaded.dims, options.max_anchors),
        "decoder": decoder_spec(loaded.dims, options.last_logits_only),
    }
    with staging_folder(options.output, options.force) as staging:
        table, optimizations = _write_graphs(loaded, specs, staging.path, options, steps)
        _write_processor_files(loaded, tokenizer, staging.path)
        data = _manifest_data(model_name, loaded, sections, lora, options, calibration, specs, table, optimizations)
        result = ExportResult(folder=options.output, manifest=data)
        budget = _decoder_budget(staging.path / specs["decoder"].file, options)
        cost.budget = budget
        # PyTorch first, then the model is freed before onnxruntime opens the same weights: the two never
        # sit in memory side by side.
        reference = _parity_reference(loaded, staging, data, options, steps, budget) if options.validate else None
        gate_reference = _torch_gate_reference(loaded, staging, data, options, steps, budget)
        _free_model(loaded)
        if reference is not None:
            _validate(reference, staging, data, options, steps, result, cost)
        if _reduces_precision(options):
            _quantize(staging, data, options, steps, cost, gate_reference, low_memory=_low_memory_gate(budget),
                      gate_skipped=_gate_skipped(budget))
        with steps("write manifest (sizes and sha256 of every file)"):
            _write_final_manifest(staging.path, data, cost)
    return result


def _check_disk(loaded, options: ExportOptions) -> dict:
    """Fail in the first minute, not after the trace, when the output's disk cannot hold the export's peak
    (the fp32 graphs and the reduced files written beside them)."""
    from attanchor_export.export_cost import disk_needed_bytes, fp32_graph_bytes, free_disk_bytes, size
    from attanchor_export.precision.quantize import FORMS

    need = disk_needed_bytes(fp32_graph_bytes(loaded), options.dtype, options.quant, len(FORMS),
                             options.quantize_vision)
    parent = Path(options.output).absolute().parent
    free = free_disk_bytes(parent)
    if need > free:
        raise ExportError(f"not enough free disk for the export at {parent}: it needs about {size(need)} at its "
                          f"peak (fp32 graphs and the {_precision_name(options)} files beside them), "
                          f"{size(free)} is free")
    return {"disk_needed_bytes": need, "disk_free_bytes": free}


def _precision_name(options: ExportOptions) -> str:
    return options.quant if options.quant != "none" else options.dtype


def _gate_skipped(budget: dict) -> str | None:
    """Why the accuracy gate cannot run on this machine, or None."""
    if budget.get("fp16_gate_fits") is not False:
        return None
    from attanchor_export.export_cost import size

    return (f"onnxruntime's CPU session of the fp16 decoder needs about {size(budget['fp16_decoder_fed_session_bytes'])} "
            f"even with its weights fed from disk, over the {size(budget['memory_budget_bytes'])} budget: gate it "
            "on a machine with that much memory (attanchor-export check DIR)")


def _low_memory_gate(budget: dict) -> bool:
    """The gate's decoder sessions run without an arena, one row at a time, fp16 weights fed from disk."""
    return not budget["fp32_decoder_fits"] or bool(budget.get("fp16_gate_weights_fed"))


def _reduces_precision(options: ExportOptions) -> bool:
    return options.dtype != "fp32" or options.quant != "none"


def _decoder_budget(decoder: Path, options: ExportOptions) -> dict:
    """Whether onnxruntime can open the fp32 decoder within the memory budget. When it cannot (7B: 27 GB
    of fp32 weights), its parity run is skipped and the reduced-precision decoder is gated against the
    PyTorch model (layer-streamed, fp32) instead of against the fp32 graph."""
    from attanchor_export.export_cost import (
        fp16_cpu_session_bytes,
        fp32_session_bytes,
        graph_bytes,
        memory_budget_bytes,
    )

    budget = memory_budget_bytes(options.memory_budget)
    need = fp32_session_bytes(decoder)
    out = {"memory_budget_bytes": budget, "fp32_decoder_session_bytes": need, "fp32_decoder_fits": need <= budget}
    if options.dtype == "fp16" and options.quant == "none":
        # The fp16 gate runs the fp16 decoder on the CPU, which widens every weight at load (7B: ~40 GB);
        # fed from disk instead (sessions.FedWeightsSession) it needs little more than the fp16 bytes.
        fp16_bytes = graph_bytes(decoder) // 2  # the fp32 decoder, before its fp16 rewrite
        whole, fed = fp16_cpu_session_bytes(fp16_bytes), fp16_cpu_session_bytes(fp16_bytes, fed=True)
        out.update(fp16_decoder_cpu_session_bytes=whole, fp16_decoder_fed_session_bytes=fed,
                   fp16_gate_fits=fed <= budget, fp16_gate_weights_fed=whole > budget and fed <= budget)
    return out


def _parity_reference(loaded, staging, data: dict, options: ExportOptions, steps, budget: dict):
    from attanchor_export.checks.parity import compute_reference

    with steps("PyTorch reference outputs for validation"):
        return compute_reference(loaded, _draft(staging.path, data), decoder=budget["fp32_decoder_fits"])


def _torch_gate_reference(loaded, staging, data: dict, options: ExportOptions, steps, budget: dict):
    """The accuracy gate's reference from PyTorch, where the fp32 decoder graph cannot be run; else None
    (the gate then runs the fp32 graph, as it always has)."""
    if budget["fp32_decoder_fits"] or not _reduces_precision(options) or budget.get("fp16_gate_fits") is False:
        return None
    from attanchor_export.precision.gate import pytorch_reference

    with steps("PyTorch reference for the accuracy gate (decoder layers streamed, fp32)"):
        return pytorch_reference(loaded, staging.path, data)


def _check_options(options: ExportOptions) -> None:
    if options.mode not in MODES:
        raise ExportError(f"unknown anchor mode {options.mode!r}: choose {' or '.join(MODES)}")
    if options.max_anchors is not None and options.max_anchors < 1:
        raise ExportError("--max-anchors must be a positive integer")


def _locate_adapter(options: ExportOptions):
    if not options.adapter:
        return None
    from attanchor_export.load.lora import locate_adapter

    # A missing or pickled adapter fails here, before the model loads.
    return locate_adapter(options.adapter, offline=options.offline, allow_pickle=options.allow_pickle)


def _merge_adapter(loaded, located_adapter, steps) -> dict | None:
    if not located_adapter:
        return None
    from attanchor_export.load.lora import apply_adapter

    # Merged before anything is traced, so the graphs and the parity checks see one model.
    with steps("merge LoRA adapter"):
        return apply_adapter(loaded, located_adapter)


def _write_graphs(loaded, specs: dict, folder: Path, options: ExportOptions, steps) -> tuple[dict, dict]:
    """vision.onnx, embedding.onnx (+ the embed table), decoder.onnx; returns (embed table entry, optimizations)."""
    import torch

    from attanchor_export.trace.decoder import export_decoder
    from attanchor_export.trace.vision import export_vision

    dims, adapter, model = loaded.dims, loaded.adapter, loaded.model
    with steps("trace vision graph"):
        path = folder / specs["vision"].file
        export_vision(adapter.vision_tower_and_projector(model), dims, specs["vision"], path, options.opset)
        _finalize_onnx(path)
    with steps("build embedding graph"):
        weight = adapter.embed_tokens(model).weight.detach().to(torch.float32).numpy()
        table = write_embed_table(weight, folder)
        embedding = build_embedding_model(
            specs["embedding"], table, dims.image_token_id, options.mode, options.max_anchors, ARTIFACT_IR_VERSION,
        )
        save_embedding_model(embedding, folder / specs["embedding"].file)
        onnx.checker.check_model(str(folder / specs["embedding"].file))
    with steps("trace decoder graph"):
        path = folder / specs["decoder"].file
        export_decoder(adapter.language_model(model), adapter.lm_head(model), dims, specs["decoder"], path,
                       options.opset, streamed=loaded.streamed)
        _finalize_onnx(path)
    optimizations = {}
    if options.optimize:
        from attanchor_export.trace.optimize import optimize_decoder

        # Rewrites only the .onnx protobuf (weights untouched); validation then checks the optimised
        # graph against PyTorch, so no extra ONNX-vs-ONNX check here.
        with steps("optimize decoder graph"):
            optimizations["decoder"] = optimize_decoder(path, dims)
    return table, optimizations


def _write_processor_files(loaded, tokenizer, folder: Path) -> None:
    # Saved by the loaded tokenizer, not copied: transformers 5 rebuilds some tokenizers (Llama) on
    # load, and only the re-saved tokenizer.json carries the pipeline the runtime must mirror.
    tokenizer.save_pretrained(str(folder))
    source = Path(loaded.processor_folder or loaded.folder)
    for name in PROCESSOR_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)


def _manifest_data(model_name, loaded, sections, lora, options, calibration, specs, table, optimizations) -> dict:
    return {
        "source": {
            "model": model_name, "resolved": loaded.source, "alias": loaded.alias,
            "revision": loaded.revision, "commit": loaded.commit, "adapter": lora,
        },
        "architecture": loaded.adapter.architecture,
        "model_types": {
            "vision": loaded.config.vision_config.model_type, "text": loaded.config.text_config.model_type,
        },
        "dims": loaded.dims.to_dict(),
        "anchor": {
            "op": "ai.attanchor::AnchorInsert", "op_version": 1, "mode": options.mode,
            "threshold": float(options.threshold), "max_anchors": options.max_anchors,
            "calibration": calibration,
        },
        "graphs": {name: spec.to_json() for name, spec in specs.items()},
        "embed_table": table,
        **sections,
        "precision": {"dtype": "fp32", "quant": "none"},
        "onnx": {"opset": options.opset, "ir_version": ARTIFACT_IR_VERSION},
        "optimizations": optimizations,
        "versions": _versions(),
    }


def _draft(folder: Path, data: dict) -> Manifest:
    """The manifest as the runtime will read it, before manifest.json exists (no file hashes yet)."""
    return Manifest(folder, {"format": FORMAT, "format_version": FORMAT_VERSION, **data})


def _validate(reference, staging, data: dict, options: ExportOptions, steps, result: ExportResult,
              cost: ExportCost) -> None:
    from attanchor_export.checks.parity import compare_to_reference

    with steps("validate against PyTorch"):
        checks = compare_to_reference(reference, _draft(staging.path, data), atol=options.atol)
    result.checks, result.passed = checks, all(c.passed for c in checks)
    data["validation"] = {"atol": options.atol, "passed": result.passed, **reference.method,
                          "checks": [c.to_json() for c in checks]}
    if not result.passed:
        _write_final_manifest(staging.path, data, cost)
        failed_folder = staging.fail()
        raise ValidationFailed(
            f"validation failed: {sum(not c.passed for c in checks)} of {len(checks)} checks; "
            f"the artifact is kept for inspection at {failed_folder}",
            checks=checks,
        )


def _quantize(staging, data: dict, options: ExportOptions, steps, cost: ExportCost, reference=None,
              low_memory: bool = False, gate_skipped: str | None = None) -> None:
    """After the fp32 graphs passed parity: rewrite them to the requested precision and gate them
    (against `reference` when given: the PyTorch model's outputs, else the fp32 graphs')."""
    from attanchor_export.precision.gate import AccuracyGateFailed
    from attanchor_export.precision.quantize import quantize_artifact

    try:
        update = quantize_artifact(
            staging.path, data, options.dtype, options.quant, options.block_size, options.calib,
            quantize_lm_head=options.quantize_lm_head, quantize_vision=options.quantize_vision, steps=steps,
            floors=options.gate_floors, task=options.task, reference=reference, low_memory=low_memory,
            ort_fusions=options.ort_fusions, gate=gate_skipped is None, smooth_alpha=options.smooth_alpha,
        )
    except AccuracyGateFailed as e:
        data["precision"] = e.precision or data["precision"]
        _write_final_manifest(staging.path, data, cost)
        failed_folder = staging.fail()
        raise AccuracyGateFailed(f"{e}; the artifact is kept for inspection at {failed_folder}",
                                 results=e.results, precision=e.precision) from None
    data["precision"] = update["precision"]
    if gate_skipped:
        data["precision"]["gate"]["skipped"] = gate_skipped


def _free_model(loaded) -> None:
    """Drop the torch model (the export needs only its outputs from here on) and give the heap back."""
    import gc

    loaded.model = loaded.streamed = None
    gc.collect()
    release_heap()


def _write_final_manifest(folder: Path, data: dict, cost: ExportCost) -> None:
    data["export"] = cost.to_json(folder)
    write_manifest(folder, data)


__all__ = ["ExportOptions", "ExportResult", "export_artifact"]
