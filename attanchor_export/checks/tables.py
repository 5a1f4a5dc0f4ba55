"""Parity results as a rich table (stderr), shared by export, check and the demo."""

from __future__ import annotations

from pathlib import Path


def _as_dict(check) -> dict:
    return check if isinstance(check, dict) else check.to_json()


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (graph, metric): the worst value over its cases, and how many cases ran."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        metric = r["metric"]
        key = (r["graph"], metric)
        g = groups.setdefault(key, {**r, "case": 0, "value": r["value"], "passed": True})
        g["case"] += 1
        worst = min if r.get("higher_is_better") else max
        g["value"] = worst(g["value"], r["value"])
        g["passed"] = g["passed"] and r["passed"]
    return [{**g, "case": f"{g['case']} cases, worst"} for g in groups.values()]


def print_checks(checks, only_failed: bool = False, summary: bool = False,
                 title: str = "parity against PyTorch") -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [_as_dict(c) for c in checks]
    if only_failed:
        rows = [r for r in rows if not r["passed"]]
    if summary:
        rows = summarize(rows)
    table = Table(title=title, show_lines=False)
    for column in ("graph", "case", "metric", "value", "limit", "ok"):
        table.add_column(column, justify="right" if column in ("value", "limit") else "left")
    for r in rows:
        value = r["value"]
        shown = f"{value:.3g}" if isinstance(value, float) and not float(value).is_integer() else f"{value:g}"
        table.add_row(r["graph"], r["case"], r["metric"], shown, f"{r['limit']:g}",
                      "[green]ok[/green]" if r["passed"] else "[red]FAIL[/red]")
    Console(stderr=True).print(table)


def print_eval(result: dict) -> None:
    """`eval`: one row per threshold, accuracy overall and per question type (stdout: it is the result)."""
    from rich.console import Console
    from rich.table import Table

    results = result["results"]
    kinds = sorted({k for r in results for k in r["by_kind"]})
    skipped = len(result.get("skipped") or [])
    table = Table(title=f"{result['data']} accuracy, {result['precision']} ({result['backend']}), "
                        f"{results[0]['questions']} questions" + (f" ({skipped} unreadable skipped)" if skipped else ""))
    first, others = results[0], []  # (result key, column title) of the systems compared answer by answer
    if "pytorch" in first:
        others.append(("pytorch", "pytorch"))
    if "compared" in first:
        others.append(("compared", f"{Path(first['compared']['folder']).name} ({first['compared']['precision']})"))
    if "baseline" in first:
        others.append(("baseline", f"baseline {Path(first['baseline']['report']).name} ({first['baseline']['precision']})"))
    for column in ("threshold", "overall", *kinds, "anchors/q", "on shape (chance)", "s/question",
                   *(c for _, title in others for c in (title, "same answers"))):
        table.add_column(column, justify="right")
    for r in results:
        loc = r.get("localisation")
        shown_loc = f"{loc['on_shape']:.0%} ({loc['chance']:.0%})" if loc and loc["word_anchors"] else "-"
        table.add_row(f"{r['threshold']:g}", f"{r['accuracy']:.4f}",
                      *(f"{r['by_kind'][k]['accuracy']:.4f}" if k in r["by_kind"] else "-" for k in kinds),
                      f"{r['anchors_per_question']:.2f}", shown_loc, f"{r['seconds_per_question']:.3f}",
                      *(c for key, _ in others for c in (f"{r[key]['accuracy']:.4f}", f"{r[key]['same_answers']:.2%}")))
    Console().print(table)
    for gate in result.get("gates", []):
        Console().print(("[green]ok[/green]   " if gate["passed"] else "[red]FAIL[/red] ") + gate["message"])
