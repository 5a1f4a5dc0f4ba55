"""The paper's claim in miniature: tiny-scenes with AttAnchor vs the same recipe without, through exported artifacts.

    python scripts/measure_scenes.py [--out out/measure-scenes] [--formats fp32,int4,fp16,int8]
        [--limit N] [--quant-limit 1000] [--model LABEL=SPEC ...] [--markdown table.md]

SPEC is an alias (tiny-scenes, tiny-scenes-noanchor: the default pair) or parts:DIR:anchor|noanchor (trained
parts from scripts/train_tiny_scenes.py, e.g. a second seed). Each (model, format) is exported with
`attanchor-export MODEL -o DIR --force` (parity checks and, for reduced precisions, the accuracy gate;
a format the gate refuses is reported as refused), then answered on the tiny-scenes TEST split through
the torch-free runtime (the code `attanchor-export eval --data tiny-scenes` runs): fp32 on every test
question (or --limit), the other formats on a fixed random --quant-limit of them. Printed: accuracy per
question kind with Wilson 95% intervals, anchors per question, where colour/shape-word anchors landed,
and for each anchored/baseline pair of the same format a paired count on the same questions (exact
McNemar test).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

FLAGS = {"fp32": [], "fp16": ["--dtype", "fp16"], "int4": ["--quant", "int4"], "int8": ["--quant", "int8"]}
KINDS = ("color", "shape", "yes/no", "relation", "count")


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b, c = discordant pairs (only A right, only B right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def model_source(spec: str) -> str:
    """What `attanchor-export MODEL` gets: an alias as is; parts:DIR:anchor|noanchor assembled into a folder."""
    if not spec.startswith("parts:"):
        return spec
    from attanchor_export.load import tiny_scenes
    from attanchor_export.load.tiny_vqa import checkpoint_folder

    _, folder, kind = spec.split(":")
    alias = "tiny-scenes" if kind == "anchor" else "tiny-scenes-noanchor"
    folder = Path(folder).resolve()
    return str(checkpoint_folder(f"{alias}-{folder.name}", folder, tiny_scenes.MODELS[alias][1]))


def export(source: str, fmt: str, out: Path) -> str | None:
    """None when the artifact is there and validated, else the export's one-line error."""
    if (out / "manifest.json").is_file():
        return None
    run = subprocess.run([sys.executable, "-m", "attanchor_export.cli", source, "-o", str(out), "--force", "--quiet",
                          *FLAGS[fmt]], capture_output=True, text=True)
    if run.returncode:
        lines = [line for line in run.stderr.splitlines() if line.startswith("error:")] or run.stderr.splitlines()[-1:]
        return lines[0] if lines else f"exit {run.returncode}"
    return None


def answer(folder: Path, items) -> dict:
    from attanchor_runtime import Pipeline

    from attanchor_export.checks.task_accuracy import evaluate_artifact

    pipe = Pipeline.load(folder)
    result = evaluate_artifact(pipe, items)
    result["correct"] = [bool(r["correct"]) for r in result.pop("records")]
    return result


def cell(right: int, n: int) -> str:
    lo, hi = wilson(right, n)
    return f"{right / n:.3f} [{lo:.3f}, {hi:.3f}]" if n else "-"


def table(rows: list[dict], items) -> str:
    kinds = [k for k in KINDS if any(it.kind == k for it in items)]
    head = ["model", "format", "questions", "overall", *kinds, "anchors / q", "colour/shape-word anchors on a matching item (chance)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        if row.get("refused"):
            lines.append(f"| {row['label']} | {row['format']} | - | refused: {row['refused']} |" + " |" * (len(head) - 4))
            continue
        correct, its = row["correct"], row["items"]
        by = {k: [c for c, it in zip(correct, its, strict=True) if it.kind == k] for k in kinds}
        loc = row.get("localisation") or {}
        shown = f"{loc['on_shape']:.1%} ({loc['chance']:.1%}), {loc['word_anchors']} words" if loc.get("word_anchors") else "-"
        lines.append("| " + " | ".join([row["label"], row["format"], str(len(correct)), cell(sum(correct), len(correct)),
                                        *(cell(sum(v), len(v)) for v in by.values()),
                                        f"{row['anchors_per_question']:.2f}", shown]) + " |")
    return "\n".join(lines)


def paired(rows: list[dict]) -> list[str]:
    """Anchored vs baseline of the same format on the same questions."""
    out = []
    by_key = {(r["label"], r["format"]): r for r in rows if not r.get("refused")}
    for (label, fmt), a in by_key.items():
        if label.endswith("noanchor"):
            continue
        base = by_key.get((label.replace("tiny-scenes", "tiny-scenes-noanchor", 1), fmt)) or \
            by_key.get((f"{label}-noanchor", fmt))
        if base is None or len(base["correct"]) != len(a["correct"]):
            continue
        only_a = sum(x and not y for x, y in zip(a["correct"], base["correct"], strict=True))
        only_b = sum(y and not x for x, y in zip(a["correct"], base["correct"], strict=True))
        diff = (sum(a["correct"]) - sum(base["correct"])) / len(a["correct"])
        out.append(f"{label} vs {base['label']} ({fmt}, {len(a['correct'])} questions): accuracy difference "
                   f"{diff:+.3f}; right only with anchors {only_a}, only without {only_b}, exact McNemar p = "
                   f"{mcnemar(only_a, only_b):.3g}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/measure-scenes"))
    ap.add_argument("--formats", default="fp32,int4,fp16,int8")
    ap.add_argument("--limit", type=int, help="fp32: at most N test questions (default: all)")
    ap.add_argument("--quant-limit", type=int, default=1000, help="other formats: a fixed random N of them")
    ap.add_argument("--model", action="append", metavar="LABEL=SPEC",
                    help="default: tiny-scenes=tiny-scenes and tiny-scenes-noanchor=tiny-scenes-noanchor")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    args = ap.parse_args()

    from attanchor_export.load.datasets import load_task

    models = dict(m.split("=", 1) for m in (args.model or ["tiny-scenes=tiny-scenes",
                                                           "tiny-scenes-noanchor=tiny-scenes-noanchor"]))
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FLAGS]
    if unknown:
        sys.exit(f"error: unknown format(s) {unknown}; choose from {list(FLAGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, spec in models.items():
        source = model_source(spec)
        for fmt in formats:
            folder = args.out / f"{label}-{fmt}"
            print(f"== {label} {fmt}: export", file=sys.stderr, flush=True)
            refused = export(source, fmt, folder)
            if refused:
                rows.append({"label": label, "format": fmt, "refused": refused})
                print(f"   {refused}", file=sys.stderr, flush=True)
                continue
            items = load_task("tiny-scenes", split="test", limit=args.limit if fmt == "fp32" else args.quant_limit)
            saved = args.out / f"eval-{label}-{fmt}.json"
            result = json.loads(saved.read_text()) if saved.is_file() else None
            asked = [[it.image_id, it.question] for it in items]
            if result is None or result.get("asked") != asked:
                print(f"== {label} {fmt}: {len(items)} test questions", file=sys.stderr, flush=True)
                result = answer(folder, items)
                result["asked"] = asked
                saved.write_text(json.dumps(result, indent=1) + "\n")
            else:
                print(f"== {label} {fmt}: answers reused from {saved}", file=sys.stderr, flush=True)
            rows.append({"label": label, "format": fmt, "items": items, **result})
    by_format = {}
    for r in rows:
        by_format.setdefault(r["format"], []).append(r)
    text = []
    for fmt, group in by_format.items():
        items = next((r["items"] for r in group if not r.get("refused")), [])
        text += [f"### {fmt}", "", table(group, items), ""]
        text += [f"- {line}" for line in paired(group)] + [""]
    report = "\n".join(text)
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()
