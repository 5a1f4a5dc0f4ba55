"""What every step shares: where things are, the one-line error, the console line, and the one JSON line each
child prints (its mark and how the parent finds it among whatever else a library prints)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: every child runs its scripts/bench_peers.py
SCRIPT = ROOT / "scripts" / "bench_peers.py"
DEFAULT_CACHE = Path.home() / ".cache" / "attanchor-export" / "peers"
MARK = "bench_peers"  # every child's result line carries this key


class BenchError(Exception):
    """A one-line reason the run cannot go on (a peer that fails to build names itself and its log)."""


def say(msg: str) -> None:
    print(msg, flush=True)


def parse_child_output(stdout: str) -> dict | None:
    """The child's result: the last stdout line that is a JSON object carrying MARK (libraries may print)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get(MARK) == 1:
            return value
    return None
