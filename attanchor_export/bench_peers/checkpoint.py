"""Step 1: the one random-weight checkpoint every system is built from, cached by dims and seed."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from .common import SCRIPT, say

SMALL_TEXT = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2}

def text_config(dims: str):
    from attanchor_export.load.tiny_random import tinyllava_1b_config

    config = tinyllava_1b_config().text_config
    if dims == "small":
        for key, value in SMALL_TEXT.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    config.architectures = ["LlamaForCausalLM"]
    return config


def checkpoint(cache: Path, dims: str, seed: int) -> Path:
    """CACHE/checkpoints/<dims>-seed<seed>: config, model.safetensors (fp32), tokenizer; built once."""
    folder = cache / "checkpoints" / f"{dims}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(SCRIPT.parent))
    from make_random_checkpoint import build_tokenizer

    t0 = time.perf_counter()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(text_config(dims)).eval()
    model.save_pretrained(staging, safe_serialization=True)
    build_tokenizer().save_pretrained(staging)
    del model
    staging.rename(folder)
    say(f"checkpoint {folder} in {time.perf_counter() - t0:.0f} s")
    return folder
