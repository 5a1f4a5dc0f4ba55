"""`attanchor-export bench DIR`: where the time goes between an image + prompt and the answer.

    result = run_bench("out/tinyllava-1b", compare_torch=True, threads=2)
    print(format_report(result))
    write_chart(result, "bench.png")
    json.dump(result, open("bench.json", "w"))

Everything is measured through the torch-free runtime (`Pipeline`, ONNX Runtime backend) on batch 1,
greedy, with EOS disabled so every run generates exactly `max_new_tokens`:

- time to first token (TTFT) from `generate()` to the first token, split into vision, embedding
  (the embedding graph: token rows, AnchorInsert, gather, position ids), prefill and the rest
  (Python between graphs, first-token sampling);
- AnchorInsert alone: the op in a one-node ONNX model (attanchor_graphs.build_anchor_model) fed the
  very inputs the embedding graph gives it, timed in the same ONNX Runtime with the same threads.
  Running the embedding graph at threshold 2.0 would not isolate it: the similarity matrix is still
  computed, only no anchor passes. The anchors' other cost - longer prefill - is reported as the
  TTFT at threshold 2.0 next to the anchored one;
- decode tokens/s over the steps after the first token, and the runtime's Python overhead per decode
  step: the time between two tokens minus the time spent inside the decoder's `session.run`;
- the memory-bandwidth bound of decode: weight bytes read per token (every decoder initializer + one
  embedding row) / read bandwidth measured here with numpy (best of 4- and 2-thread BLAS dots, a BLAS
  dot and a BLAS gemv over a 1 GiB buffer), probed right after each measured run because a VM's
  bandwidth drifts; the achieved fraction is the median of the per-run ratios. numpy's readers are
  not the fastest possible (ONNX Runtime's packed GEMV has been seen above them), so a fraction
  near or above 1 means "at the memory wall", not a bug;
- peak RSS of the runtime after load + one full generate (VmHWM, reset before loading where Linux
  allows, else the process lifetime ru_maxrss);
- with compare_torch: the same prompts through `transformers` eager in this process (the manifest's
  source checkpoint, LlavaForConditionalGeneration, default attention implementation), fed the same
  anchored inputs as attanchor_export.checks.torch_reference builds them, runtime and torch runs interleaved so
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
        attn_implementation, torch, transformers}                                  (compare_torch)
    ratios{decode_speedup, ttft_ratio, prefill_ratio, vision_ratio, embedding_ratio, tokens_match}
    targets[{name, value, op, limit, passed}], background_cpu_share{median, max},
    runs{runtime: [...], torch: [...]} (every measured run)

The chart is drawn with Pillow (a runtime dependency already) rather than matplotlib, which is not a
dependency of this project and would be a heavy one to add for two bar charts.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BENCH_SCHEMA = "attanchor-bench/1"

# LLaVA-style VQA questions of about 40 text tokens with Llama tokenizers (chat template included).
DEFAULT_PROMPTS = (
    "Describe the image in detail. What is shown in the photo, where is the cat sitting, what color is the "
    "car next to the green tree, and is it day or night?",
    "How many people are there in the picture? What is the man holding, what is the woman doing, and which "
    "object is on the left of the table near the window?",
)

# Issue 4 targets (TinyLLaVA-1B dimensions, fp32, 2 threads).
TARGETS = {
    "decode_speedup_vs_torch": (">=", 1.3),
    "decode_fraction_of_bandwidth_bound": (">=", 0.85),
    "ttft_ratio_vs_torch": ("<=", 1.0),
    "anchor_insert_share_of_ttft": ("<=", 0.005),
    "python_overhead_share_per_step": ("<=", 0.05),
}


# -- machine probes ---------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_stat():
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values), values[3] + values[4]  # total, idle + iowait


class _ForeignLoad:
    """CPU share that *other* processes used between start() and stop() (Linux; None elsewhere)."""

    def start(self):
        self._stat, self._own = _proc_stat(), sum(os.times()[:4])
        return self

    def stop(self) -> float | None:
        end = _proc_stat()
        if self._stat is None or end is None:
            return None
        own = (sum(os.times()[:4]) - self._own) * os.sysconf("SC_CLK_TCK")
        total = end[0] - self._stat[0]
        busy = total - (end[1] - self._stat[1])
        return float(min(1.0, max(0.0, (busy - own) / total))) if total > 0 else 0.0


def _wait_quiet(max_wait: float, limit: float = 0.15) -> None:
    """Wait up to max_wait seconds for the machine to be idle (other processes < limit of the CPU)."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        probe = _ForeignLoad().start()
        time.sleep(1.0)
        share = probe.stop()
        if share is None or share < limit:
            return


class _PeakRss:
    """Peak resident set size of this process from reset() on: VmHWM after writing 5 to clear_refs
    (Linux), else the lifetime ru_maxrss."""

    def reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        return self.exact

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None

    def current(self) -> int | None:
        return self._status("VmRSS")

    def peak(self) -> int:
        hwm = self._status("VmHWM")
        if hwm is not None:
            return hwm
        import resource  # Unix only; /proc answered above on Linux

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss if platform.system() == "Darwin" else maxrss * 1024)


class BandwidthProbe:
    """Read bandwidth in bytes/s over a buffer of `nbytes` (far beyond the last-level cache): the best
    of 4-thread and 2-thread BLAS dots (each thread streams its share), a single BLAS dot and a BLAS
    gemv. The fastest reader is taken, so the bound is as strict as numpy can make it. The buffer is
    kept, so the probe can be repeated next to each measured decode: on a VM the bandwidth the host
    leaves us drifts by tens of percent within minutes, and only paired figures compare."""

    def __init__(self, nbytes: int = 1 << 30):
        count = max(1 << 20, nbytes // 4)
        count -= count % 4096
        self.buf = np.ones(count, np.float32)
        self.matrix = self.buf.reshape(-1, 1024)
        self.vector = np.ones(1024, np.float32)

    def _threads(self, k: int):
        part = self.buf.size // k

        def run():
            threads = [threading.Thread(target=lambda s: s.dot(s), args=(self.buf[i * part:(i + 1) * part],))
                       for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        return run

    def measure(self, repeats: int = 5) -> dict:
        probes = {"dot_4_threads": self._threads(4), "dot_2_threads": self._threads(2),
                  "dot": lambda: self.buf.dot(self.buf), "gemv": lambda: self.matrix @ self.vector}
        results = {}
        for name, fn in probes.items():
            fn()  # touch the pages
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            results[name] = self.buf.nbytes / best
        method = max(results, key=results.get)
        return {"bytes_per_s": results[method], "method": method, "probes": results,
                "buffer_bytes": int(self.buf.nbytes)}


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """One BandwidthProbe measurement (see there)."""
    return BandwidthProbe(nbytes).measure(repeats)


def decoder_weight_bytes(path) -> int:
    """Bytes of every initializer of an ONNX graph (external data included, nothing loaded)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        length = {e.key: e.value for e in t.external_data}.get("length")
        if t.data_location == onnx.TensorProto.EXTERNAL and length is not None:
            total += int(length)
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            try:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except (KeyError, TypeError):
                itemsize = 1
            total += int(np.prod(list(t.dims), dtype=np.int64)) * itemsize
    return total


def synthetic_image(width: int = 640, height: int = 480, seed: int = 0):
    """A deterministic RGB test picture (gradients, blocks and noise), so the bench needs no file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        rgb[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.integers(0, 256, 3)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


# -- runtime side -------------------------------------------------------------------------------------

class _TimedSession:
    """Wraps an onnxruntime session: records (start, duration, inputs_embeds length) of every run()."""

    def __init__(self, session):
        self._session, self.calls = session, []

    def run(self, output_names, input_feed, *args, **kwargs):
        embeds = input_feed.get("inputs_embeds") if isinstance(input_feed, dict) else None
        t0 = time.perf_counter()
        try:
            return self._session.run(output_names, input_feed, *args, **kwargs)
        finally:
            self.calls.append((t0, time.perf_counter() - t0, None if embeds is None else int(embeds.shape[1])))

    def __getattr__(self, name):
        return getattr(self._session, name)


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def _anchor_inputs(pipe, ids: np.ndarray, features: np.ndarray):
    """The five AnchorInsert inputs for one prompt row, as the embedding graph computes them."""
    ids = ids[None, :] if ids.ndim == 1 else ids
    text = np.asarray(pipe.embed_table[ids], np.float32)
    mask = np.ones_like(ids)
    position = np.argmax(ids == pipe.image_token_id, axis=1).astype(np.int64)
    return text, np.asarray(features, np.float32), mask, position


def _best_scores(text, features, mask, position) -> np.ndarray:
    """t2i best cosine per candidate text token (after the image, not padding), numpy float32."""
    scores = []
    for b in range(text.shape[0]):
        t = text[b, position[b] + 1:][mask[b, position[b] + 1:].astype(bool)]
        if not len(t):
            continue
        tn = np.linalg.norm(t, axis=-1, keepdims=True)
        fn = np.linalg.norm(features[b], axis=-1, keepdims=True)
        s = (t @ features[b].T) / np.maximum(tn * fn.T, 1e-30)
        scores.append(s.max(axis=1))
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


class _AnchorOp:
    """AnchorInsert alone in ONNX Runtime (the model-local function the embedding graph inlines)."""

    def __init__(self, manifest, threads):
        import onnxruntime as ort
        from attanchor_graphs.model import build_anchor_model

        anchor = manifest.anchor
        model = build_anchor_model(anchor["mode"], anchor.get("max_anchors"))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def time(self, text, features, mask, position, threshold, runs: int = 25) -> tuple[float, float]:
        """(median, best) seconds of one AnchorInsert call."""
        feeds = {"text_embeds": text, "image_features": features, "text_attention_mask": mask,
                 "image_position": position, "threshold": np.asarray(threshold, np.float32)}
        self.session.run(None, feeds)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        return float(statistics.median(times)), float(min(times))


def _runtime_once(pipe, timed, ids, pixels, max_new_tokens, threshold) -> dict:
    from attanchor_runtime.pipeline import GenerateOutput

    timed.calls.clear()
    yields = []
    t0 = time.perf_counter()
    output = None
    for item in pipe.generate_steps([ids], pixels, max_new_tokens=max_new_tokens, threshold=threshold,
                                    eos_token_id=[]):
        if isinstance(item, GenerateOutput):
            output = item
        else:
            yields.append(time.perf_counter())
    ttft = yields[0] - t0
    intervals = np.diff(yields)
    decode_calls = timed.calls[1:]  # call 0 is the prefill
    inside = sum(call[1] for call in decode_calls)
    loop = float(intervals.sum()) if len(intervals) else 0.0
    t = output.timings
    known = t["vision"] + t["embedding"] + t["prefill"]
    return {
        "ttft_s": ttft,
        "vision_s": t["vision"],
        "embedding_s": t["embedding"],
        "prefill_s": t["prefill"],
        "other_s": max(0.0, ttft - known),
        "decode_steps": len(intervals),
        "decode_s": loop,
        "decode_tokens_per_s": len(intervals) / loop if loop > 0 else None,
        "python_overhead_s": max(0.0, loop - inside) if len(intervals) else None,
        "python_overhead_share": max(0.0, 1.0 - inside / loop) if loop > 0 else None,
        "anchors": sum(len(a) for a in output.anchors),
        "sequence_length": timed.calls[0][2] if timed.calls else None,  # prefill positions incl. anchors
        "tokens": output.tokens[0].tolist(),
    }


# -- torch side ---------------------------------------------------------------------------------------

class _TorchRunner:
    """transformers eager on the manifest's source checkpoint, fed the anchored inputs the reference builds."""

    def __init__(self, manifest, threads):

        import torch

        from attanchor_export.checks.recheck import load_source

        self.torch = torch
        self._threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        # The same source (and LoRA merge, for --adapter artifacts) that `check` compares with.
        self.loaded = load_source(manifest)
        self.load_s = time.perf_counter() - t0
        self.name = str(self.loaded.source)
        anchor = manifest.anchor
        self.mode, self.max_anchors = anchor["mode"], anchor.get("max_anchors")
        self.attn_implementation = getattr(self.loaded.model.config, "_attn_implementation", None)

    def restore_threads(self):
        self.torch.set_num_threads(self._threads)

    def once(self, ids, pixels, max_new_tokens, threshold) -> dict:
        import torch
        from attanchor_graphs.reference import anchor_insert, position_ids_from_mask
        from transformers import DynamicCache

        from attanchor_export.checks.torch_reference import image_features
        from attanchor_export.load.hf_compat import cache_kwargs

        loaded = self.loaded
        adapter, model = loaded.adapter, loaded.model
        body, head, embed = adapter.language_model(model), adapter.lm_head(model), adapter.embed_tokens(model)
        with torch.no_grad():
            t0 = time.perf_counter()
            features = image_features(loaded, pixels)
            t1 = time.perf_counter()
            # attanchor_export.checks.torch_reference.anchored_inputs, minus its own vision pass (timed above).
            tid = torch.as_tensor(ids[None, :], dtype=torch.long)
            mask = torch.ones_like(tid)
            text = embed(tid)
            where = (tid == adapter.dims.image_token_id).long().argmax(dim=1)
            gather_index, out_mask = anchor_insert(
                text.float().numpy(), features.float().numpy(), mask.numpy(), where.numpy(),
                np.float32(threshold), mode=self.mode, max_anchors=self.max_anchors,
            )
            both = torch.cat([text, features.to(text.dtype)], dim=1)
            index = torch.from_numpy(gather_index)
            embeds = torch.gather(both, 1, index[..., None].expand(-1, -1, both.shape[-1]))
            amask = torch.from_numpy(out_mask)
            positions = torch.from_numpy(position_ids_from_mask(out_mask))
            t2 = time.perf_counter()
            cache = DynamicCache(config=body.config)
            out = body(inputs_embeds=embeds, attention_mask=amask, position_ids=positions, use_cache=True,
                       **cache_kwargs(body, cache))  # the cache is updated in place
            token = head(out.last_hidden_state[:, -1:, :])[:, -1, :].float().argmax(dim=-1)
            t3 = time.perf_counter()
            tokens, steps = [int(token[0])], []
            positions = positions[:, -1:]
            for _ in range(max_new_tokens - 1):
                s0 = time.perf_counter()
                positions = positions + 1
                amask = torch.cat([amask, torch.ones_like(amask[:, :1])], dim=1)
                out = body(inputs_embeds=embed(token[:, None]), attention_mask=amask, position_ids=positions,
                           use_cache=True, **cache_kwargs(body, cache))
                token = head(out.last_hidden_state[:, -1:, :])[:, -1, :].float().argmax(dim=-1)
                tokens.append(int(token[0]))
                steps.append(time.perf_counter() - s0)
        decode = float(sum(steps))
        return {
            "ttft_s": t3 - t0, "vision_s": t1 - t0, "embedding_s": t2 - t1, "prefill_s": t3 - t2,
            "decode_steps": len(steps), "decode_s": decode,
            "decode_tokens_per_s": len(steps) / decode if decode > 0 else None,
            "sequence_length": int(embeds.shape[1]), "tokens": tokens,
        }


# -- the benchmark ------------------------------------------------------------------------------------

def _summary(runs: list[dict], keys: Sequence[str]) -> dict:
    out = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = _median(values)
        if key.endswith("_s") and values:
            out[key[:-2] + "_min_s"] = float(min(values))
    if any(r.get("decode_tokens_per_s") for r in runs):
        out["decode_tokens_per_s_max"] = float(max(r["decode_tokens_per_s"] for r in runs
                                                   if r.get("decode_tokens_per_s")))
    return out


def _targets(result: dict) -> list[dict]:
    rt, ratios, bound = result["runtime"], result.get("ratios", {}), result["bandwidth"]
    values = {
        "decode_speedup_vs_torch": ratios.get("decode_speedup"),
        "decode_fraction_of_bandwidth_bound": bound.get("achieved_fraction"),
        "ttft_ratio_vs_torch": ratios.get("ttft_ratio"),
        "anchor_insert_share_of_ttft": rt.get("anchor_insert_share_of_ttft"),
        "python_overhead_share_per_step": rt.get("python_overhead_share"),
    }
    targets = []
    for name, (op, limit) in TARGETS.items():
        value = values[name]
        passed = None if value is None else (value >= limit if op == ">=" else value <= limit)
        targets.append({"name": name, "value": value, "op": op, "limit": limit, "passed": passed})
    return targets


def run_bench(
    folder,
    prompts: Sequence[str] | None = None,
    image=None,
    max_new_tokens: int = 32,
    threads: int | None = None,
    compare_torch: bool = False,
    repeats: int = 3,
    threshold: float | str | None = None,
    warmup: int = 1,
    quiet_wait: float = 0.0,
    bandwidth_bytes: int = 1 << 30,
    progress=None,
) -> dict:
    """Benchmark the artifact at `folder`; returns a JSON-able dict (keys in the module docstring and
    README). prompts: questions put through the artifact's chat template (default DEFAULT_PROMPTS);
    image: path, bytes, PIL image or None (a synthetic picture); threshold: a number, None (the
    manifest default) or "auto" (the threshold at which ~10% of the prompt's text tokens become
    anchors, as in the paper - random-weight checkpoints otherwise insert none); repeats: measured
    runs per prompt after `warmup` unmeasured ones; quiet_wait: seconds to wait for an idle machine
    before each measured run; progress: optional callable(str) for status lines."""
    from attanchor_runtime.pipeline import Pipeline

    say = progress or (lambda message: None)
    if max_new_tokens < 2:
        raise ValueError("max_new_tokens must be >= 2 to measure decode")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    prompts = list(prompts or DEFAULT_PROMPTS)
    rss = _PeakRss()
    rss_before = rss.current()
    exact_rss = rss.reset()

    say("load runtime")
    t0 = time.perf_counter()
    pipe = Pipeline.load(folder, backend="ort", device="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    if not hasattr(pipe.backend, "decoder_session"):
        raise ValueError("bench measures the ONNX Runtime backend")
    timed = _TimedSession(pipe.backend.decoder_session)
    pipe.backend.decoder_session = timed
    manifest = pipe.manifest

    picture = synthetic_image() if image is None else image
    t0 = time.perf_counter()
    pixels = pipe.images(picture)
    preprocess_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = [np.asarray(pipe.text.encode(pipe.text.format_chat(p)), np.int64) for p in prompts]
    tokenize_s = (time.perf_counter() - t0) / len(prompts)
    dims = manifest.dims

    # Anchor inputs per prompt (features from the vision graph once), threshold choice, AnchorInsert op.
    features = pipe.backend.vision(pixels)
    anchor_op = _AnchorOp(manifest, threads)
    inputs = [_anchor_inputs(pipe, r, features) for r in rows]
    from attanchor_export.trace.threshold import threshold_for_rate

    threshold_mode = "manifest" if threshold is None else ("auto" if threshold == "auto" else "given")
    if threshold is None:
        threshold = float(manifest.anchor["threshold"])
    elif threshold == "auto":
        scores = np.concatenate([_best_scores(*x) for x in inputs])
        threshold = threshold_for_rate(scores) if scores.size else float(manifest.anchor["threshold"])
    threshold = float(threshold)

    say("warm up")
    for _ in range(warmup):
        _runtime_once(pipe, timed, rows[0], pixels, max_new_tokens, threshold)

    # Peak of the runtime alone: load + a full generate (prefill and decode) have run.
    runtime_peak = rss.peak()

    decoder_file = pipe.backend._decoder_file() if hasattr(pipe.backend, "_decoder_file") else \
        manifest.graph_path("decoder")
    table = manifest.data["embed_table"]
    row_bytes = int(table["shape"][1]) * np.dtype(table["dtype"]).itemsize
    weights = decoder_weight_bytes(decoder_file)
    per_token = weights + row_bytes
    say("allocate the bandwidth probe")
    probe = BandwidthProbe(bandwidth_bytes)
    probes = []

    torch_runner = None
    runtime_runs, torch_runs, no_anchor_runs, background = [], [], [], []
    if compare_torch:
        say("load transformers model")
        torch_runner = _TorchRunner(manifest, threads)
        for _ in range(warmup):
            torch_runner.once(rows[0], pixels, max_new_tokens, threshold)

    def measured(fn, *args):
        if quiet_wait:
            _wait_quiet(quiet_wait)
        elif torch_runner is not None:
            time.sleep(0.2)  # let the other engine's spinning worker threads (OpenMP, ORT) go to sleep
        probe = _ForeignLoad().start()
        record = fn(*args)
        record["background_cpu_share"] = probe.stop()
        background.append(record["background_cpu_share"])
        return record

    try:
        for rep in range(repeats):
            for k, ids in enumerate(rows):
                say(f"repeat {rep + 1}/{repeats}, prompt {k + 1}/{len(rows)}")
                run = measured(_runtime_once, pipe, timed, ids, pixels, max_new_tokens, threshold)
                run["prompt"] = k
                # Bandwidth right after the decode it bounds (the host's share drifts over minutes).
                bw = probe.measure(repeats=3)
                probes.append(bw)
                run["read_bytes_per_s"] = bw["bytes_per_s"]
                run["bandwidth_fraction"] = (run["decode_tokens_per_s"] * per_token / bw["bytes_per_s"]
                                             if run["decode_tokens_per_s"] else None)
                runtime_runs.append(run)
                if torch_runner is not None:
                    trun = measured(torch_runner.once, ids, pixels, max_new_tokens, threshold)
                    trun["prompt"] = k
                    torch_runs.append(trun)
            # Prefill without anchors (threshold 2.0): what the inserted tokens cost in TTFT.
            if threshold <= 1.0:
                no_anchor_runs.append(measured(_runtime_once, pipe, timed, rows[0], pixels, 2, 2.0))
    finally:
        if torch_runner is not None:
            torch_runner.restore_threads()

    anchor_times = [anchor_op.time(*x, threshold) for x in inputs]  # [(median, best)] per prompt
    keys = ("ttft_s", "vision_s", "embedding_s", "prefill_s", "other_s", "decode_s", "decode_tokens_per_s",
            "python_overhead_s", "python_overhead_share", "anchors")
    runtime = _summary(runtime_runs, keys)
    runtime["anchor_insert_s"] = _median([t[0] for t in anchor_times])
    runtime["anchor_insert_min_s"] = min(t[1] for t in anchor_times)
    ttft = runtime["ttft_s"]
    runtime["embedding_share_of_ttft"] = runtime["embedding_s"] / ttft
    runtime["anchor_insert_share_of_ttft"] = runtime["anchor_insert_s"] / ttft
    steps = _median([r["decode_steps"] for r in runtime_runs])
    runtime["decode_step_s"] = runtime["decode_s"] / steps if steps else None
    runtime["python_overhead_per_step_s"] = (runtime["python_overhead_s"] / steps
                                             if steps and runtime["python_overhead_s"] is not None else None)
    if no_anchor_runs:
        runtime["ttft_no_anchors_s"] = _median([r["ttft_s"] for r in no_anchor_runs])
        runtime["prefill_no_anchors_s"] = _median([r["prefill_s"] for r in no_anchor_runs])
    runtime.update({"load_s": load_s, "peak_rss_bytes": runtime_peak, "rss_before_load_bytes": rss_before,
                    "peak_rss_exact": exact_rss, "preprocess_image_s": preprocess_s, "tokenize_s": tokenize_s})

    mean_context = _median([(r["sequence_length"] or 0) for r in runtime_runs]) or 0
    kv_bytes = 2 * dims["num_layers"] * dims["num_kv_heads"] * dims["head_dim"] * 4 * (
        mean_context + max_new_tokens / 2)
    read = _median([b["bytes_per_s"] for b in probes])
    methods = [b["method"] for b in probes]
    bandwidth = {
        "bytes_per_s": read,
        "bytes_per_s_max": max(b["bytes_per_s"] for b in probes),
        "bytes_per_s_min": min(b["bytes_per_s"] for b in probes),
        "method": max(set(methods), key=methods.count),
        "probes": {name: _median([b["probes"][name] for b in probes]) for name in probes[0]["probes"]},
        "buffer_bytes": probes[0]["buffer_bytes"],
        "decoder_weight_bytes": weights, "embedding_row_bytes": row_bytes, "bytes_per_token": per_token,
        "kv_cache_bytes_per_token": kv_bytes,
        "decode_bound_tokens_per_s": read / per_token,
        # Median over runs of (decode bytes/s of the run) / (probe right after it).
        "achieved_fraction": _median([r["bandwidth_fraction"] for r in runtime_runs]),
        "achieved_fraction_min": min((r["bandwidth_fraction"] for r in runtime_runs if r["bandwidth_fraction"]),
                                     default=None),
        "achieved_fraction_max": max((r["bandwidth_fraction"] for r in runtime_runs if r["bandwidth_fraction"]),
                                     default=None),
        "pairing": "probe after each measured runtime run",
    }
    del probe

    result = {
        "schema": BENCH_SCHEMA,
        "folder": str(Path(folder).resolve()),
        "source": manifest.data.get("source", {}).get("model"),
        "dims": {k: dims.get(k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                                          "image_tokens", "image_size")},
        "precision": manifest.precision,
        "settings": {
            "threads": threads, "max_new_tokens": max_new_tokens, "repeats": repeats, "warmup": warmup,
            "batch": 1, "threshold": threshold, "threshold_mode": threshold_mode, "quiet_wait": quiet_wait,
            "decoding": "greedy, EOS ignored",
        },
        "prompts": [
            {"text": p, "text_tokens": int(len(r)), "sequence_length": next(
                (x["sequence_length"] for x in runtime_runs if x["prompt"] == k and x["sequence_length"]), None),
             "anchors": next((x["anchors"] for x in runtime_runs if x["prompt"] == k), None)}
            for k, (p, r) in enumerate(zip(prompts, rows))
        ],
        "machine": {
            "cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": _version("onnxruntime"), "numpy": np.__version__,
        },
        "runtime": runtime,
        "bandwidth": bandwidth,
        "background_cpu_share": {"median": _median(background), "max": max((b for b in background if b is not None),
                                                                             default=None)},
        "runs": {"runtime": _strip(runtime_runs), "torch": _strip(torch_runs)},
    }
    if torch_runner is not None:
        tsum = _summary(torch_runs, ("ttft_s", "vision_s", "embedding_s", "prefill_s", "decode_s",
                                     "decode_tokens_per_s"))
        tsum.update({"load_s": torch_runner.load_s, "checkpoint": torch_runner.name,
                     "attn_implementation": torch_runner.attn_implementation,
                     "torch": _version("torch"), "transformers": _version("transformers")})
        result["torch"] = tsum
        result["machine"]["torch"] = tsum["torch"]
        match = [a["tokens"] == b["tokens"] for a, b in zip(runtime_runs, torch_runs)]
        result["ratios"] = {
            "decode_speedup": runtime["decode_tokens_per_s"] / tsum["decode_tokens_per_s"],
            "ttft_ratio": runtime["ttft_s"] / tsum["ttft_s"],
            "prefill_ratio": runtime["prefill_s"] / tsum["prefill_s"],
            "vision_ratio": runtime["vision_s"] / tsum["vision_s"],
            "embedding_ratio": runtime["embedding_s"] / tsum["embedding_s"],
            "tokens_match": all(match) if match else None,
        }
    result["targets"] = _targets(result)
    return result


def _strip(runs):
    return [{k: v for k, v in r.items() if k != "tokens"} for r in runs]


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


# -- output -------------------------------------------------------------------------------------------

def _fmt_s(value) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def format_report(result: dict) -> str:
    """A console report of run_bench's result."""
    rt, bw, s = result["runtime"], result["bandwidth"], result["settings"]
    tr = result.get("torch")
    lines = [
        f"attanchor-export bench  {result['folder']}",
        f"  {result['machine']['cpu']}, {result['machine']['logical_cpus']} CPUs, threads={s['threads']}, "
        f"onnxruntime {result['machine']['onnxruntime']}, "
        f"{result['precision'].get('dtype', 'fp32')}/{result['precision'].get('quant', 'none')}",
        f"  batch 1, {len(result['prompts'])} prompt(s) x {s['repeats']} repeats, {s['max_new_tokens']} new tokens, "
        f"threshold {s['threshold']:.4g} ({s['threshold_mode']})",
    ]
    for p in result["prompts"]:
        lines.append(f"    prompt: {p['text_tokens']} text tokens -> {p['sequence_length']} positions, "
                     f"{p['anchors']} anchors")
    bg = result["background_cpu_share"]
    if bg["max"] is not None:
        lines.append(f"  other processes used {100 * bg['median']:.0f}% (median), {100 * bg['max']:.0f}% (max) "
                     "of the CPU during measured runs")
    header = f"  {'':28s}{'runtime':>12s}" + (f"{'torch eager':>14s}{'ratio':>9s}" if tr else "")
    lines += ["", header]

    def row(label, key, ratio=True, fmt=_fmt_s):
        a = rt.get(key)
        text = f"  {label:28s}{fmt(a):>12s}"
        if tr:
            b = tr.get(key)
            text += f"{fmt(b):>14s}"
            if ratio and a and b:
                text += f"{a / b:>8.2f}x"
        return text

    lines += [
        row("time to first token", "ttft_s"),
        row("  vision", "vision_s"),
        row("  embedding + anchors", "embedding_s"),
        row("  prefill", "prefill_s"),
        row("  other", "other_s", ratio=False),
        row("decode tokens/s", "decode_tokens_per_s", fmt=lambda v: "-" if v is None else f"{v:.2f}"),
        row("load", "load_s", ratio=False),
    ]
    lines += [
        "",
        f"  AnchorInsert alone           {_fmt_s(rt['anchor_insert_s'])} (best {_fmt_s(rt['anchor_insert_min_s'])}) = "
        f"{100 * rt['anchor_insert_share_of_ttft']:.3f}% of TTFT "
        f"(embedding graph {100 * rt['embedding_share_of_ttft']:.2f}%)",
    ]
    if rt.get("ttft_no_anchors_s"):
        lines.append(f"  TTFT without anchors (thr 2) {_fmt_s(rt['ttft_no_anchors_s'])}")
    lines += [
        f"  Python overhead per step     {_fmt_s(rt['python_overhead_per_step_s'])} = "
        f"{100 * (rt['python_overhead_share'] or 0):.2f}% of a {_fmt_s(rt['decode_step_s'])} step",
        f"  peak RSS (runtime)           {rt['peak_rss_bytes'] / 2**30:.2f} GiB"
        + ("" if rt["peak_rss_exact"] else " (process lifetime peak)"),
        f"  read bandwidth               {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['method']}, "
        f"{bw['buffer_bytes'] / 2**30:.2f} GiB buffer)",
        f"  weight bytes per token       {bw['bytes_per_token'] / 1e9:.3f} GB "
        f"(+ KV cache {bw['kv_cache_bytes_per_token'] / 1e6:.1f} MB, not counted)",
        f"  decode bound                 {bw['decode_bound_tokens_per_s']:.2f} tok/s; achieved "
        f"{100 * (bw['achieved_fraction'] or 0):.1f}% (per run, probe right after it: "
        f"{100 * (bw['achieved_fraction_min'] or 0):.0f}-{100 * (bw['achieved_fraction_max'] or 0):.0f}%; "
        f"probe {bw['bytes_per_s_min'] / 1e9:.0f}-{bw['bytes_per_s_max'] / 1e9:.0f} GB/s)",
    ]
    if result.get("ratios"):
        r = result["ratios"]
        lines.append(f"  greedy tokens runtime == torch: {r['tokens_match']}")
    lines += ["", "  targets:"]
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["passed"]]
        lines.append(f"    {t['name']:36s} {value:>9s} {t['op']} {t['limit']:<6g} {verdict}")
    return "\n".join(lines)


def _nice(value: float) -> float:
    """The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) >= value, for four round ticks."""
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * exp >= value:
            return step * exp
    return 10 * exp


_COLORS = {"vision": (76, 114, 176), "embedding": (221, 132, 82), "prefill": (85, 168, 104),
           "other": (160, 160, 160), "runtime": (76, 114, 176), "torch": (196, 78, 82), "bound": (129, 114, 179)}


def write_chart(result: dict, png_path) -> Path:
    """PNG with two panels: TTFT stacked by stage (runtime vs torch) and decode tokens/s (runtime,
    torch, bandwidth bound). Pillow only."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 960, 540
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=14)
        small = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()
    rt, tr, bw = result["runtime"], result.get("torch"), result["bandwidth"]
    title = (f"attanchor-export bench: {Path(result['folder']).name}, threads={result['settings']['threads']}, "
             f"{result['settings']['max_new_tokens']} new tokens")
    draw.text((20, 12), title, fill="black", font=font)

    def panel(x0, x1, label, unit, bars, vmax):
        top, bottom = 70, height - 70
        draw.text((x0, 44), label, fill="black", font=font)
        draw.line([(x0 + 40, top), (x0 + 40, bottom), (x1, bottom)], fill="black")
        vmax = _nice(vmax or 1.0)
        for k in range(5):
            v = vmax * k / 4
            y = bottom - (bottom - top) * k / 4
            draw.line([(x0 + 36, y), (x0 + 40, y)], fill="black")
            draw.text((x0, y - 7), f"{v:.3g}", fill="black", font=small)
        slot = (x1 - x0 - 60) / max(len(bars), 1)
        for i, (name, segments) in enumerate(bars):
            bx0 = x0 + 50 + i * slot + slot * 0.15
            bx1 = bx0 + slot * 0.7
            y = bottom
            total = 0.0
            for seg_name, value in segments:
                if not value:
                    continue
                h = (bottom - top) * value / vmax
                draw.rectangle([bx0, y - h, bx1, y], fill=_COLORS[seg_name], outline="black")
                y -= h
                total += value
            draw.text((bx0, y - 18), f"{total:.3g} {unit}", fill="black", font=small)
            draw.text((bx0, bottom + 6), name, fill="black", font=small)

    stages = ("vision", "embedding", "prefill", "other")
    ttft_bars = [("runtime", [(s, rt.get(f"{s}_s")) for s in stages])]
    if tr:
        torch_other = max(0.0, tr["ttft_s"] - tr["vision_s"] - tr["embedding_s"] - tr["prefill_s"])
        ttft_bars.append(("torch eager", [("vision", tr["vision_s"]), ("embedding", tr["embedding_s"]),
                                          ("prefill", tr["prefill_s"]), ("other", torch_other)]))
    vmax = max(sum(v or 0 for _, v in segs) for _, segs in ttft_bars) * 1.15
    panel(20, width // 2 - 20, "time to first token (s)", "s", ttft_bars, vmax)
    legend_x = 80
    for s in stages:
        draw.rectangle([legend_x, height - 30, legend_x + 12, height - 18], fill=_COLORS[s], outline="black")
        draw.text((legend_x + 16, height - 32), s, fill="black", font=small)
        legend_x += 100

    dec_bars = [("runtime", [("runtime", rt.get("decode_tokens_per_s"))])]
    if tr:
        dec_bars.append(("torch eager", [("torch", tr.get("decode_tokens_per_s"))]))
    dec_bars.append(("bandwidth bound", [("bound", bw.get("decode_bound_tokens_per_s"))]))
    vmax = max((segs[0][1] or 0) for _, segs in dec_bars) * 1.15
    panel(width // 2 + 10, width - 20, "decode tokens/s", "tok/s", dec_bars, vmax)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(png_path, format="PNG")
    return png_path


__all__ = [
    "BENCH_SCHEMA", "DEFAULT_PROMPTS", "TARGETS", "decoder_weight_bytes", "format_report",
    "measure_read_bandwidth", "run_bench", "synthetic_image", "write_chart",
]
