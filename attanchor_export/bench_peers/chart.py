"""The chart: decode tok/s and prefill seconds per system, drawn by matplotlib in whichever venv has it."""

from __future__ import annotations

import json
from pathlib import Path

from .venvs import needs_peer_matplotlib, peer_task


def write_chart(result: dict, png: Path) -> None:
    """Decode tok/s (median, min-max whiskers, the bandwidth bound as a tick) and prefill seconds per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = [n for n, e in summary["systems"].items() if e["decode_tok_s"]]
    labels = [summary["systems"][n]["label"] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.55 * len(names) + 2.2), sharey=True)
    y = range(len(names))
    for ax, key, title in ((ax1, "decode_tok_s", "decode tokens/s (median, min-max)"),
                           (ax2, "prefill_s", f"prefill {result['settings']['prompt_len']} tokens, s")):
        stats = [summary["systems"][n][key] for n in names]
        med = [s["median"] for s in stats]
        err = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
        colors = ["#4c72b0" if n.startswith("project") else "#999999" if n.startswith("transformers") else "#dd8452"
                  for n in names]
        ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    bw = summary["bandwidth"]
    if bw:
        right = 1.3 * max(summary["systems"][n]["decode_tok_s"]["max"] for n in names)
        for i, n in enumerate(names):
            wpt = summary["systems"][n]["weight_bytes_per_token"]
            if wpt and bw["median"] / wpt <= right:
                ax1.plot([bw["median"] / wpt], [i], "k|", markersize=14)
        ax1.set_xlim(0, right)
        ax1.set_xlabel(f"| = bandwidth bound at {bw['median'] / 1e9:.1f} GB/s (median probe; off the axis: not drawn)")
    ax1.set_yticks(list(y), labels)
    ax1.invert_yaxis()
    s = result["settings"]
    fig.suptitle(f"bench_peers: {s['dims']} random weights, {s['threads']} threads, batch 1, {s['new_tokens']} new tokens, "
                 f"{s['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def task_chart(spec: dict) -> dict:
    write_chart(json.loads(Path(spec["json"]).read_text()), Path(spec["png"]))
    return {"png": spec["png"]}


def save_chart(result: dict, png: Path, cache: Path, json_path: Path | None) -> None:
    """write_chart here, or as a task of the peers venv (through a JSON file) when this venv has no matplotlib."""
    if not needs_peer_matplotlib():
        write_chart(result, png)
        return
    source = json_path or png.with_suffix(".json")
    if json_path is None:
        source.write_text(json.dumps(result) + "\n")
    peer_task(cache, "chart", {"json": str(source.resolve()), "png": str(png.resolve())}, cache / "logs" / "chart.log",
              "drawing the chart (peers venv)")
