"""The systems compared, the peers' pinned versions, and each builder family's recipe version."""

from __future__ import annotations

from dataclasses import dataclass

BASELINE = "project-int4"
REFERENCE = "transformers-fp32"  # the greedy tokens the fp32 systems are compared with

# The peers' versions, pinned so a cached venv and a fresh one measure the same code.
GENAI_VERSION = "0.18.0"
LLAMA_CPP_VERSION = "0.3.36"
PEER_TRANSFORMERS = "5.24.0"  # the genai 0.18 builder imports transformers 5 classes
PEER_PACKAGES = [f"onnxruntime-genai=={GENAI_VERSION}", f"transformers=={PEER_TRANSFORMERS}", "onnx", "onnx-ir",
                 "safetensors", "sentencepiece", "protobuf>=4.21,<5", "matplotlib"]


@dataclass(frozen=True)
class System:
    name: str
    label: str
    family: str  # project | genai | llama | transformers: which builder and runner
    variant: str
    fp32: bool = False
    source: str | None = None  # the system whose files this one is made from (built first)


SYSTEMS = [
    System("project-fp32", "this project fp32", "project", "fp32", fp32=True),
    System("project-int4", "this project int4 (the default: block 128, lm_head int4, fused, KV read in place)", "project",
           "int4", source="project-fp32"),
    System("project-int4-keep-lm-head", "this project int4, lm_head fp32 (--keep-lm-head), fused", "project",
           "int4-keep-lm-head", source="project-fp32"),
    System("project-int4-unfused", "this project int4, standard ops (no onnxruntime fusions)", "project",
           "int4-unfused", source="project-fp32"),
    System("project-int8", "this project int8 (MatMulNBits block 128, lm_head fp32, fused)", "project", "int8",
           source="project-fp32"),
    System("project-int4-b256", "this project int4, blocks of 256 (--block-size 256: faster, less accurate)",
           "project", "int4-b256", source="project-fp32"),
    System("project-int4-prefill-int8", "this project int4 with its int8 prompt graph (--prefill-int8)", "project",
           "int4-prefill-int8", source="project-fp32"),
    System("genai-fp32", "onnxruntime-genai builder fp32", "genai", "fp32", fp32=True),
    System("genai-int4", "onnxruntime-genai int4 (block 32)", "genai", "int4"),
    System("llama-f32", "llama.cpp F32", "llama", "f32", fp32=True),
    System("llama-f16", "llama.cpp F16", "llama", "f16"),
    System("llama-q4_0", "llama.cpp Q4_0", "llama", "q4_0", source="llama-f32"),
    System("llama-q4_k_m", "llama.cpp Q4_K_M", "llama", "q4_k_m", source="llama-f32"),
    System("llama-q8_0", "llama.cpp Q8_0", "llama", "q8_0", source="llama-f32"),
    System("transformers-fp32", "transformers eager (sdpa) fp32", "transformers", "fp32", fp32=True),
]
BY_NAME = {s.name: s for s in SYSTEMS}
BANDWIDTH = "bandwidth"  # the probe child, one per round like a system
# Per family, bumped when its recipe changes: cached folders of another version are rebuilt.
BUILD_VERSION = {"project": 7, "genai": 2, "llama": 2, "transformers": 2}
