"""Decode step time of several decoder files, stepped in turn in one process: ratios that bandwidth swings
between runs cannot fake.

    python scripts/ab_decoders.py DECODER.onnx DECODER.onnx ... [--prompt-len 512] [--steps 100] [--threads 2]

Each file is prefilled with the same `--prompt-len` random embeddings, then every round runs one cached
decode step of each file, the order rotated by one each round; printed per file: median ms per step,
tok/s, and the median over rounds of its speed relative to the first file in the same round. How a file
carries its KV cache comes from the manifest.json beside it (an artifact) or the build.json beside it
(scripts/bench_peers.py's folders): KV_APPEND files are decoded as the runtime decodes them
(ort_backend.KVBuffer), the others feed each step's present back as the next past. The sessions share one
onnxruntime thread pool of `--threads` (per-session pools would spin against each other). Random inputs:
speed only. Not in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from attanchor_runtime.decoder_feeds import Step, empty_past, past_names, prefill_feeds, present_names
from attanchor_runtime.manifest import KV_APPEND, KV_CONCAT, Manifest
from attanchor_runtime.ort_backend import KVBuffer, decode_append


def describe(path: Path) -> tuple[dict, str]:
    """(dims, kv_cache) of a decoder file, from the manifest or bench_peers build.json beside it."""
    if (path.parent / "manifest.json").is_file():
        manifest = Manifest.load(path.parent)
        return manifest.dims, manifest.precision.kv_cache(path.name)
    build = json.loads((path.parent / "build.json").read_text())
    return build["dims"], build.get("notes", {}).get("kv_cache", KV_CONCAT)


class Decoder:
    def __init__(self, path: Path, prompt_len: int):
        self.dims, self.kv_cache = describe(path)
        options = ort.SessionOptions()
        options.use_per_session_threads, options.log_severity_level = False, 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        layers = self.dims["num_layers"]
        self.past, self.present = past_names(layers), present_names(layers)
        rng = np.random.default_rng(0)
        embeds = rng.standard_normal((1, prompt_len, self.dims["hidden_size"]), dtype=np.float32) * 0.02
        mask, positions = np.ones((1, prompt_len), np.int64), np.arange(prompt_len, dtype=np.int64)[None]
        if self.kv_cache == KV_APPEND:
            self.cache = KVBuffer(1, self.dims, np.float32, int(self.dims["max_position_embeddings"]))
        else:
            self.cache = list(empty_past(self.dims, 1).values())
        self.call(embeds, mask, positions)
        self.step = Step.after_prefill(mask, positions)
        self.token = np.full((1, 1, self.dims["hidden_size"]), 0.01, np.float32)

    def call(self, embeds, mask, positions) -> None:
        if self.kv_cache == KV_APPEND:
            decode_append(self.session, self.past, self.present, embeds, mask, positions, self.cache)
        else:
            feeds = prefill_feeds(embeds, mask, positions, dict(zip(self.past, self.cache)))
            self.cache = self.session.run(["logits", *self.present], feeds)[1:]

    def decode_step(self) -> float:
        self.step = self.step.advance()
        start = time.perf_counter()
        self.call(self.token, self.step.attention_mask, self.step.position_ids)
        return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoders", nargs="+", type=Path)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(args.threads, 1)
    decoders = [Decoder(path, args.prompt_len) for path in args.decoders]
    times: list[list[float]] = [[] for _ in decoders]
    for r in range(args.steps):
        k = r % len(decoders)
        for i in list(range(len(decoders)))[k:] + list(range(len(decoders)))[:k]:
            times[i].append(decoders[i].decode_step())
    print(f"prompt {args.prompt_len}, {args.steps} steps each, {args.threads} threads, order rotated every round")
    print("| decoder | KV cache | ms per step (median) | tok/s | speed vs the first (same rounds) |\n|---|---|---|---|---|")
    for path, decoder, t in zip(args.decoders, decoders, times):
        ratio = statistics.median(a / b for a, b in zip(times[0], t))
        median = statistics.median(t)
        print(f"| {path} | {decoder.kv_cache} | {median * 1e3:.2f} | {1 / median:.1f} | {ratio:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
