"""`attanchor-export check DIR`: everything that says an artifact is good, re-run on demand.

Every file's sha256, every weight scanned for NaN/Inf, graph parity and end-to-end tokens against the
PyTorch source (fp32 artifacts), the accuracy gate (quantized artifacts), and the TensorRT lint; one
dict out, for the table or --json.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from attanchor_runtime.manifest import Manifest

from attanchor_export.errors import CheckpointError


def _source(manifest: Manifest, model: str | None) -> str:
    if model:
        return model
    source = manifest.source
    for candidate in (source.resolved, source.model):
        if candidate and (Path(candidate).exists() or "/" in candidate):
            return candidate
    raise CheckpointError(f"{manifest.folder}: the manifest names no usable source checkpoint; pass --model")


def _no_steps(name):
    return contextlib.nullcontext()


def load_source(manifest: Manifest, model: str | None = None, adapter: str | None = None, steps=_no_steps,
                streamed: bool = False):
    """The PyTorch model an artifact was exported from (its recorded source, or `model`), with the LoRA
    adapter it was exported with merged again: what check, eval --compare-torch and bench compare with.
    `streamed`: decoder weights read per layer as it runs (load/streamed.py; a 7B check fits in memory);
    not for timing (bench), and not with an adapter (the merge needs the weights)."""
    from attanchor_export.load.checkpoint import load_checkpoint

    with steps("load source checkpoint"):
        streamed = streamed and not (manifest.source.adapter or adapter)
        loaded = load_checkpoint(_source(manifest, model), streamed=streamed)
    _reapply_adapter(manifest, loaded, adapter, steps)
    return loaded


def check_artifact(folder, model: str | None = None, end_to_end: bool = True,
                   steps=_no_steps, adapter: str | None = None) -> dict:
    from attanchor_export.checks.finite import describe_failures, scan_artifact
    from attanchor_export.checks.parity import validate_end_to_end, validate_graphs

    with steps("verify files (sha256)"):
        manifest = Manifest.load(folder, verify="sha256")
    with steps("scan weights for NaN/Inf"):
        finite = scan_artifact(manifest)
    if not all(c["passed"] for c in finite):  # damaged weights: nothing else is worth comparing
        return {"folder": str(folder), "passed": False, "checks": finite,
                "sections": {"weights": describe_failures(finite)}}
    quantized = manifest.precision.quantized
    loaded = load_source(manifest, model, adapter, steps, streamed=True)
    checks, sections = list(finite), {}
    if quantized:
        with steps("accuracy gate against PyTorch"):
            gate = regate(manifest, loaded)
        checks += gate_checks(gate)
        sections["accuracy gate"] = gate_summary(gate)
    else:
        atol = manifest.data.get("validation", {}).get("atol", 1e-4)
        with steps("graph parity"):
            checks += [c.to_json() for c in validate_graphs(loaded, manifest, atol=atol)]
        if end_to_end:
            with steps("end-to-end generation"):
                checks += [c.to_json() for c in validate_end_to_end(loaded, manifest)]
    with steps("TensorRT lint"):
        checks += _lint_checks(manifest)
    return {"folder": str(folder), "passed": all(c["passed"] for c in checks), "checks": checks,
            "sections": sections}


def _reapply_adapter(manifest: Manifest, loaded, override: str | None, steps) -> None:
    """The graphs hold LoRA-merged weights: merge the same adapter (same files, by sha256) into the source."""
    from attanchor_export.load.lora import apply_adapter, locate_adapter

    recorded = manifest.source.adapter
    if not recorded:
        if override:
            raise CheckpointError(f"{manifest.folder} was exported without an adapter; drop --adapter {override}")
        return
    source = override or (recorded["resolved"] if Path(recorded["resolved"]).is_dir() else recorded["source"])
    with steps("merge LoRA adapter"):
        apply_adapter(loaded, locate_adapter(source, expect=recorded))


def regate(manifest: Manifest, loaded) -> dict:
    """Re-run the export's accuracy gate, with PyTorch (not the long-gone fp32 graphs) as reference."""
    from attanchor_export.export_cost import fp16_cpu_session_bytes, graph_bytes, memory_budget_bytes
    from attanchor_export.precision.gate import pytorch_reference, run_gate

    data, precision = manifest.data, manifest.precision
    reference = pytorch_reference(loaded, manifest.folder, data, torch_vision=True)
    fmt = precision.quant if precision.quant != "none" else precision.dtype
    floors = (precision.gate or {}).get("floors")
    changed = {"vision": precision.vision_quantized}
    # An fp16 decoder whose widened weights would not fit is run with them fed from disk (FedWeightsSession).
    decoder = manifest.path(manifest.graph_file("decoder", "ort"))
    low_memory = precision.dtype == "fp16" and fp16_cpu_session_bytes(graph_bytes(decoder)) > memory_budget_bytes(None)
    return run_gate(manifest.folder, data, reference, fmt, precision.backends, changed, {fmt: floors} if floors else None,
                    low_memory=low_memory, graphs=precision.get("graphs"))


def gate_checks(gate: dict) -> list[dict]:
    out = []
    for r in gate["results"]:
        case = f"{gate['format']} {r['decoder']} ({'/'.join(r['backends'])})"
        for metric in ("cos_mean", "top1", "vision_cos_mean"):
            if metric in r and metric in gate["floors"]:
                floor = gate["floors"][metric]
                # Stored as a deficit so every row reads "value <= limit" like the parity rows.
                out.append({"graph": "accuracy-gate", "case": case, "metric": f"{metric} (>= {floor:g})",
                            "value": round(r[metric], 5), "limit": floor, "passed": r[metric] >= floor,
                            "higher_is_better": True})
    return out


def gate_summary(gate: dict) -> str:
    return "; ".join(
        f"{r['decoder']}: cos {r['cos_mean']:.4f} top-1 {r['top1']:.3f} greedy {r['greedy_match']:.3f}"
        f"{' (meets 0.99 target)' if r.get('meets_target') else ''}" for r in gate["results"]
    )


def _lint_checks(manifest: Manifest) -> list[dict]:
    from attanchor_export.trt.lint import lint_artifact
    out = []
    for target in ("10.3", "latest"):
        for graph, report in lint_artifact(manifest.folder, target=target).items():
            errors = len(report.errors)
            out.append({"graph": graph, "case": f"TensorRT {target}", "metric": "lint_errors", "value": errors,
                        "limit": 0, "passed": errors == 0})
    return out
