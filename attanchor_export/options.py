"""What an export can be asked for, declared once: the options dataclass and the tables of choices.

Torch-free, so the CLI reads its defaults and choices from here at import time without loading the
exporter; the exporter and the precision stage check values against the same tables.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path

# t2i | i2t, which side picks anchors: the op's own list, here for the CLI and the exporter
from attanchor_graphs.specification import MODES  # noqa: F401

# IR 10 (onnx 1.16): loaded by onnxruntime >= 1.18, which is what JetPack 6 wheels ship, and by
# TensorRT 10's parser. The installed onnx would write a newer IR that older runtimes refuse.
ARTIFACT_IR_VERSION = 10
DEFAULT_THRESHOLD = 0.12  # the paper's TinyLLaVA / LLaVA-1.5 setting; "auto" calibrates per model
DEFAULT_OPSET = 18  # TensorRT 10.3 (JetPack 6) parses opsets 9-20; int4 QDQ needs 21 (precision stage)
OPSETS = (17, 21)  # the range the exporter accepts
DTYPES = ("fp32", "fp16")
QUANTS = ("none", "int8", "int4")
# --vision-quant: the vision tower's own precision, whatever --quant gives the decoder. int8 = weights and
# activations int8 (precision.quantize: dynamic for onnxruntime, calibrated QDQ for TensorRT).
VISION_QUANTS = ("none", "int8")
BLOCK_SIZES = (32, 64, 128, 256)
# bench --torch-dtype: what transformers eager runs in beside the runtime (torch dtype names)
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# int8 TensorRT form: SmoothQuant's alpha (precision.smoothing; docs/QUANTIZATION.md has the measurements)
DEFAULT_SMOOTH_ALPHA = 0.7


@dataclass
class ExportOptions:
    output: Path
    mode: str = "t2i"
    threshold: float | str | None = None  # a number, "auto" (trace/threshold.py), None = the checkpoint's or 0.12
    task: str | None = None  # easy-vqa | FILE.jsonl: task accuracy in the quantization gate
    max_anchors: int | None = None
    image_size: str | None = None  # "HxW": families whose vision graph takes a chosen grid (Qwen2.5-VL)
    opset: int = DEFAULT_OPSET
    # [B, 1, vocab] at prefill skips the lm_head on the other rows (81 GFLOP at 620 tokens x vocab 32064)
    # and an 80 MB logits copy; off by default so teacher-forced gates and checks see every position.
    last_logits_only: bool = False
    # Grouped attention without repeated KV (standard ops, TensorRT-safe).
    optimize: bool = True
    force: bool = False
    validate: bool = True
    trust_remote_code: bool = False
    revision: str | None = None
    offline: bool = False  # Hub ids from the local cache only (as HF_HUB_OFFLINE=1)
    allow_pickle: bool = False  # download pickled weights (*.bin) when a repo has no safetensors
    atol: float = 1e-4
    dtype: str = "fp32"  # fp16: the precision stage converts the graphs after the fp32 ones are validated
    quant: str = "none"  # int8 | int4 (weight-only, blockwise)
    block_size: int = 128
    calib: str | None = None
    quantize_lm_head: bool | None = None  # None: the format's default (precision.quantize.lm_head_quantized)
    quantize_vision: bool = False  # the vision tower at --quant's weight-only format (vision_quant: its own)
    vision_quant: str = "none"  # int8: the vision tower's weights and activations int8, whatever --quant is
    # int4: decoder linears (weight-name substrings, e.g. "q_proj") kept at 8 bits; None: the checkpoint's
    # declared default (attanchor_config.json "int4_8bit"), else none (precision.quantize)
    int4_8bit: tuple[str, ...] | None = None
    smooth_alpha: float | None = DEFAULT_SMOOTH_ALPHA  # int8 TensorRT form; None = no smoothing
    # int4/int8: fuse the onnxruntime-only decoder form (RMSNorm, residual Add, rotary; precision.ort_fusions)
    ort_fusions: bool = True
    gate_floors: dict | None = None  # overrides of the gate's floors for this format
    adapter: str | None = None  # peft LoRA folder or Hub id, merged before tracing (load/lora.py)
    # int4/int8: also write decoder.prefill.onnx, the onnxruntime graph prompts run through (int8 weights
    # and per-token int8 activations on the CPU's 8-bit matrix/dot-product units; precision.prefill_int8)
    prefill_int8: bool = False
    # GiB the export may use; None = the memory available when it starts. Decides whether onnxruntime may
    # open the fp32 decoder (parity, gate reference) or PyTorch, layer-streamed, stands in for it.
    memory_budget: float | None = None


def prefill_int8_problem(dtype: str, quant: str, prefill_int8: bool) -> str | None:
    """Why --prefill-int8 cannot be exported with these options (one line), or None."""
    if not prefill_int8:
        return None
    if quant not in ("int4", "int8"):
        return "--prefill-int8 rewrites the int4/int8 onnxruntime decoder: add --quant int4 (or int8)"
    if dtype != "fp32":
        return "--prefill-int8 needs fp32 activations: leave out --dtype fp16"
    return None


def vision_quant_problem(dtype: str, vision_quant: str, quantize_vision: bool) -> str | None:
    """Why this --vision-quant cannot be exported (one line), or None. Asked by the CLI (a usage error before
    any work), the exporter and the precision stage, so all three refuse the same things the same way."""
    if vision_quant not in VISION_QUANTS:
        hint = " (a weight-only int4 vision tower is --quant int4 --quantize-vision)" if vision_quant == "int4" else ""
        return f"unknown --vision-quant {vision_quant!r}: choose one of {', '.join(VISION_QUANTS)}{hint}"
    if vision_quant != "none" and quantize_vision:
        return (f"--quantize-vision (the vision tower at --quant's weight-only format) and --vision-quant "
                f"{vision_quant} (its own precision) both set the vision tower: give one")
    if vision_quant != "none" and dtype == "fp16":
        return (f"--dtype fp16 with --vision-quant {vision_quant} is not supported: the int8 vision forms are "
                "made from the fp32 graph (drop --dtype fp16, or --vision-quant)")
    return None


def default(cls, name: str):
    """The declared default of dataclass field `name` (what a CLI option shows and uses)."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def no_steps(name: str):
    """The default `steps` of every long job: announce nothing (the CLI passes its progress reporter)."""
    return contextlib.nullcontext()
