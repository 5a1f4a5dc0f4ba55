"""Step 3: every system built from the one checkpoint, each in CACHE/models/<dims>-seed<seed>/<system>/ with a
build.json (files, bytes on disk, weight bytes read per decode token), cached by its family's recipe version."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .build_genai import build_genai
from .build_llama import build_llama
from .build_project import build_project
from .common import say
from .systems import BUILD_VERSION, BY_NAME, System
from .weight_bytes import safetensors_weight_bytes

# family -> builder(system, staging folder, cache, checkpoint, the source system's build.json or None) -> info
# (that build.json is the builder's `source_build`)
BUILDERS = {"project": build_project, "genai": build_genai, "llama": build_llama}


def model_dir(cache: Path, dims: str, seed: int, system: str) -> Path:
    return cache / "models" / f"{dims}-seed{seed}" / system


def build(system: System, cache: Path, ckpt: Path, dims: str, seed: int) -> dict:
    """The system's folder with its build.json (built now unless cached); returns build.json."""
    out = model_dir(cache, dims, seed, system.name)
    if (out / "build.json").is_file():
        cached = json.loads((out / "build.json").read_text())
        if cached.get("build_version") == BUILD_VERSION[system.family]:
            return cached
    if system.family == "transformers":
        info = {"model": str(ckpt), "files": sorted(str(p) for p in ckpt.glob("*.safetensors")),
                "weight_bytes_per_token": safetensors_weight_bytes(ckpt)}
    else:
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        say(f"building {system.name} ...")
        t0 = time.perf_counter()
        source = build(BY_NAME[system.source], cache, ckpt, dims, seed) if system.source else None
        info = BUILDERS[system.family](system, staging, cache, ckpt, source)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        info = json.loads(json.dumps(info).replace(str(staging), str(out)))
        info["files"] = sorted(str(p) for p in out.rglob("*") if p.is_file())
        say(f"built {system.name} in {info['build_s']:.0f} s")
    info["file_bytes"] = sum(Path(p).stat().st_size for p in info["files"])
    info["build_version"] = BUILD_VERSION[system.family]
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
