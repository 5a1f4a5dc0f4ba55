"""Step 5: runs -> per-system figures (min / median / max, same-round ratios to the baseline, the bandwidth
bound, greedy agreement of the fp32 systems)."""

from __future__ import annotations

import statistics

from .systems import BANDWIDTH, BASELINE, REFERENCE, SYSTEMS


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(runs: list[dict], builds: dict[str, dict], baseline: str = BASELINE, reference: str = REFERENCE,
              labels: dict[str, str] | None = None, fp32: set[str] | None = None) -> dict:
    """Per system: prefill / decode min-median-max over its successful runs, decode ratio to `baseline`
    (median over rounds of the same-round ratio), weights per token, fraction of the bandwidth bound (median
    tok/s * bytes per token / median bandwidth), peak RSS (max), bytes on disk, greedy agreement with
    `reference` (the fp32 systems' tokens must match it). `builds`: system -> build.json."""
    labels = labels or {s.name: s.label for s in SYSTEMS}
    fp32 = fp32 if fp32 is not None else {s.name for s in SYSTEMS if s.fp32}
    ok = [r for r in runs if r.get("ok")]
    bw = _stats([r["bytes_per_s"] for r in ok if r["system"] == BANDWIDTH])
    by_round = {(r["system"], r["round"]): r for r in ok}
    rank = {name: i for i, name in enumerate(labels)}  # the table lists systems as given, not as first run
    names = sorted((n for n in dict.fromkeys(r["system"] for r in runs) if n != BANDWIDTH),
                   key=lambda n: rank.get(n, len(rank)))
    ref_tokens = next((r["tokens"] for r in ok if r["system"] == reference), None)
    systems = {}
    for name in names:
        mine = [r for r in ok if r["system"] == name]
        entry = {"label": labels.get(name, name), "runs": len(mine),
                 "failed": sum(1 for r in runs if r["system"] == name and not r.get("ok")),
                 "failed_logs": [r["log"] for r in runs if r["system"] == name and not r.get("ok")],
                 "prefill_s": _stats([r["prefill_s"] for r in mine]),
                 "decode_tok_s": _stats([r["decode_tok_s"] for r in mine]),
                 "peak_rss_bytes": max((r["peak_rss_bytes"] for r in mine), default=None)}
        build_info = builds.get(name, {})
        entry["file_bytes"] = build_info.get("file_bytes")
        entry["weight_bytes_per_token"] = build_info.get("weight_bytes_per_token")
        ratios = [r["decode_tok_s"] / by_round[(baseline, r["round"])]["decode_tok_s"]
                  for r in mine if (baseline, r["round"]) in by_round]
        entry["decode_ratio_to_baseline"] = statistics.median(ratios) if ratios else None
        prefill_ratios = [by_round[(baseline, r["round"])]["prefill_s"] / r["prefill_s"]
                          for r in mine if (baseline, r["round"]) in by_round]
        entry["prefill_speed_ratio_to_baseline"] = statistics.median(prefill_ratios) if prefill_ratios else None
        if bw and entry["decode_tok_s"] and entry["weight_bytes_per_token"]:
            entry["bytes_per_s_read"] = entry["decode_tok_s"]["median"] * entry["weight_bytes_per_token"]
            entry["fraction_of_bound"] = entry["bytes_per_s_read"] / bw["median"]
        else:
            entry["bytes_per_s_read"] = entry["fraction_of_bound"] = None
        if mine:
            entry["tokens"] = mine[0]["tokens"]
            entry["tokens_stable"] = all(r["tokens"] == mine[0]["tokens"] for r in mine)
            entry["agree_with_reference"] = _prefix(mine[0]["tokens"], ref_tokens) if ref_tokens else None
        systems[name] = entry
    fp32_present = [n for n in names if n in fp32 and systems[n]["runs"]]
    agree = (all(systems[n]["tokens"] == systems[fp32_present[0]]["tokens"] for n in fp32_present)
             if fp32_present else None)
    return {"systems": systems, "bandwidth": bw, "baseline": baseline, "reference": reference,
            "fp32_systems": fp32_present, "fp32_tokens_agree": agree}
