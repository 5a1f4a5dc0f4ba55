"""llama.cpp's GGUF files, made by tasks the peers venv runs (same one-JSON-line protocol as the runners).

Workaround (llama.cpp converter): the checkpoint's tokenizer is the project's tiny byte-level BPE, whose
pre-tokenizer hash convert_hf_to_gguf.py does not know ("BPE pre-tokenizer was not recognized"). The
benchmark feeds token ids only and never tokenizes text, so task_gguf_convert runs the converter in-process
with its TextModel.get_vocab_base_pre replaced by one that answers "default" (llama.cpp's generic
pre-tokenizer); the vocabulary, token types and all weights are converted as usual.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def task_gguf_convert(spec: dict) -> dict:
    """convert_hf_to_gguf.py in-process, its pre-tokenizer check answered with "default" (see the module docstring)."""
    sys.path.insert(0, spec["llama_tree"])
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    sys.argv = ["convert_hf_to_gguf.py", spec["checkpoint"], "--outfile", spec["out"], "--outtype", spec["outtype"]]
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the converter's prints go to the log, the result line alone to stdout
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.stdout = stdout
    return {"path": spec["out"]}


def task_gguf_quantize(spec: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec["ftype"]
    params.nthread = os.cpu_count() or 2
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"path": spec["dst"]}


def task_gguf_bytes(spec: dict) -> dict:
    sys.path.insert(0, str(Path(spec["llama_tree"]) / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(spec["path"])
    types: dict[str, int] = {}
    total = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name != "token_embd.weight":
            total += int(t.n_bytes)
    return {"weight_bytes": total, "types": types,
            "token_embd": next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"), None),
            "output": next((t.tensor_type.name for t in reader.tensors if t.name == "output.weight"), None)}
