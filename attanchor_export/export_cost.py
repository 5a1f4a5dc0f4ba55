"""What an export cost: wall time, peak resident memory and the weight bytes it handled.

Recorded in the manifest's "export" section and printed in the CLI summary, so a user can see what
exporting a model of a given size needs before trying a bigger one. Peak RSS is the process's
high-water mark (getrusage), which includes the interpreter, torch and onnxruntime themselves.
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from attanchor_runtime.manifest import ExportRecord, Manifest
from attanchor_runtime.prompt_cost import available_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def checkpoint_weight_bytes(folder: Path) -> int:
    """Bytes of weight files in a checkpoint folder, as stored (fp16 shards count as they are on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def release_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and peak RSS is what users pay)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


# onnxruntime's CPU session of an fp32 graph holds its weights and MLAS's packed copy of each MatMul
# weight: measured at TinyLLaVA-1B dims as about 1.7x the decoder's bytes; 2x leaves a margin.
FP32_SESSION_FACTOR = 2.0


# onnxruntime's CPU provider has no fp16 MatMul: loading an fp16 graph makes an fp32 copy of every fp16
# weight beside it (constant folding off or not; measured 2.4x the fp16 bytes on a chain of fp16
# MatMuls, onnxruntime 1.32). 3x leaves a margin. 7B: 13 GB of fp16 weights -> ~40 GB to gate on a CPU.
FP16_CPU_SESSION_FACTOR = 3.0
# attanchor_runtime.sessions.FedWeightsSession feeds the fp16 weights from the mapped file and widens one
# at a time: the fp16 bytes plus one widened weight, activations and one gate row's KV cache.
FP16_FED_SESSION_FACTOR = 1.25


# int8's TensorRT form is calibrated on the whole fp32 decoder in one onnxruntime session
# (calibration.channel_absmax: 1.39x the decoder's bytes at TinyLLaVA-1B dims, prepacking off), after
# SmoothQuant has made every smoothed weight in memory (1x, freed before). Neither streams layers.
INT8_CALIBRATION_FACTOR = 1.5


def int8_calibration_problem(fp32_decoder_bytes: int, budget: int) -> str | None:
    """Why `--quant int8` cannot be exported within `budget` (one line), or None."""
    need = int(INT8_CALIBRATION_FACTOR * fp32_decoder_bytes)
    if need <= budget:
        return None
    return (f"--quant int8's TensorRT form is calibrated on the whole fp32 decoder in memory: about {size(need)} "
            f"for this model, over the {size(budget)} budget; use --quant int4 (written streamed at any size), "
            "or export on a machine with that much memory")


def memory_budget_bytes(gib: float | None) -> int:
    """`gib` GiB, or (None) the memory available now (MemAvailable), which is what this export can use."""
    return int(gib * (1 << 30)) if gib is not None else available_bytes()


def fp32_session_bytes(graph: Path) -> int:
    return int(FP32_SESSION_FACTOR * graph_bytes(graph))


def graph_bytes(graph: Path) -> int:
    """The graph file plus its external data file."""
    data = graph.with_name(graph.name + ".data")
    return graph.stat().st_size + (data.stat().st_size if data.exists() else 0)


# Disk an export writes at its peak, as a fraction of the fp32 graph bytes it reduces: the fp32 graphs
# stay on disk while each reduced-precision file is written from them (memory-mapped), and are removed
# only at the end. Int4 forms measured at 7B dims: 0.14 of the fp32 decoder each; margins on top.
REDUCED_FORM_FRACTION = {"fp16": 0.5, "int4": 0.2, "int8": 0.3}


def fp32_graph_bytes(loaded) -> dict:
    """The bytes of each fp32 graph the export will write, from the parameter counts (meta or real)."""
    family, model = loaded.family, loaded.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    embed = count(family.embed_tokens(model))
    head = family.lm_head(model).weight.numel()
    decoder = count(family.language_model(model)) - embed + head  # the lm_head is its own initializer
    return {"vision": 4 * count(family.vision_module(model)), "decoder": 4 * decoder, "embed_table": 4 * embed}


def disk_needed_bytes(fp32_bytes: dict, dtype: str, quant: str, forms: int, vision_reduced: bool,
                      prefill_int8: bool = False) -> int:
    """Peak disk of an export: every fp32 graph (`fp32_bytes`, fp32_graph_bytes), plus the reduced files
    written beside them (and --prefill-int8's prompt graph: one byte per decoder weight)."""
    decoder, vision = fp32_bytes["decoder"], fp32_bytes["vision"]
    reduced = decoder + (vision if vision_reduced else 0)
    extra = 0.0
    if dtype == "fp16":
        extra += REDUCED_FORM_FRACTION["fp16"] * (decoder + vision)
    if quant != "none":
        extra += forms * REDUCED_FORM_FRACTION[quant] * reduced
    if prefill_int8:
        extra += 0.25 * decoder
    return int(1.05 * (sum(fp32_bytes.values()) + extra))


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the filesystem `folder` will be written to (its nearest existing ancestor)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


@dataclass(frozen=True)
class MemoryPlan:
    """What fits in the memory budget, decided once: the export and `check` both ask it.

    Where onnxruntime cannot open the fp32 decoder within the budget (7B: 27 GB of fp32 weights), its
    parity run is skipped and the reduced-precision decoder is gated against the PyTorch source model
    (layer-streamed, fp32). An fp16 decoder is gated on a CPU session, which widens every weight at load
    (3x the fp16 bytes): over the budget its weights are fed from disk instead (FedWeightsSession, 1.25x),
    and where even that does not fit the gate is not run here."""

    budget_bytes: int
    fp32_decoder_session_bytes: int | None = None  # None: no fp32 decoder graph in question (check)
    fp16_decoder_cpu_session_bytes: int | None = None  # None: the decoder's weights are not fp16
    fp16_decoder_fed_session_bytes: int | None = None

    @classmethod
    def for_export(cls, fp32_decoder: Path, dtype: str, quant: str, budget_gib: float | None = None) -> MemoryPlan:
        """For an export whose fp32 decoder graph is `fp32_decoder`, rewritten to dtype/quant."""
        fp16 = graph_bytes(fp32_decoder) // 2 if (dtype, quant) == ("fp16", "none") else None
        return cls.of(memory_budget_bytes(budget_gib), fp32_session_bytes(fp32_decoder), fp16)

    @classmethod
    def for_check(cls, manifest: Manifest, budget_gib: float | None = None) -> MemoryPlan:
        """For re-gating an artifact: its onnxruntime decoder file, fp16 or not."""
        precision = manifest.precision
        fp16 = graph_bytes(manifest.path(manifest.graph_file("decoder", "ort"))) \
            if (precision.dtype, precision.quant) == ("fp16", "none") else None
        return cls.of(memory_budget_bytes(budget_gib), None, fp16)

    @classmethod
    def of(cls, budget: int, fp32_session: int | None, fp16_bytes: int | None) -> MemoryPlan:
        if fp16_bytes is None:
            return cls(budget, fp32_session)
        return cls(budget, fp32_session, int(FP16_CPU_SESSION_FACTOR * fp16_bytes),
                   int(FP16_FED_SESSION_FACTOR * fp16_bytes))

    @property
    def fp32_decoder_fits(self) -> bool:
        return self.fp32_decoder_session_bytes is None or self.fp32_decoder_session_bytes <= self.budget_bytes

    @property
    def fp16_gate_fits(self) -> bool | None:
        """Whether the fp16 decoder's gate fits at all (weights fed from disk if need be); None: not fp16."""
        if self.fp16_decoder_fed_session_bytes is None:
            return None
        return self.fp16_decoder_fed_session_bytes <= self.budget_bytes

    @property
    def fp16_weights_fed(self) -> bool:
        """The fp16 decoder's ordinary CPU session is over the budget: feed its weights from disk."""
        whole = self.fp16_decoder_cpu_session_bytes
        return whole is not None and whole > self.budget_bytes

    @property
    def low_memory_gate(self) -> bool:
        """The gate's decoder sessions run without an arena, one row at a time, fp16 weights fed from disk."""
        return not self.fp32_decoder_fits or self.fp16_weights_fed

    @property
    def pytorch_gate_baseline(self) -> bool:
        """The gate's baseline comes from the PyTorch source model (the fp32 decoder graph does not fit)."""
        return not self.fp32_decoder_fits and self.fp16_gate_fits is not False

    @property
    def gate_skipped(self) -> str | None:
        """Why the accuracy gate cannot run on this machine, or None."""
        if self.fp16_gate_fits is not False:
            return None
        return (f"onnxruntime's CPU session of the fp16 decoder needs about {size(self.fp16_decoder_fed_session_bytes)} "
                f"even with its weights fed from disk, over the {size(self.budget_bytes)} budget: gate it "
                "on a machine with that much memory (attanchor-export check DIR)")

    def to_record(self) -> dict:
        """The manifest's export-section fields."""
        out = {"memory_budget_bytes": self.budget_bytes}
        if self.fp32_decoder_session_bytes is not None:
            out.update(fp32_decoder_session_bytes=self.fp32_decoder_session_bytes,
                       fp32_decoder_fits=self.fp32_decoder_fits)
        if self.fp16_decoder_cpu_session_bytes is not None:
            out.update(fp16_decoder_cpu_session_bytes=self.fp16_decoder_cpu_session_bytes,
                       fp16_decoder_fed_session_bytes=self.fp16_decoder_fed_session_bytes,
                       fp16_gate_fits=self.fp16_gate_fits,
                       fp16_gate_weights_fed=self.fp16_weights_fed and bool(self.fp16_gate_fits))
        return out


class ExportCost:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.checkpoint: dict = {}
        self.memory: MemoryPlan | None = None
        self.disk: dict = {}

    def record_checkpoint(self, loaded) -> None:
        params = sum(p.numel() for p in loaded.model.parameters())
        self.checkpoint = {"parameters": params, "fp32_weight_bytes": 4 * params,
                           "checkpoint_weight_bytes": checkpoint_weight_bytes(loaded.folder),
                           "loading": loaded.streaming}
        if loaded.streamed is not None:  # what stayed in the shards instead of in memory
            self.checkpoint["streamed_weight_bytes"] = loaded.streamed.streamed_bytes

    def record(self, artifact: Path) -> ExportRecord:
        out = {
            "seconds": round(time.perf_counter() - self.started, 1),
            "peak_rss_bytes": peak_rss_bytes(),
            "artifact_bytes": sum(p.stat().st_size for p in Path(artifact).rglob("*") if p.is_file()),
            **self.checkpoint,
            **(self.memory.to_record() if self.memory is not None else {}),
            **self.disk,
        }
        if self.checkpoint:
            out["peak_rss_over_fp32_weights"] = round(out["peak_rss_bytes"] / max(1, out["fp32_weight_bytes"]), 2)
        return ExportRecord(**out)


def size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / (1 << 10):.1f} KiB"


def describe(cost: ExportRecord) -> str:
    """One line for the CLI summary."""
    text = f"{cost.seconds:.0f} s, peak RSS {size(cost.peak_rss_bytes)}"
    if cost.fp32_weight_bytes is not None:
        text += f" ({cost.peak_rss_over_fp32_weights:.2f}x the {size(cost.fp32_weight_bytes)} of fp32 weights)"
    if cost.loading == "streamed":
        text += f", {size(cost.streamed_weight_bytes)} of decoder weights streamed from the checkpoint"
    if cost.fp32_decoder_fits is False:
        text += " (fp32 decoder over the memory budget: judged against PyTorch)"
    if cost.fp16_gate_fits is False:
        text += " (fp16 decoder's CPU gate over the memory budget: not gated here)"
    elif cost.fp16_gate_weights_fed:
        text += " (fp16 decoder gated with its weights fed from disk)"
    return text + f", artifact {size(cost.artifact_bytes)}"
