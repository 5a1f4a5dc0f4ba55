"""`attanchor-export check DIR`: everything that says an artifact is good, re-run on demand.

Every file's sha256, every weight scanned for NaN/Inf, graph parity and end-to-end tokens against the
PyTorch source (fp32 artifacts), the accuracy gate (quantized artifacts), and the TensorRT lint; one
dict out, for the table or --json.
"""

from __future__ import annotations

from attanchor_runtime.manifest import Gate, Manifest

from attanchor_export.checks.finite import describe_failures, scan_artifact
from attanchor_export.checks.parity import validate_end_to_end, validate_graphs
from attanchor_export.export_cost import MemoryPlan
from attanchor_export.load.source import load_source
from attanchor_export.options import no_steps
from attanchor_export.precision.gate import run_gate, source_model_baseline
from attanchor_export.source_model import drop_front_weights
from attanchor_export.trt.lint import lint_artifact


def check_artifact(folder, model: str | None = None, end_to_end: bool = True,
                   steps=no_steps, adapter: str | None = None) -> dict:
    with steps("verify files (sha256)"):
        manifest = Manifest.load(folder, verify="sha256")
    with steps("scan weights for NaN/Inf"):
        finite = scan_artifact(manifest)
    if not all(c["passed"] for c in finite):  # damaged weights: nothing else is worth comparing
        return {"folder": str(folder), "passed": False, "checks": finite,
                "sections": {"weights": describe_failures(finite)}}
    loaded = load_source(manifest, model, adapter, steps, streamed=True)
    checks, sections = list(finite), {}
    if manifest.precision.quantized:
        with steps("accuracy gate against PyTorch"):
            gate = regate(manifest, loaded)
        checks += gate_checks(gate)
        sections["accuracy gate"] = gate_summary(gate)
    else:
        atol = manifest.validation.atol if manifest.validation is not None else 1e-4
        with steps("graph parity"):
            checks += [c.to_json() for c in validate_graphs(loaded, manifest, atol=atol)]
        if end_to_end:
            with steps("end-to-end generation"):
                checks += [c.to_json() for c in validate_end_to_end(loaded, manifest)]
    with steps("TensorRT lint"):
        checks += _lint_checks(manifest)
    return {"folder": str(folder), "passed": all(c["passed"] for c in checks), "checks": checks,
            "sections": sections}


def regate(manifest: Manifest, loaded) -> Gate:
    """Re-run the export's accuracy gate, with PyTorch (not the long-gone fp32 graphs) as baseline."""
    precision = manifest.precision
    baseline = source_model_baseline(loaded, manifest)
    drop_front_weights(loaded)  # the reference's decoder forwards take embeddings: tower and table not read again
    floors = precision.gate.floors if precision.gate is not None else None
    changed = {"vision": precision.vision_quantized}
    # An fp16 decoder whose widened weights would not fit is run with them fed from disk (MemoryPlan).
    low_memory = MemoryPlan.for_check(manifest).fp16_weights_fed
    return run_gate(manifest, baseline, precision.format, precision.backends, changed,
                    {precision.format: dict(floors)} if floors else None, low_memory=low_memory,
                    graphs=precision.graphs)


def gate_checks(gate: Gate) -> list[dict]:
    out = []
    for r in gate.results:
        case = f"{gate.format} {r.decoder} ({'/'.join(r.backends)})"
        for metric in ("cos_mean", "top1", "vision_cos_mean"):
            value = getattr(r, metric)
            if value is not None and metric in gate.floors:
                floor = gate.floors[metric]
                # Stored as a deficit so every row reads "value <= limit" like the parity rows.
                out.append({"graph": "accuracy-gate", "case": case, "metric": f"{metric} (>= {floor:g})",
                            "value": round(value, 5), "limit": floor, "passed": value >= floor,
                            "higher_is_better": True})
    return out


def gate_summary(gate: Gate) -> str:
    return "; ".join(
        f"{r.decoder}: cos {r.cos_mean:.4f} top-1 {r.top1:.3f} greedy {r.greedy_match:.3f}"
        f"{' (meets 0.99 target)' if r.meets_target else ''}" for r in gate.results
    )


def _lint_checks(manifest: Manifest) -> list[dict]:
    out = []
    for target in ("10.3", "latest"):
        for graph, report in lint_artifact(manifest.folder, target=target).items():
            errors = len(report.errors)
            out.append({"graph": graph, "case": f"TensorRT {target}", "metric": "lint_errors", "value": errors,
                        "limit": 0, "passed": errors == 0})
    return out
