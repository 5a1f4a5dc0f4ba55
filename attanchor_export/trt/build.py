"""TensorRT engines from an artifact's ONNX graphs: thin tensorrt calls around trt.plan.BuildPlan.

    result = build_engines("out/tiny", max_batch=1, max_input_len=768, max_seq_len=2048)
    str(result)   # out/tiny/engines/orin-sm87-trt10.3.0.30

Per engine in the plan: a strongly typed network (:func:`strongly_typed_network_flags`), the ONNX
parser's ``parse_from_file`` (external data resolves beside the file), the plan's optimization
profiles, TF32 cleared unless allowed, the workspace limit, and one timing cache per engine folder,
loaded before and saved after every build (a rebuild with other lengths reuses the measured tactics).
No precision builder flag, no per-layer precision, no calibrator: the graphs' tensor types and Q/DQ
nodes are the precision (trt/plan.py's docstring says what each format holds). That is the only way
TensorRT 11 builds, and TensorRT 10.x builds the same engines from the same calls, so both
generations share this one code path.

The engine folder is written through ``artifact.staging_folder`` (``attanchor_runtime.atomic_folder``: a
hidden ``engines/.<name>.partial-*`` renamed when complete) and described by ``attanchor_runtime.engines.EngineMeta`` (engine.json:
TensorRT version, GPU, compute capability, the plan, sha256 of every source ONNX file and of its
external data, build times, gate results).

Then the gate, because engines that build cleanly and print garbage are the known failure: each
engine runs through the real ``trt`` runtime backend on fixed inputs and is compared with
onnxruntime CPU on the same ONNX file (fp32: max |diff| <= 1e-3 on logits and image features,
otherwise cosine >= 0.99; anchor indices exactly). The decoder is checked in both profiles (prefill,
then one decode step on the engine's own KV cache), both sides driven by the runtime's decode loop
(``attanchor_runtime.decode.decoder_calls``) on the same feeds. A failing folder is kept as
``engines/<name>.failed`` and GateFailed is raised; the runtime never picks it up.

Without tensorrt, cuda-python or a CUDA GPU, TrtUnavailable (exit code 2) says in one line what is
missing, how to install it and that the ONNX graphs are already written, and where.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from attanchor_runtime.batch import PreparedBatch
from attanchor_runtime.cuda_util import Cuda, CudaUnavailable
from attanchor_runtime.decode import decoder_calls
from attanchor_runtime.engines import (
    ENGINE_META,
    ENGINES_DIR,
    EngineMeta,
    engine_dir_name,
    engine_record,
    onnxruntime_record,
)
from attanchor_runtime.families import family_of
from attanchor_runtime.manifest import Manifest, sha256_of
from attanchor_runtime.ort_backend import OrtBackend
from attanchor_runtime.trt_backend import TRT_INSTALL_HINT, TrtBackend

from attanchor_export.artifact import staging_folder
from attanchor_export.checks.compare import cosine_rows
from attanchor_export.errors import ExportError
from attanchor_export.trt.plan import BuildOptions, BuildPlan, EngineSpec, Gate, PlanError, make_plan

__all__ = ["BuildResult", "EngineBuildError", "GateFailed", "TrtUnavailable", "build_engines", "compare",
           "gate_inputs", "require_tensorrt", "run_gates", "source_hashes", "strongly_typed_network_flags"]


class TrtUnavailable(ExportError):
    """tensorrt / cuda-python / a CUDA GPU is missing; the CLI exits with code 2."""

    exit_code = 2


class EngineBuildError(ExportError):
    """TensorRT could not parse a graph or build an engine."""


class GateFailed(ExportError):
    """An engine disagrees with onnxruntime beyond its format's tolerance."""

    def __init__(self, message: object = "", checks=None) -> None:
        super().__init__(message)
        self.checks = list(checks or [])


@dataclass
class BuildResult:
    engine_dir: Path
    meta: EngineMeta

    def __str__(self) -> str:
        return str(self.engine_dir)

    def to_json(self) -> dict:
        return {"engine_dir": str(self.engine_dir), **self.meta.to_json()}


def _unavailable(what: str, folder) -> TrtUnavailable:
    return TrtUnavailable(f"cannot build TensorRT engines: {what}. Install: {TRT_INSTALL_HINT}. The ONNX graphs are "
                          f"written in {folder}; build the engines on the target GPU with "
                          f"`attanchor-export build {folder}`")


def require_tensorrt(folder):
    """(tensorrt module, cuda_util.Cuda) or TrtUnavailable with a one-line explanation."""
    try:
        import tensorrt as trt
    except ImportError:
        raise _unavailable("the tensorrt Python package is not installed", folder) from None
    try:
        cuda = Cuda()
    except CudaUnavailable as e:
        raise _unavailable(str(e), folder) from None
    return trt, cuda


def source_hashes(onnx_path: Path) -> dict[str, str]:
    """sha256 of an ONNX file and of every external-data file it references, by artifact-relative name."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {onnx_path.name}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in init.external_data if e.key == "location")
    return {n: sha256_of(onnx_path.parent / n) for n in sorted(names)}


# ---- building ---------------------------------------------------------------------------------
def strongly_typed_network_flags(trt) -> int:
    """``create_network`` flags for a strongly typed network. TensorRT 10.x needs STRONGLY_TYPED (its
    networks are weakly typed by default); 11.x keeps the name, deprecated and ignored, because every
    network is strongly typed. A release that drops the name leaves nothing to ask for: 0."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def _parse(trt, network, logger, onnx_path: Path, spec: EngineSpec, folder: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        detail = f"{first.desc()} (node {first.node()})" if first is not None else "see the TensorRT log above"
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {spec.onnx}: {detail}; "
                               f"`attanchor-export lint {folder} --target {_minor(trt.__version__)}` lists what it "
                               "does not support")
    return parser  # the parser owns the weights it read: keep it alive until the engine is built


def _add_profiles(builder, network, config, spec: EngineSpec) -> None:
    shapes = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    for profile in spec.profiles:
        p = builder.create_optimization_profile()
        for name, shape in shapes.items():
            if all(d >= 0 for d in shape):
                continue  # static input: no profile entry
            if name not in profile.shapes:
                raise EngineBuildError(f"{spec.onnx} input {name} has no shape range in the build plan "
                                       "(manifest and graph disagree: re-export)")
            r = profile.shapes[name]
            p.set_shape(name, r["min"], r["opt"], r["max"])
        config.add_optimization_profile(p)


def _build_engine(trt, spec: EngineSpec, folder: Path, out: Path, options: BuildOptions, cache_path: Path,
                  log) -> dict:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_network_flags(trt))
    onnx_path = folder / spec.onnx
    parser = _parse(trt, network, logger, onnx_path, spec, folder)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.builder_optimization_level
    if not options.allow_tf32:  # TF32 is a math mode for fp32 tensors, not a type: it stays a builder flag
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    _add_profiles(builder, network, config, spec)
    log(f"building {spec.engine} from {spec.onnx} ({spec.precision}, {len(spec.profiles)} profile(s))")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    del parser  # it held the parsed weights until the engine was built
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build {spec.engine} from {spec.onnx} "
                               "(see the TensorRT log above); try a larger --workspace or shorter lengths")
    data = memoryview(serialized)
    (out / spec.engine).write_bytes(data)
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return engine_record(file=spec.engine, onnx=spec.onnx, sources=source_hashes(onnx_path),
                         profiles=[json.loads(json.dumps(asdict(p))) for p in spec.profiles],
                         precision=spec.precision, tf32=options.allow_tf32, nbytes=len(data),
                         build_seconds=round(seconds, 2))


def _options(options: BuildOptions | None, overrides: dict) -> BuildOptions:
    options = options or BuildOptions()
    if overrides:
        unknown = sorted(set(overrides) - set(options.__dict__))
        if unknown:
            raise PlanError(f"unknown build option(s): {', '.join(unknown)}")
        options = BuildOptions(**{**options.__dict__, **overrides})
    return options


def _foreign_engine_dir(folder: Path) -> str | None:
    if any(folder.iterdir()) and not (folder / ENGINE_META).is_file():
        return f"it holds no {ENGINE_META}"
    return None


def _gate_failed(gate: dict, failed_dir: Path) -> GateFailed:
    bad = [c for c in gate["checks"] if not c["passed"]]
    first = bad[0]
    return GateFailed(f"{len(bad)} engine gate check(s) failed, first {first['graph']} {first['case']}: "
                      f"{first['metric']} {first['value']:.4g} (limit {first['limit']:.4g}); engines kept for "
                      f"inspection in {failed_dir}", checks=gate["checks"])


def build_engines(folder, options: BuildOptions | None = None, *, gate: bool = True, log=None,
                  **option_overrides) -> BuildResult:
    """Plan (validated first, without tensorrt), then build every TensorRT engine and gate it."""
    folder = Path(folder)
    log = log or (lambda message: None)
    manifest = Manifest.load(folder, verify="size")
    plan = make_plan(manifest, _options(options, option_overrides))
    trt, cuda = require_tensorrt(folder)
    info = cuda.device_info()
    final = folder / ENGINES_DIR / engine_dir_name(info.name, info.sm, trt.__version__)
    start = time.perf_counter()
    # A rebuild replaces this GPU's engines only when done, and only a folder of engines.
    with staging_folder(final, force=True, foreign=_foreign_engine_dir) as staging:
        out = staging.path
        cache_path = Path(plan.options.timing_cache) if plan.options.timing_cache else out / "timing.cache"
        if not plan.options.timing_cache and (final / "timing.cache").is_file():
            shutil.copy2(final / "timing.cache", cache_path)  # tactics measured by an earlier build on this GPU
        records = {}
        for graph, spec in plan.engines.items():
            if spec.backend == "tensorrt":
                records[graph] = _build_engine(trt, spec, folder, out, plan.options, cache_path, log)
            else:
                records[graph] = onnxruntime_record(onnx=spec.onnx, reason=spec.reason)
        meta = EngineMeta(
            tensorrt=trt.__version__, gpu=info.name, sm=info.sm, compute_capability=info.compute_capability,
            gpu_memory_bytes=info.total_memory,
            built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - start, 2), plan=plan.to_json(), engines=records,
        )
        meta.write(out)
        if gate:
            log("gate: engines vs onnxruntime")
            meta.gate = run_gates(manifest, plan, out, trt=trt, cuda=cuda)
            meta.write(out)
            if meta.gate_failed:
                raise _gate_failed(meta.gate, staging.fail())
    return BuildResult(final, meta)


# ---- the gate -----------------------------------------------------------------------------------
def compare(reference: np.ndarray, actual: np.ndarray, gate: Gate, graph: str, case: str) -> dict:
    """One gate check as a JSON-ready dict (also reports cosine and top-1 where they apply)."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(actual, np.float64)
    check = {"graph": graph, "case": case, "output": gate.output, "metric": gate.metric, "limit": gate.limit}
    if ref.shape != got.shape:
        return {**check, "value": float("inf"), "passed": False, "note": f"shape {got.shape} != {ref.shape}"}
    if gate.metric == "exact":
        value = float(np.count_nonzero(ref != got))
        passed = value == 0
    elif gate.metric == "max_abs_diff":
        value = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        passed = bool(value <= gate.limit)
    else:  # cosine: the worst row
        # A zero row in both (e.g. masked logits) is no disagreement: it scores 1, not 0.
        cos = cosine_rows(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]), zero_row=1.0)
        value = float(cos.min()) if cos.size else 1.0
        passed = bool(value >= gate.limit)
    if np.isnan(got).any():
        passed, check["note"] = False, "NaN in the engine output"
    if ref.ndim == 3 and gate.output == "logits":
        check["top1_agreement"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    return {**check, "value": value, "passed": passed}


def gate_inputs(manifest: Manifest, plan: BuildPlan, seed: int = 0) -> dict:
    """Fixed inputs within every profile: pixels, a prompt with the image placeholder, decoder embeds."""
    rng = np.random.default_rng(seed)
    dims, text = manifest.dims, manifest.text
    opts = plan.options
    batch = min(2, opts.max_batch)
    family = family_of(manifest)
    pixels = family.example_pixels(batch, rng)
    ordinary = np.array([i for i in range(min(dims.vocab_size, 4096)) if i not in text.special_ids], np.int64)
    emb = plan.engines["embedding"]
    max_text = emb.profiles[0].dims["text_len"][2] if emb.backend == "tensorrt" else opts.max_input_len
    text_len = max(2, min(12, max_text))
    ids = rng.choice(ordinary, size=(batch, text_len))
    ids[:, min(2, text_len - 1)] = text.image_token_id
    mask = np.ones_like(ids)
    if batch > 1:  # a left-padded row
        ids[1, :1], mask[1, :1] = text.pad_or_zero, 0
        ids[1, 1] = ids[0, 0]
    seq = max(1, min(16, opts.max_input_len))
    table = manifest.embed_table_memmap()
    embeds = np.asarray(table[rng.choice(ordinary, size=(batch, seq))], np.float32)
    dmask = np.ones((batch, seq), np.int64)
    if batch > 1:
        dmask[1, :2] = 0
    step = np.asarray(table[rng.choice(ordinary, size=(batch, 1))], np.float32)
    return {"pixel_values": pixels, "input_ids": ids, "text_attention_mask": mask, "inputs_embeds": embeds,
            "attention_mask": dmask, "position_ids": family.text_position_ids(dmask), "step_embeds": step,
            "threshold": manifest.anchor.threshold}


def run_gates(manifest: Manifest, plan: BuildPlan, engine_dir: Path, trt=None, cuda=None) -> dict:
    """Every TensorRT engine against onnxruntime CPU on the same ONNX files, both through the decode loop."""
    x = gate_inputs(manifest, plan)
    family = family_of(manifest)
    files = {graph: spec.onnx for graph, spec in plan.engines.items()}
    reference = OrtBackend(manifest, files=files)
    backend = TrtBackend(manifest, engine_dir, full_logits=True, trt=trt, cuda=cuda)
    checks = []
    try:
        spec = plan.engines["vision"]
        vision_feeds = family.vision_feeds(x["pixel_values"], len(x["pixel_values"]))
        ref_feats = reference.vision(vision_feeds)
        got_feats = backend.vision(vision_feeds)
        checks += [compare(ref_feats, got_feats, g, "vision", f"batch {len(ref_feats)}") for g in spec.gates]

        spec = plan.engines["embedding"]
        if spec.backend == "tensorrt":
            batch = PreparedBatch(x["input_ids"], x["text_attention_mask"], [])
            feeds = family.embedding_feeds(batch, ref_feats, x["threshold"], vision_feeds)
            ref, got = reference.embed(feeds), backend.embed(feeds)
            checks += [compare(ref[g.output], got[g.output], g, "embedding", "anchors") for g in spec.gates]

        spec = plan.engines["decoder"]
        step = family.first_step(x["attention_mask"], x["position_ids"])
        ref_calls, got_calls = (list(decoder_calls(b, step, x["inputs_embeds"],
                                                   lambda call: x["step_embeds"] if call.index == 0 else None))
                                for b in (reference, backend))
        valid = x["attention_mask"] == 1  # padding positions' logits are undefined (fully masked rows)
        ref_prefill, got_prefill = ref_calls[0].logits, got_calls[0].logits
        checks += [compare(ref_prefill[valid][None], got_prefill[valid][None], g, "decoder", "prefill")
                   for g in spec.gates]
        checks += [compare(ref_calls[1].logits, got_calls[1].logits, g, "decoder", "decode step") for g in spec.gates]
    finally:
        backend.close()
        reference.close()
    return {"passed": all(c["passed"] for c in checks), "checks": checks}
