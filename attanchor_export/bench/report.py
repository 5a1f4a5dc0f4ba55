"""run_bench's result for people: a console table (format_report) and a two-panel PNG (write_chart).

The chart is drawn with Pillow (a runtime dependency already) rather than matplotlib, which is not a
dependency of this project and would be a heavy one to add for two bar charts.
"""

from __future__ import annotations

import math
from pathlib import Path


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
    eager = f"torch eager {tr.get('dtype', 'fp32')}" if tr else ""
    header = f"  {'':28s}{'runtime':>12s}" + (f"{eager:>18s}{'ratio':>9s}" if tr else "")
    lines += ["", header]

    def row(label, key, ratio=True, fmt=_fmt_s):
        a = rt.get(key)
        text = f"  {label:28s}{fmt(a):>12s}"
        if tr:
            b = tr.get(key)
            text += f"{fmt(b):>18s}"
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

