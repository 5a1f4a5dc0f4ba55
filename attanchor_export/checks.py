"""`attanchor-export check DIR`: everything that says an artifact is good, re-run on demand.

Graph parity and end-to-end tokens against the PyTorch source (fp32 artifacts), the accuracy gate
(quantized artifacts), and the TensorRT lint; one dict out, for the table or --json.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from attanchor_runtime.manifest import Manifest

from .errors import CheckpointError


def _source(manifest: Manifest, model: str | None) -> str:
    if model:
        return model
    source = manifest.data.get("source", {})
    for candidate in (source.get("resolved"), source.get("model")):
        if candidate and (Path(candidate).exists() or "/" in candidate):
            return candidate
    raise CheckpointError(f"{manifest.folder}: the manifest names no usable source checkpoint; pass --model")


def check_artifact(folder, model: str | None = None, end_to_end: bool = True,
                   steps=lambda name: contextlib.nullcontext()) -> dict:
    from .checkpoint import load_checkpoint
    from .validate import validate_end_to_end, validate_graphs

    with steps("verify files (sha256)"):
        manifest = Manifest.load(folder, verify="sha256")
    precision = manifest.precision
    quantized = precision.get("dtype", "fp32") != "fp32" or precision.get("quant", "none") != "none"
    with steps("load source checkpoint"):
        loaded = load_checkpoint(_source(manifest, model))
    checks, sections = [], {}
    if quantized:
        from .accuracy_gate import gate_artifact

        with steps("accuracy gate"):
            gate = gate_artifact(Path(folder), manifest.data)
        checks += gate["checks"]
        sections["accuracy gate"] = gate.get("summary", "")
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


def _lint_checks(manifest: Manifest) -> list[dict]:
    try:
        from attanchor_graphs.trt_lint import lint_artifact
    except ImportError:
        return []
    out = []
    for target in ("10.3", "latest"):
        for graph, report in lint_artifact(manifest.folder, target=target).items():
            errors = len(report.errors)
            out.append({"graph": graph, "case": f"TensorRT {target}", "metric": "lint_errors", "value": errors,
                        "limit": 0, "passed": errors == 0})
    return out
