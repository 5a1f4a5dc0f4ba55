"""Parity results as a rich table (stderr), shared by export, check and the demo."""

from __future__ import annotations


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
