"""onnxruntime-genai's systems: its own model builder, run by the peers venv's python."""

from __future__ import annotations

import json
from pathlib import Path

from .common import BenchError
from .systems import GENAI_VERSION, System
from .venvs import peer_python, sh
from .weight_bytes import onnx_weight_bytes


def build_genai(system: System, out: Path, cache: Path, ckpt: Path, source: dict | None) -> dict:
    log = cache / "logs" / f"build-{system.name}.log"
    log.unlink(missing_ok=True)
    sh([peer_python(cache), "-m", "onnxruntime_genai.models.builder", "-i", ckpt, "-o", out,
        "-p", system.variant, "-e", "cpu", "-c", cache / "genai-builder-cache"], log,
       f"onnxruntime-genai: building {system.name}")
    path = out / "model.onnx"
    if not path.is_file():
        raise BenchError(f"onnxruntime-genai: {system.name}: the builder wrote no model.onnx; log: {log}")
    genai = json.loads((out / "genai_config.json").read_text())
    return {"model": str(out), "weight_bytes_per_token": onnx_weight_bytes(path),
            "notes": {"builder": f"onnxruntime-genai {GENAI_VERSION}", "precision": system.variant,
                      "search": genai.get("search", {})}}
