"""What one generate call may cost in memory, estimated from the manifest's dims before anything runs.

A long prompt is cheap to tokenize and expensive to prefill: onnxruntime's CPU attention holds
[batch, heads, L, L] score tensors (several at once: scores, masked, softmax), the decoder may return
logits for every position ([batch, L, vocab]), and the KV cache grows with every position, so the
cost grows with the square of the prompt. The estimate (bytes, fp32) is

    KV cache      2 (key, value) x layers x batch x kv_heads x head_dim x total positions x 4 x 2
                  (the past and the step's present exist together)
    attention     batch x heads x L^2 x 4 x SCORE_COPIES        (one layer at a time)
    logits        batch x (L or 1) x vocab x 4                   (1: a --last-logits-only decoder)
    activations   batch x L x hidden x 4 x ACTIVATION_WIDTHS

with L the prefill positions (prompt tokens - 1 + image tokens + anchors). Measured with
`python scripts/measure_prompt_memory.py DIR` on the tiny-vqa fp32 artifact (SmolLM2-135M, 30 layers,
decoder returning every position's logits, onnxruntime CPU, 2026-12-04): peak RSS growth 173 / 393 /
934 MiB at 563 / 1,063 / 2,063 positions, which the formula over-estimates by 1.26 / 1.23 / 1.31x.
`Pipeline.generate` refuses a call above its memory budget (Pipeline.load(memory_budget=GiB) or
generate(memory_budget=GiB); default: the memory available when the call starts plus what the process
already holds beyond the loaded weights, which onnxruntime reuses).
"""

from __future__ import annotations

import os
from pathlib import Path

from .manifest import Dims

SCORE_COPIES = 4  # attention scores, scores + mask, softmax and its output alive at once (3 measured)
ACTIVATION_WIDTHS = 16  # hidden-sized activations per position alive at once (MLP widths included)


def prompt_bytes(dims: Dims, batch: int, positions: int, new_tokens: int, all_logits: bool = True) -> int:
    """Estimated peak bytes of one generate call beyond the loaded weights (see the module docstring)."""
    total = positions + new_tokens
    kv = 2 * dims.num_layers * batch * dims.num_kv_heads * dims.head_dim * total * 4 * 2
    attention = batch * dims.num_heads * positions * positions * 4 * SCORE_COPIES
    logits = batch * (positions if all_logits else 1) * dims.vocab_size * 4
    activations = batch * positions * dims.hidden_size * 4 * ACTIVATION_WIDTHS
    return int(kv + attention + logits + activations)


def available_bytes() -> int:
    """MemAvailable (what this process can still use without pushing others out), else 80% of RAM."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
