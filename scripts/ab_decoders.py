"""Decode step time of several decoder files, stepped in turn in one process: ratios that bandwidth swings
between runs cannot fake.

    python scripts/ab_decoders.py DECODER.onnx[@LEVERS] ... [--prompt-len 512] [--steps 100] [--threads 2]

LEVERS: which of the runtime's decode-step levers the file is stepped with (default `all`: as the runtime
steps it): `none` (logits fetched by session.run, argmax in numpy), `bind` (IO binding: KV buffers bound
in place, outputs into arrays allocated once), `greedy` (the graph's next_token output fetched instead of
the logits, where the file has it), `all` (both). The same file may be listed twice with different levers,
or twice with the same: on a loaded machine the file listed first was stepped 10-16% slower than the
same file listed later (docs/PERFORMANCE.md), so list such a control beside any comparison.

Each file is prefilled with the same `--prompt-len` random embeddings, then every round runs one cached
decode step of each file, the order rotated by one each round; printed per file: median ms per step,
tok/s, and the median over rounds of its speed relative to the first file in the same round. How a file
carries its KV cache comes from the manifest.json beside it (an artifact) or the build.json beside it
(scripts/bench_peers.py's folders); every file is stepped by the runtime's own decode loop
(decode.decoder_calls over ort_backend.OrtDecoder: KV_APPEND files read one KVBuffer in place, the others
feed each step's present back as the next past). The sessions share one
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
from attanchor_runtime.decode import SequentialStep, decoder_calls
from attanchor_runtime.manifest import KV_CONCAT, Manifest
from attanchor_runtime.ort_backend import OrtDecoder


def describe(path: Path) -> tuple[int, str]:
    """(context length, kv_cache) of a decoder file, from the manifest or bench_peers build.json beside it."""
    if (path.parent / "manifest.json").is_file():
        manifest = Manifest.load(path.parent)
        return manifest.dims.max_position_embeddings, manifest.precision.kv_cache(path.name)
    build = json.loads((path.parent / "build.json").read_text())
    return build["dims"]["max_position_embeddings"], build.get("notes", {}).get("kv_cache", KV_CONCAT)


LEVERS = {"none": (False, False), "bind": (True, False), "greedy": (False, True), "all": (True, True)}


class Decoder:
    """One decoder file, prefilled, then stepped one cached call at a time by the runtime's loop."""

    def __init__(self, spec: str, prompt_len: int, options: ort.SessionOptions | None = None):
        """options: the session's own (its own thread pool); None shares the process's global pool."""
        path, _, levers = spec.partition("@")
        path = Path(path)
        if (levers or "all") not in LEVERS:
            raise SystemExit(f"error: {spec}: levers must be one of {', '.join(LEVERS)}")
        max_positions, self.kv_cache = describe(path)
        if options is None:
            options = ort.SessionOptions()
            options.use_per_session_threads, options.log_severity_level = False, 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        decoder = OrtDecoder.of_session(session, max_positions, self.kv_cache)
        binds, greedy = LEVERS[levers or "all"]
        decoder.binds = decoder.binds and binds
        decoder.greedy_in_graph = greedy = decoder.greedy_in_graph and greedy
        self.levers = "+".join(name for name, on in (("bind", decoder.binds), ("greedy", greedy)) if on) or "none"
        hidden = next(i for i in session.get_inputs() if i.name == decoder.inputs[0]).shape[-1]
        embeds = np.random.default_rng(0).standard_normal((1, prompt_len, hidden), dtype=np.float32) * 0.02
        mask, positions = np.ones((1, prompt_len), np.int64), np.arange(prompt_len, dtype=np.int64)[None]
        token = np.full((1, 1, hidden), 0.01, np.float32)
        self.calls = decoder_calls(decoder, SequentialStep.after_prefill(mask, positions), embeds, lambda _: token,
                                   greedy=greedy)
        next(self.calls)  # the prefill

    def decode_step(self) -> float:
        start = time.perf_counter()
        next(self.calls)
        return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoders", nargs="+", help="DECODER.onnx[@none|bind|greedy|all]")
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
    print("| decoder | KV cache | levers | ms per step (median) | tok/s | speed vs the first (same rounds) |\n"
          "|---|---|---|---|---|---|")
    for path, decoder, t in zip(args.decoders, decoders, times):
        ratio = statistics.median(a / b for a, b in zip(times[0], t))
        median = statistics.median(t)
        print(f"| {path} | {decoder.kv_cache} | {decoder.levers} | {median * 1e3:.2f} | {1 / median:.1f} | {ratio:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
