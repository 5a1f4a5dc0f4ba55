"""run_bench, step by step: load, inputs, threshold, warm-up, measured runs, result.

    result = run_bench("out/tinyllava-1b", compare_torch=True, threads=2)
    print(format_report(result))
    write_chart(result, "bench.png")
    json.dump(result, open("bench.json", "w"))

Everything is measured through the torch-free runtime (ONNX Runtime, CPU) on batch 1, the loop users
run: `Pipeline.front_end` (vision, embedding, anchors), then `Pipeline.generate_steps` (the runtime's
decode loop), greedy with EOS ignored, so every run generates exactly `max_new_tokens`:

- time to first token (TTFT) to the first token, split into vision, embedding (the embedding graph:
  token rows, AnchorInsert, gather, position ids), prefill and the rest (Python between graphs);
- AnchorInsert alone (see .anchor_op); the anchors' other cost - longer prefill - is reported as the
  TTFT at threshold 2.0 next to the anchored one;
- decode tokens/s over the steps after the first token, and the Python overhead per decode step:
  the time between two tokens minus the time spent inside the decoder's `session.run`;
- the memory-bandwidth bound of decode: weight bytes read per token (every decoder initializer + one
  embedding row) / read bandwidth measured here with numpy (.probes.BandwidthProbe over a 1 GiB
  buffer), probed right after each measured run because a VM's bandwidth drifts; the achieved
  fraction is the median of the per-run ratios. numpy's readers are not the fastest possible (ONNX
  Runtime's packed GEMV has been seen above them), so a fraction near or above 1 means "at the
  memory wall", not a bug;
- peak RSS of the runtime after load + one full generate (VmHWM, reset before loading where Linux
  allows, else the process lifetime ru_maxrss);
- with compare_torch: the same prompts through `transformers` eager in this process (the manifest's
  source checkpoint, default attention implementation, fp32 unless torch_dtype says bf16 or fp16),
  run by attanchor_export.source_model (anchored inputs, greedy), runtime and torch runs interleaved so
  background load hits both alike; ratios and whether greedy tokens match.

The machine may be shared: every measured run records the CPU share other processes used meanwhile
(`background_cpu_share`), and `quiet_wait` > 0 waits up to that many seconds before each run for the
machine to go idle. Figures are medians over prompts x repeats; `*_min` fields give the best run.

Result keys (all times in seconds, medians unless named *_min / *_max):

    schema, folder, source, dims, precision, settings{threads, max_new_tokens, repeats, warmup, batch,
        threshold, threshold_mode, quiet_wait, decoding}, prompts[{text, text_tokens, sequence_length,
        anchors}], machine{cpu, logical_cpus, python, onnxruntime, numpy[, torch]}
    runtime{ttft_s, vision_s, embedding_s, prefill_s, other_s, decode_s, decode_step_s,
        decode_tokens_per_s[_max], python_overhead_s, python_overhead_share, python_overhead_per_step_s,
        anchor_insert_s, anchor_insert_share_of_ttft, embedding_share_of_ttft, anchors,
        ttft_no_anchors_s, prefill_no_anchors_s, load_s, peak_rss_bytes, peak_rss_exact,
        rss_before_load_bytes, preprocess_image_s, tokenize_s, <stage>_min_s}
    bandwidth{bytes_per_s[_min|_max], method, probes, buffer_bytes, decoder_weight_bytes,
        embedding_row_bytes, bytes_per_token, kv_cache_bytes_per_token, decode_bound_tokens_per_s,
        achieved_fraction, pairing}
    torch{ttft_s, vision_s, embedding_s, prefill_s, decode_s, decode_tokens_per_s, load_s, checkpoint,
        dtype, attn_implementation, torch, transformers}                           (compare_torch)
    ratios{decode_speedup, ttft_ratio, prefill_ratio, vision_ratio, embedding_ratio, tokens_match}
    targets[{name, value, op, limit, passed}], background_cpu_share{median, max},
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from attanchor_runtime.pipeline import Pipeline

from attanchor_export.options import TORCH_DTYPES
from attanchor_export.trace.threshold import threshold_for_rate

from .anchor_op import AnchorOp, anchor_inputs, best_scores
from .inputs import DEFAULT_PROMPTS, synthetic_image
from .probes import (
    BandwidthProbe,
    ForeignLoad,
    PeakRss,
    cpu_name,
    decoder_weight_bytes,
    package_version,
    wait_quiet,
)
from .runners import TorchRunner, runtime_once
from .summary import (
    TORCH_KEYS,
    bandwidth_summary,
    median,
    ratios,
    runtime_summary,
    summary,
    targets,
    without_tokens,
)

BENCH_SCHEMA = "attanchor-bench/1"
NO_ANCHORS = 2.0  # a threshold no cosine similarity reaches
clock = time.perf_counter


def run_bench(
    folder,
    prompts: Sequence[str] | None = None,
    image=None,
    max_new_tokens: int = 32,
    threads: int | None = None,
    compare_torch: bool = False,
    torch_dtype: str = "fp32",
    repeats: int = 3,
    threshold: float | str | None = None,
    warmup: int = 1,
    quiet_wait: float = 0.0,
    bandwidth_bytes: int = 1 << 30,
    progress=None,
    verify: str = "size",
) -> dict:
    """Benchmark the artifact at `folder`; returns a JSON-able dict (keys in the module docstring and
    README). prompts: questions put through the artifact's chat template (default DEFAULT_PROMPTS);
    image: path, bytes, PIL image or None (a synthetic picture); threshold: a number, None (the
    manifest default) or "auto" (the threshold at which ~10% of the prompt's text tokens become
    anchors, as in the paper - random-weight checkpoints otherwise insert none); repeats: measured
    runs per prompt after `warmup` unmeasured ones; quiet_wait: seconds to wait for an idle machine
    before each measured run; progress: optional callable(str) for status lines; verify: how the
    artifact's files are checked first (Pipeline.load: none, size or sha256); torch_dtype: what
    transformers runs in with compare_torch (fp32, bf16 or fp16)."""
    say = progress or (lambda message: None)
    if max_new_tokens < 2:
        raise ValueError("max_new_tokens must be >= 2 to measure decode")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype must be one of {', '.join(TORCH_DTYPES)}, got {torch_dtype!r}")
    runtime = _load_runtime(folder, threads, say, verify)
    pipe, manifest = runtime.pipe, runtime.pipe.manifest
    inputs = _prepare_inputs(pipe, list(prompts or DEFAULT_PROMPTS), image)
    op_inputs = _anchor_op_inputs(pipe, inputs)
    threshold, threshold_mode = _choose_threshold(threshold, manifest, op_inputs)

    say("warm up")
    for _ in range(warmup):
        runtime_once(pipe, inputs.rows[0], inputs.pixels, max_new_tokens, threshold)
    runtime.peak = runtime.rss.peak()  # load + a full generate (prefill and decode) have run
    weight_bytes, row_bytes = _bytes_read_per_token(manifest)
    say("allocate the bandwidth probe")
    probe = BandwidthProbe(bandwidth_bytes)
    torch_runner = _load_torch(manifest, threads, inputs, max_new_tokens, threshold, warmup, say, torch_dtype) \
        if compare_torch else None
    try:
        runs = _measure(pipe, torch_runner, inputs, max_new_tokens, threshold, repeats, quiet_wait, probe,
                        weight_bytes + row_bytes, say)
    finally:
        if torch_runner is not None:
            torch_runner.restore_threads()
    del probe  # its buffer: bandwidth_bytes of memory
    anchor_times = _time_anchor_op(manifest, threads, op_inputs, threshold)
    settings = {"threads": threads, "max_new_tokens": max_new_tokens, "repeats": repeats, "warmup": warmup,
                "batch": 1, "threshold": threshold, "threshold_mode": threshold_mode, "quiet_wait": quiet_wait,
                "decoding": "greedy, EOS ignored"}
    result = _result(folder, manifest, settings, inputs, runtime, runs, anchor_times, weight_bytes, row_bytes,
                     torch_runner)
    result["targets"] = targets(result)
    return result


# -- the steps --------------------------------------------------------------------------------------

@dataclass
class _Runtime:
    """The loaded Pipeline and what loading it cost."""

    pipe: object
    load_s: float
    rss: PeakRss
    rss_before: int | None
    rss_exact: bool
    peak: int | None = None  # peak RSS after load + one full generate


def _load_runtime(folder, threads, say, verify: str = "size") -> _Runtime:
    rss = PeakRss()
    before = rss.current()
    exact = rss.reset()
    say("load runtime")
    t0 = clock()
    pipe = Pipeline.load(folder, backend="ort", device="cpu", threads=threads, verify=verify)
    return _Runtime(pipe, clock() - t0, rss, before, exact)


@dataclass
class _Inputs:
    prompts: list[str]
    rows: list[np.ndarray]  # token ids per prompt, chat template applied
    pixels: np.ndarray
    preprocess_s: float
    tokenize_s: float  # per prompt


def _prepare_inputs(pipe, prompts: list[str], image) -> _Inputs:
    picture = synthetic_image() if image is None else image
    t0 = clock()
    pixels = pipe.images(picture)
    preprocess_s = clock() - t0
    t0 = clock()
    rows = [pipe.prompt_ids(p) for p in prompts]
    return _Inputs(prompts, rows, pixels, preprocess_s, (clock() - t0) / len(prompts))


def _anchor_op_inputs(pipe, inputs: _Inputs) -> list[tuple]:
    """AnchorInsert's inputs per prompt, with the image features of the runtime's own vision graph."""
    features = pipe.front_end([inputs.rows[0]], inputs.pixels).image_features
    return [anchor_inputs(pipe, row, features) for row in inputs.rows]


def _choose_threshold(threshold, manifest, op_inputs) -> tuple[float, str]:
    """(threshold, how it was chosen: manifest | auto | given)."""
    if threshold is None:
        return manifest.anchor.threshold, "manifest"
    if threshold == "auto":
        scores = np.concatenate([best_scores(*x) for x in op_inputs])
        return float(threshold_for_rate(scores) if scores.size else manifest.anchor.threshold), "auto"
    return float(threshold), "given"


def _bytes_read_per_token(manifest) -> tuple[int, int]:
    """(decoder weight bytes, bytes of one embedding-table row): what a decode step must read."""
    return decoder_weight_bytes(manifest.path(manifest.graph_file("decoder", "ort"))), manifest.embed_table.row_bytes


def _load_torch(manifest, threads, inputs: _Inputs, max_new_tokens, threshold, warmup, say,
                dtype: str = "fp32") -> TorchRunner:
    say(f"load transformers model ({dtype})")
    runner = TorchRunner(manifest, threads, dtype)
    for _ in range(warmup):
        runner.once(inputs.rows[0], inputs.pixels, max_new_tokens, threshold)
    return runner


@dataclass
class _Runs:
    runtime: list[dict] = field(default_factory=list)
    torch: list[dict] = field(default_factory=list)
    no_anchors: list[dict] = field(default_factory=list)  # the first prompt at NO_ANCHORS, 2 new tokens
    background: list = field(default_factory=list)  # CPU share other processes used, per measured run
    bandwidth: list[dict] = field(default_factory=list)  # the probe right after each runtime run


def _measure(pipe, torch_runner, inputs: _Inputs, max_new_tokens, threshold, repeats, quiet_wait, probe,
             bytes_per_token, say) -> _Runs:
    """Every prompt `repeats` times, runtime and torch interleaved, each run followed by its probe."""
    runs = _Runs()

    def measured(fn, *args):
        if quiet_wait:
            wait_quiet(quiet_wait)
        elif torch_runner is not None:
            time.sleep(0.2)  # let the other engine's spinning worker threads (OpenMP, ORT) go to sleep
        load = ForeignLoad().start()
        record = fn(*args)
        record["background_cpu_share"] = load.stop()
        runs.background.append(record["background_cpu_share"])
        return record

    for rep in range(repeats):
        for k, ids in enumerate(inputs.rows):
            say(f"repeat {rep + 1}/{repeats}, prompt {k + 1}/{len(inputs.rows)}")
            run = measured(runtime_once, pipe, ids, inputs.pixels, max_new_tokens, threshold)
            run["prompt"] = k
            # Bandwidth right after the decode it bounds (the host's share drifts over minutes).
            bw = probe.measure(repeats=3)
            runs.bandwidth.append(bw)
            run["read_bytes_per_s"] = bw["bytes_per_s"]
            run["bandwidth_fraction"] = (run["decode_tokens_per_s"] * bytes_per_token / bw["bytes_per_s"]
                                         if run["decode_tokens_per_s"] else None)
            runs.runtime.append(run)
            if torch_runner is not None:
                trun = measured(torch_runner.once, ids, inputs.pixels, max_new_tokens, threshold)
                trun["prompt"] = k
                runs.torch.append(trun)
        # Prefill without anchors: what the inserted tokens cost in TTFT.
        if threshold <= 1.0:
            runs.no_anchors.append(measured(runtime_once, pipe, inputs.rows[0], inputs.pixels, 2, NO_ANCHORS))
    return runs


def _time_anchor_op(manifest, threads, op_inputs, threshold) -> list[tuple[float, float]]:
    """AnchorInsert alone, (median, best) seconds per prompt."""
    op = AnchorOp(manifest, threads)
    return [op.time(*x, threshold) for x in op_inputs]


def _result(folder, manifest, settings, inputs: _Inputs, runtime: _Runtime, runs: _Runs, anchor_times,
            weight_bytes, row_bytes, torch_runner) -> dict:
    dims = manifest.dims
    rt = runtime_summary(runs.runtime, runs.no_anchors, anchor_times)
    rt.update({"load_s": runtime.load_s, "peak_rss_bytes": runtime.peak, "rss_before_load_bytes": runtime.rss_before,
               "peak_rss_exact": runtime.rss_exact, "preprocess_image_s": inputs.preprocess_s,
               "tokenize_s": inputs.tokenize_s})

    result = {
        "schema": BENCH_SCHEMA,
        "folder": str(Path(folder).resolve()),
        "source": manifest.source.model,
        "dims": {k: getattr(dims, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                "vocab_size", "image_tokens", "image_size")},
        "precision": manifest.precision.to_json(),
        "settings": settings,
        "prompts": [
            {"text": p, "text_tokens": int(len(r)), "sequence_length": next(
                (x["sequence_length"] for x in runs.runtime if x["prompt"] == k and x["sequence_length"]), None),
             "anchors": next((x["anchors"] for x in runs.runtime if x["prompt"] == k), None)}
            for k, (p, r) in enumerate(zip(inputs.prompts, inputs.rows))
        ],
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": package_version("onnxruntime"), "numpy": np.__version__},
        "runtime": rt,
        "bandwidth": bandwidth_summary(runs.bandwidth, runs.runtime, dims, settings["max_new_tokens"],
                                       weight_bytes, row_bytes),
        "background_cpu_share": {"median": median(runs.background),
                                 "max": max((b for b in runs.background if b is not None), default=None)},
        "runs": {"runtime": without_tokens(runs.runtime), "torch": without_tokens(runs.torch)},
    }
    if torch_runner is not None:
        tsum = summary(runs.torch, TORCH_KEYS)
        tsum.update({"load_s": torch_runner.load_s, "checkpoint": torch_runner.name, "dtype": torch_runner.dtype,
                     "attn_implementation": torch_runner.attn_implementation,
                     "torch": package_version("torch"), "transformers": package_version("transformers")})
        result["torch"] = tsum
        result["machine"]["torch"] = tsum["torch"]
        result["ratios"] = ratios(rt, tsum, runs.runtime, runs.torch)
    return result
