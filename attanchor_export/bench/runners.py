"""One measured generate, timed by phase: through the torch-free runtime, or through transformers eager.

Both generate exactly `max_new_tokens` greedy tokens (EOS ignored) for one prompt row and return
the same figures: ttft_s, vision_s, embedding_s, prefill_s, decode_s, decode_tokens_per_s, tokens...
"""

from __future__ import annotations

import time

import numpy as np
from attanchor_runtime.decoder_feeds import empty_past, greedy, prefill_feeds
from attanchor_runtime.ort_backend import BackendRun

clock = time.perf_counter


class _TimedRun:
    """A decoder_feeds `run(output_names, feeds)`, recording (start, seconds) of each call."""

    def __init__(self, run):
        self.run, self.calls = run, []

    def __call__(self, output_names, feeds):
        t0 = clock()
        try:
            return self.run(output_names, feeds)
        finally:
            self.calls.append((t0, clock() - t0))


def runtime_once(pipe, ids: np.ndarray, pixels, max_new_tokens: int, threshold: float) -> dict:
    """The runtime's graphs on one prompt row: Pipeline.front_end (vision, embedding, anchors), then
    the decoder as the backend drives it (ort_backend.BackendRun: its own KV cache, in place where the
    decoder allows), fed as attanchor_runtime.decoder_feeds defines it (prefill from an empty past, one
    cached step per token). Every decoder call is timed, so the Python overhead of a step is the time
    between two tokens minus the time inside the call."""
    dims = pipe.manifest.dims
    run = _TimedRun(BackendRun(pipe.backend, 1))  # the bench opens the onnxruntime backend

    def embed(tokens):
        return np.asarray(pipe.embed_table[tokens], np.float32)  # as Pipeline's decode steps do

    t0 = clock()
    front = pipe.front_end([ids], pixels, threshold)
    prefill = prefill_feeds(front.inputs_embeds, front.attention_mask, front.position_ids, empty_past(dims, 1))
    result = greedy(run, dims["num_layers"], prefill, embed, max_new_tokens)
    # Each call's token is its logits' arg-max, taken right after the call returns.
    token_times = np.array([start + seconds for start, seconds in run.calls])
    ttft = token_times[0] - t0
    steps = len(token_times) - 1
    loop = float(token_times[-1] - token_times[0])
    inside = sum(seconds for _, seconds in run.calls[1:])  # call 0 is the prefill
    timings = front.timings
    return {
        "ttft_s": float(ttft),
        "vision_s": timings["vision"],
        "embedding_s": timings["embedding"],
        "prefill_s": run.calls[0][1],
        "other_s": max(0.0, float(ttft) - timings["vision"] - timings["embedding"] - run.calls[0][1]),
        "decode_steps": steps,
        "decode_s": loop,
        "decode_tokens_per_s": steps / loop if loop > 0 else None,
        "python_overhead_s": max(0.0, loop - inside) if steps else None,
        "python_overhead_share": max(0.0, 1.0 - inside / loop) if loop > 0 else None,
        "anchors": sum(len(a) for a in front.anchors),
        "sequence_length": int(front.inputs_embeds.shape[1]),  # prefill positions incl. anchors
        "tokens": result.tokens[0].tolist(),
    }


class TorchRunner:
    """transformers eager on the manifest's source checkpoint, run by the PyTorch reference
    (attanchor_export.checks.torch_reference: anchored inputs, greedy decoding)."""

    def __init__(self, manifest, threads):
        import torch

        from attanchor_export.checks.recheck import load_source

        self.torch = torch
        self._threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        t0 = clock()
        # The same source (and LoRA merge, for --adapter artifacts) that `check` compares with.
        self.loaded = load_source(manifest)
        self.load_s = clock() - t0
        self.name = str(self.loaded.source)
        anchor = manifest.anchor
        self.mode, self.max_anchors = anchor["mode"], anchor.get("max_anchors")
        self.excluded_token_ids = tuple(anchor.get("excluded_token_ids") or ())
        self.attn_implementation = getattr(self.loaded.model.config, "_attn_implementation", None)

    def restore_threads(self):
        self.torch.set_num_threads(self._threads)

    def once(self, ids: np.ndarray, pixels, max_new_tokens: int, threshold: float) -> dict:
        from attanchor_export.checks.torch_reference import anchored_inputs, greedy_generate, image_features

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
