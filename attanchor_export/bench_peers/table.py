"""Step 5's table: the summary as markdown, the bandwidth line, the greedy-agreement line, failed runs."""

from __future__ import annotations


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _mmm(s: dict | None, fmt: str) -> str:
    return " / ".join(format(s[k], fmt) for k in ("min", "median", "max")) if s else "-"


def format_table(summary: dict, prompt_len: int | None = None) -> str:
    """Markdown table (min / median / max) + the bandwidth line + the greedy-agreement line."""
    baseline = summary["baseline"]
    prefill = f"prefill {prompt_len} tok (s)" if prompt_len else "prefill (s)"
    lines = [f"| system | {prefill} | decode tok/s | decode vs {baseline} | weights per token | fraction of bound "
             "| peak RSS | file size | runs |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary["systems"].values():
        ratio = e["decode_ratio_to_baseline"]
        frac = e["fraction_of_bound"]
        runs = f"{e['runs']}" + (f" ({e['failed']} failed)" if e["failed"] else "")
        lines.append(f"| {e['label']} | {_mmm(e['prefill_s'], '.2f')} | {_mmm(e['decode_tok_s'], '.1f')} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {_size(e['weight_bytes_per_token'])} | "
                     f"{'-' if frac is None else f'{frac:.0%}'} | {_size(e['peak_rss_bytes'])} | "
                     f"{_size(e['file_bytes'])} | {runs} |")
    bw = summary["bandwidth"]
    if bw:
        lines.append(f"\nmemory read bandwidth: median {bw['median'] / 1e9:.1f} GB/s, max {bw['max'] / 1e9:.1f} GB/s, "
                     f"min {bw['min'] / 1e9:.1f} GB/s ({bw['n']} probes, one per round)")
    else:
        lines.append("\nmemory read bandwidth: not measured")
    agree = summary["fp32_tokens_agree"]
    if agree is None:
        lines.append("fp32 greedy tokens: no fp32 system ran")
    else:
        ref = summary["reference"]
        detail = ", ".join(f"{n} {summary['systems'][n]['agree_with_reference']}"
                           for n in summary["fp32_systems"] if summary["systems"][n].get("agree_with_reference") is not None)
        lines.append(f"fp32 greedy tokens: {'all agree' if agree else 'DISAGREE'} across {', '.join(summary['fp32_systems'])}"
                     + (f" (leading tokens equal to {ref}: {detail})" if detail else ""))
    failed = [(n, e["failed_logs"]) for n, e in summary["systems"].items() if e["failed"]]
    for name, logs in failed:
        lines.append(f"{name}: {len(logs)} failed run(s), first log: {logs[0]}")
    return "\n".join(lines)
