"""Engine folders inside an artifact, and engine.json, the one description of what is in them.

    artifact/engines/<gpu>-sm<cc>-trt<version>/   *.plan, timing.cache, engine.json
    artifact/engines/<name>.failed/               a build whose gate failed, kept for inspection
    artifact/engines/.<name>.partial-XXXX/        a build in progress (hidden: never picked up)

The writer is ``attanchor_export.trt.build`` (through :class:`EngineMeta`, :func:`engine_record` and
:func:`onnxruntime_record`; the folder itself is made all-or-nothing by :mod:`.atomic_folder`), the
reader is the trt backend (through :func:`open_engine_dir`, the records' accessors on EngineMeta and
:func:`select_profile`). No other module spells engine.json's keys.

An engine folder is refused, with one line that says to rebuild, when it was built for another compute
capability or TensorRT version, from other ONNX files than the manifest lists, or when it failed its
accuracy gate at build time. TensorRT engines run only on the TensorRT version that built them, so the
version check is exact, not "same major".
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .atomic_folder import in_progress
from .errors import ArtifactError, RuntimeInputError

__all__ = [
    "ENGINES_DIR", "ENGINE_FORMAT", "ENGINE_FORMAT_VERSION", "ENGINE_META", "EngineMeta", "check_sources",
    "engine_dir_name", "engine_mismatch", "engine_record", "find_engine_dir", "onnxruntime_record",
    "open_engine_dir", "read_engine_meta", "rebuild_hint", "select_profile", "sm_string",
]

ENGINES_DIR = "engines"
ENGINE_META = "engine.json"
ENGINE_FORMAT = "attanchor-engines"
ENGINE_FORMAT_VERSION = 1


def rebuild_hint(folder) -> str:
    return f"rebuild with `attanchor-export build {folder}`"


def engine_dir_name(gpu_name: str, sm, trt_version: str) -> str:
    """"<gpu-slug>-sm<cc>-trt<version>", e.g. ("Orin", (8, 7), "10.3.0.30") -> "orin-sm87-trt10.3.0.30"."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(gpu_name).lower()).strip("-") or "gpu"
    return f"{slug}-sm{sm_string(sm)}-trt{re.sub(r'[^0-9A-Za-z.]+', '', str(trt_version))}"


def sm_string(sm) -> str:
    """Compute capability as digits: (8, 7), "8.7", "sm_87", 87 -> "87"."""
    if isinstance(sm, (tuple, list)):
        return f"{int(sm[0])}{int(sm[1])}"
    text = str(sm).lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}{int(minor)}"
    if not text.isdigit():
        raise ValueError(f"cannot read a compute capability from {sm!r}")
    return text


# ---- the records ----------------------------------------------------------------------------------
def engine_record(*, file: str, onnx: str, sources: dict[str, str], profiles: list[dict], precision: str,
                  tf32: bool, nbytes: int, build_seconds: float) -> dict:
    """One graph built as a TensorRT engine. `profiles` are attanchor_export.trt.plan.Profile dicts (name, dims, shapes),
    `sources` the sha256 of the ONNX file and its external data, `precision` what the graph's types say."""
    return {"backend": "tensorrt", "file": file, "onnx": onnx, "sources": sources, "profiles": profiles,
            "precision": precision, "tf32": tf32, "bytes": nbytes, "build_seconds": build_seconds}


def onnxruntime_record(*, onnx: str, reason: str) -> dict:
    """One graph that stays on onnxruntime (the unbudgeted anchor graph), and why."""
    return {"backend": "onnxruntime", "onnx": onnx, "reason": reason}


@dataclass
class EngineMeta:
    """engine.json. `plan` is attanchor_export.trt.plan.BuildPlan.to_json(); `engines` maps graph -> a record above."""

    tensorrt: str
    gpu: str
    sm: str
    compute_capability: str
    gpu_memory_bytes: int
    built_at: str
    build_seconds: float
    plan: dict
    engines: dict[str, dict]
    gate: dict | None = None  # {"passed": bool, "checks": [...]} once the build gate ran
    format: str = ENGINE_FORMAT
    format_version: int = ENGINE_FORMAT_VERSION

    def on_tensorrt(self, graph: str) -> bool:
        return self.engines.get(graph, {}).get("backend") == "tensorrt"

    def engine_file(self, graph: str) -> str:
        """The serialized engine of `graph`, relative to the engine folder."""
        return self.engines[graph]["file"]

    def profiles(self, graph: str) -> list[dict]:
        """`graph`'s optimization profiles in the engine's order (attanchor_export.trt.plan.Profile dicts)."""
        return self.engines[graph]["profiles"]

    def max_dim(self, graph: str, dim: str) -> int:
        """The largest value any profile of `graph` allows for a named dimension (e.g. total_len)."""
        return max(p["dims"][dim][2] for p in self.profiles(graph))

    @property
    def empty_past(self) -> str:
        """How the decoder engines take an empty KV cache ("zero" or "masked-slot", attanchor_export.trt.plan.EMPTY_PAST_MODES)."""
        return self.plan.get("options", {}).get("empty_past", "zero")

    @property
    def gate_failed(self) -> bool:
        return self.gate is not None and not self.gate.get("passed", False)

    def to_json(self) -> dict:
        data = asdict(self)
        if self.gate is None:
            del data["gate"]
        return data

    def write(self, engine_dir) -> Path:
        path = Path(engine_dir) / ENGINE_META
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict, where="engine.json") -> EngineMeta:
        if data.get("format") != ENGINE_FORMAT or data.get("format_version") != ENGINE_FORMAT_VERSION:
            raise ArtifactError(f"{where} is not an engine.json this runtime reads (format "
                                f"{data.get('format')!r} v{data.get('format_version')})")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name not in ("gate", "format", "format_version")}
        missing = sorted(required - set(data))
        if missing:
            raise ArtifactError(f"{where} lacks {', '.join(missing)}: it was not written by attanchor-export build")
        return cls(**{k: v for k, v in data.items() if k in names})


def read_engine_meta(engine_dir) -> EngineMeta:
    path = Path(engine_dir) / ENGINE_META
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    return EngineMeta.from_json(data, path)


# ---- choosing and refusing ----------------------------------------------------------------------------
def engine_mismatch(meta: EngineMeta, sm: str, trt_version: str, require_gate: bool = True) -> str | None:
    """Why an engine folder cannot run here, or None."""
    if str(meta.sm) != str(sm):
        return f"built for sm{meta.sm} ({meta.gpu}), this GPU is sm{sm}"
    if str(meta.tensorrt) != str(trt_version):
        return f"built with TensorRT {meta.tensorrt}, this is TensorRT {trt_version}"
    if require_gate and meta.gate_failed:
        return "failed its accuracy gate against onnxruntime at build time"
    return None


def find_engine_dir(folder, sm: str, trt_version: str) -> tuple[Path, EngineMeta]:
    """The engines/<name>/ folder built for this compute capability and TensorRT version."""
    folder = Path(folder)
    root = folder / ENGINES_DIR
    # Hidden folders are builds in progress or being replaced; NAME.failed folders fail the gate check.
    metas = sorted(p for p in root.glob(f"*/{ENGINE_META}") if not in_progress(p.parent)) if root.is_dir() else []
    if not metas:
        raise ArtifactError(f"no TensorRT engines in {root}: build them on this device with "
                            f"`attanchor-export build {folder}`")
    seen = []
    for path in metas:
        try:
            meta = read_engine_meta(path.parent)
        except ArtifactError as e:
            seen.append(f"{path.parent.name} ({e})")
            continue
        problem = engine_mismatch(meta, sm, trt_version)
        if problem is None:
            return path.parent, meta
        seen.append(f"{path.parent.name}: {problem}")
    raise ArtifactError(f"no engine in {root} runs on this GPU (sm{sm}, TensorRT {trt_version}): "
                        f"{'; '.join(seen)}; {rebuild_hint(folder)}")


def check_sources(meta: EngineMeta, manifest, folder) -> None:
    """Refuse engines built from other ONNX files than the manifest lists (a re-exported artifact)."""
    files = manifest.files
    for graph, record in meta.engines.items():
        for name, digest in record.get("sources", {}).items():
            expected = files[name].sha256 if name in files else None
            if expected is not None and expected != digest:
                raise ArtifactError(f"the {graph} engine was built from another {name} than this artifact holds "
                                    f"(re-exported?): {rebuild_hint(folder)}")


def open_engine_dir(manifest, sm: str, trt_version: str, engine_dir=None) -> tuple[Path, EngineMeta]:
    """The engine folder to run this artifact from: this GPU's (find_engine_dir), or `engine_dir` when
    given (any gate result: the build gate itself runs engines it has not passed yet), refused when it
    was built for another GPU, TensorRT version or export."""
    folder = Path(manifest.folder)
    if engine_dir is None:
        engine_dir, meta = find_engine_dir(folder, sm, trt_version)
    else:
        engine_dir, meta = Path(engine_dir), read_engine_meta(engine_dir)
        problem = engine_mismatch(meta, sm, trt_version, require_gate=False)
        if problem:
            raise ArtifactError(f"{engine_dir.name}: {problem}: {rebuild_hint(folder)}")
    check_sources(meta, manifest, folder)
    return engine_dir, meta


# ---- optimization profiles (pure, unit-tested without a GPU) -------------------------------------
def select_profile(profiles: list[dict], shapes: dict, graph: str = "engine") -> int:
    """Index of the first optimization profile whose min..max covers every given input shape."""
    for index, profile in enumerate(profiles):
        ranges = profile["shapes"]
        fits = True
        for name, shape in shapes.items():
            r = ranges.get(name)
            if r is None or len(r["min"]) != len(shape) or not all(
                    lo <= int(s) <= hi for lo, s, hi in zip(r["min"], shape, r["max"])):
                fits = False
                break
        if fits:
            return index
    got = ", ".join(f"{n} {tuple(int(x) for x in s)}" for n, s in shapes.items())
    allowed = "; ".join(
        f"{p['name']}: " + ", ".join(f"{k} {v[0]}..{v[2]}" for k, v in p.get("dims", {}).items()) for p in profiles
    )
    raise RuntimeInputError(f"{graph}: no TensorRT optimization profile fits {got} (engines allow {allowed}); "
                            "rebuild with a larger --max-batch / --max-input-len / --max-seq-len")
