"""llama.cpp's systems: GGUF files converted from the checkpoint (F32, F16) or quantized from the F32 file
(llama-f32, their source), each step a task in the peers venv (gguf_tasks.py)."""

from __future__ import annotations

from pathlib import Path

from .systems import LLAMA_CPP_VERSION, System
from .venvs import llama_tree, peer_task

GGUF_QUANT = {"q4_0": 2, "q4_k_m": 15, "q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_0, _Q4_K_M, _Q8_0


def build_llama(system: System, out: Path, cache: Path, ckpt: Path, source_build: dict | None) -> dict:
    log = cache / "logs" / f"build-{system.name}.log"
    log.unlink(missing_ok=True)
    path = out / f"model-{system.variant}.gguf"
    if system.variant in ("f32", "f16"):
        peer_task(cache, "gguf-convert", {"checkpoint": str(ckpt), "out": str(path), "outtype": system.variant,
                                          "llama_tree": str(llama_tree(cache))},
                  log, f"llama.cpp: converting to {system.variant.upper()}")
        notes = {"converter": "convert_hf_to_gguf.py (vendor/llama.cpp of llama-cpp-python "
                 f"{LLAMA_CPP_VERSION}), pre-tokenizer 'default'", "outtype": system.variant}
    else:
        src = Path(source_build["model"])
        peer_task(cache, "gguf-quantize", {"src": str(src), "dst": str(path), "ftype": GGUF_QUANT[system.variant]},
                  log, f"llama.cpp: quantizing to {system.variant.upper()}")
        notes = {"quantizer": "llama_cpp.llama_model_quantize", "from": src.name}
    tensors = peer_task(cache, "gguf-bytes", {"path": str(path), "llama_tree": str(llama_tree(cache))}, log,
                        "llama.cpp: reading the GGUF tensors")
    notes["tensor_types"] = tensors["types"]
    return {"model": str(path), "weight_bytes_per_token": tensors["weight_bytes"], "notes": notes}
