"""One measured generate, timed by phase: through the torch-free runtime, or through transformers eager.

Both generate exactly `max_new_tokens` greedy tokens (EOS ignored) for one prompt row and return
the same figures: ttft_s, vision_s, embedding_s, prefill_s, decode_s, decode_tokens_per_s, tokens...
"""

from __future__ import annotations

import time

import numpy as np

from attanchor_export.options import TORCH_DTYPES

clock = time.perf_counter


def runtime_once(pipe, ids: np.ndarray, pixels, max_new_tokens: int, threshold: float) -> dict:
    """The loop users run on one prompt row: Pipeline.front_end (vision, embedding, anchors), then
    Pipeline.generate_steps (the runtime's decode loop on the backend's own KV cache), greedy, EOS
    ignored so every run makes `max_new_tokens` tokens. Each token is taken the moment the loop yields
    it, and the loop reports the seconds inside each decoder call, so the Python overhead of a step is
    the time between two tokens minus the time inside the call."""
    t0 = clock()
    front = pipe.front_end([ids], pixels, threshold)
    token_times, tokens = [], []
    for item in pipe.generate_steps(None, None, max_new_tokens, eos_token_id=[], front=front):
        if isinstance(item, np.ndarray):
            token_times.append(clock())
            tokens.append(int(item[0]))
        else:
            timings = item.timings
    ttft = token_times[0] - t0
    steps = len(token_times) - 1
    loop = float(token_times[-1] - token_times[0])
    inside = sum(timings["decode_steps"])
    return {
        "ttft_s": float(ttft),
        "vision_s": timings["vision"],
        "embedding_s": timings["embedding"],
        "prefill_s": timings["prefill"],
        "other_s": max(0.0, float(ttft) - timings["vision"] - timings["embedding"] - timings["prefill"]),
        "decode_steps": steps,
        "decode_s": loop,
        "decode_tokens_per_s": steps / loop if loop > 0 else None,
        "python_overhead_s": max(0.0, loop - inside) if steps else None,
        "python_overhead_share": max(0.0, 1.0 - inside / loop) if loop > 0 else None,
        "anchors": sum(len(a) for a in front.anchors),
        "sequence_length": int(front.inputs_embeds.shape[1]),  # prefill positions incl. anchors
        "tokens": tokens,
    }


class TorchRunner:
    """transformers eager on the manifest's source checkpoint, run by the source model
    (attanchor_export.source_model: anchored inputs, greedy decoding)."""

    def __init__(self, manifest, threads, dtype: str = "fp32"):
        import torch  # the PyTorch side is imported only with --compare-torch: bench runs without torch

        from attanchor_export.load.source import load_source

        self.torch = torch
        self._threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        t0 = clock()
        # The same source (and LoRA merge, for --adapter artifacts) that `check` compares with, in `dtype`
        # (TORCH_DTYPES: bf16 halves the 15 GB an fp32 Qwen2.5-VL-3B holds beside the runtime).
        self.dtype = dtype
        self.loaded = load_source(manifest, dtype=getattr(torch, TORCH_DTYPES[dtype]))
        self.load_s = clock() - t0
        self.name = str(self.loaded.source)
        anchor = manifest.anchor
        self.mode, self.max_anchors = anchor.mode, anchor.max_anchors
        self.excluded_token_ids = anchor.excluded_token_ids
        self.attn_implementation = getattr(self.loaded.model.config, "_attn_implementation", None)

    def restore_threads(self):
        self.torch.set_num_threads(self._threads)

    def once(self, ids: np.ndarray, pixels, max_new_tokens: int, threshold: float) -> dict:
        from attanchor_export.source_model import anchored_inputs, greedy_generate, image_features

        token_times = []
        t0 = clock()
        features = image_features(self.loaded, pixels)  # apart from anchored_inputs, to time it alone
        t1 = clock()
        embeds, mask, positions, _ = anchored_inputs(self.loaded, ids[None, :], None, pixels, threshold,
                                                     self.mode, self.max_anchors, features=features,
                                                     excluded_token_ids=self.excluded_token_ids)
        t2 = clock()
        tokens = greedy_generate(self.loaded, embeds, mask, positions, max_new_tokens,
                                 on_token=lambda _: token_times.append(clock()))
        steps = len(token_times) - 1
        decode = float(token_times[-1] - token_times[0])
        return {
            "ttft_s": token_times[0] - t0, "vision_s": t1 - t0, "embedding_s": t2 - t1,
            "prefill_s": token_times[0] - t2, "decode_steps": steps, "decode_s": decode,
            "decode_tokens_per_s": steps / decode if decode > 0 else None,
            "sequence_length": int(embeds.shape[1]), "tokens": tokens[0].tolist(),
        }
