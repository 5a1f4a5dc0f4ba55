"""Measured runs -> the figures of run_bench's result: medians, bests, the bandwidth bound, torch
ratios and the targets they are held to."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# What TinyLLaVA-1B (fp32, 2 threads) is expected to reach.
TARGETS = {
    "decode_speedup_vs_torch": (">=", 1.3),
    "decode_fraction_of_bandwidth_bound": (">=", 0.85),
    "ttft_ratio_vs_torch": ("<=", 1.0),
    "anchor_insert_share_of_ttft": ("<=", 0.005),
    "python_overhead_share_per_step": ("<=", 0.05),
}

RUNTIME_KEYS = ("ttft_s", "vision_s", "embedding_s", "prefill_s", "other_s", "decode_s", "decode_tokens_per_s",
                "python_overhead_s", "python_overhead_share", "anchors")
TORCH_KEYS = ("ttft_s", "vision_s", "embedding_s", "prefill_s", "decode_s", "decode_tokens_per_s")


def median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def summary(runs: list[dict], keys: Sequence[str]) -> dict:
    """Median of each key over runs; `<stage>_min_s` for times; the best decode tokens/s."""
    out = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = median(values)
        if key.endswith("_s") and values:
            out[key[:-2] + "_min_s"] = float(min(values))
    if any(r.get("decode_tokens_per_s") for r in runs):
        out["decode_tokens_per_s_max"] = float(max(r["decode_tokens_per_s"] for r in runs
                                                   if r.get("decode_tokens_per_s")))
    return out


def runtime_summary(runs: list[dict], no_anchor_runs: list[dict], anchor_times: list[tuple[float, float]]) -> dict:
    """The runtime's figures; anchor_times: AnchorInsert alone, (median, best) per prompt."""
    runtime = summary(runs, RUNTIME_KEYS)
    runtime["anchor_insert_s"] = median([t[0] for t in anchor_times])
    runtime["anchor_insert_min_s"] = min(t[1] for t in anchor_times)
    ttft = runtime["ttft_s"]
    runtime["embedding_share_of_ttft"] = runtime["embedding_s"] / ttft
    runtime["anchor_insert_share_of_ttft"] = runtime["anchor_insert_s"] / ttft
    steps = median([r["decode_steps"] for r in runs])
    runtime["decode_step_s"] = runtime["decode_s"] / steps if steps else None
    runtime["python_overhead_per_step_s"] = (runtime["python_overhead_s"] / steps
                                             if steps and runtime["python_overhead_s"] is not None else None)
    if no_anchor_runs:
        runtime["ttft_no_anchors_s"] = median([r["ttft_s"] for r in no_anchor_runs])
        runtime["prefill_no_anchors_s"] = median([r["prefill_s"] for r in no_anchor_runs])
    return runtime


def bandwidth_summary(probes: list[dict], runs: list[dict], dims, max_new_tokens: int,
                      weight_bytes: int, row_bytes: int) -> dict:
    """The decode bound: bytes read per token over the probed read bandwidth, and how close runs came."""
    per_token = weight_bytes + row_bytes
    mean_context = median([(r["sequence_length"] or 0) for r in runs]) or 0
    kv_bytes = 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * 4 * (
        mean_context + max_new_tokens / 2)
    read = median([b["bytes_per_s"] for b in probes])
    methods = [b["method"] for b in probes]
    fractions = [r["bandwidth_fraction"] for r in runs if r["bandwidth_fraction"]]
    return {
        "bytes_per_s": read,
        "bytes_per_s_max": max(b["bytes_per_s"] for b in probes),
        "bytes_per_s_min": min(b["bytes_per_s"] for b in probes),
        "method": max(set(methods), key=methods.count),
        "probes": {name: median([b["probes"][name] for b in probes]) for name in probes[0]["probes"]},
        "buffer_bytes": probes[0]["buffer_bytes"],
        "decoder_weight_bytes": weight_bytes, "embedding_row_bytes": row_bytes, "bytes_per_token": per_token,
        "kv_cache_bytes_per_token": kv_bytes,
        "decode_bound_tokens_per_s": read / per_token,
        # Median over runs of (decode bytes/s of the run) / (probe right after it).
        "achieved_fraction": median([r["bandwidth_fraction"] for r in runs]),
        "achieved_fraction_min": min(fractions, default=None),
        "achieved_fraction_max": max(fractions, default=None),
        "pairing": "probe after each measured runtime run",
    }


def ratios(runtime: dict, torch: dict, runtime_runs: list[dict], torch_runs: list[dict]) -> dict:
    """Runtime / torch figures, and whether every interleaved pair produced the same greedy tokens."""
    match = [a["tokens"] == b["tokens"] for a, b in zip(runtime_runs, torch_runs)]
    return {
        "decode_speedup": runtime["decode_tokens_per_s"] / torch["decode_tokens_per_s"],
        "ttft_ratio": runtime["ttft_s"] / torch["ttft_s"],
        "prefill_ratio": runtime["prefill_s"] / torch["prefill_s"],
        "vision_ratio": runtime["vision_s"] / torch["vision_s"],
        "embedding_ratio": runtime["embedding_s"] / torch["embedding_s"],
        "tokens_match": all(match) if match else None,
    }


def targets(result: dict) -> list[dict]:
    """Each TARGETS entry with its value in `result` and whether it passed (None: not measured)."""
    rt, ratio, bound = result["runtime"], result.get("ratios", {}), result["bandwidth"]
    values = {
        "decode_speedup_vs_torch": ratio.get("decode_speedup"),
        "decode_fraction_of_bandwidth_bound": bound.get("achieved_fraction"),
        "ttft_ratio_vs_torch": ratio.get("ttft_ratio"),
        "anchor_insert_share_of_ttft": rt.get("anchor_insert_share_of_ttft"),
        "python_overhead_share_per_step": rt.get("python_overhead_share"),
    }
    out = []
    for name, (op, limit) in TARGETS.items():
        value = values[name]
        passed = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append({"name": name, "value": value, "op": op, "limit": limit, "passed": passed})
    return out


def without_tokens(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens"} for r in runs]
