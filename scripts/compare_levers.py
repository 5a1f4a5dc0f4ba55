"""Answers with and without the runtime's decode-step levers, question by question, on one artifact.

    python scripts/compare_levers.py ARTIFACT [--data easy-vqa] [--limit 1000] [--threads 2]

The levers (attanchor_runtime.ort_backend.OrtDecoder): the graph's greedy choice (`next_token` fetched
instead of the logits) and IO binding (KV buffers bound in place, outputs into arrays allocated once).
Both change how a step is fed and read, never what it computes: this prints the share of identical
answers (expected 1.0), each side's accuracy, and each side's seconds per question (the two sides run
batch by batch in turn, so a machine that slows down slows both). Not in CI (tests/test_tiny_vqa.py
checks the same on 96 questions).
"""

from __future__ import annotations

import argparse
import json
import statistics

from attanchor_runtime import Pipeline

from attanchor_export.checks.task_accuracy import DEFAULT_BATCH, answer_items
from attanchor_export.load.datasets import load_task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--data", default="easy-vqa")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    items = load_task(args.data, limit=args.limit)
    fast, slow = Pipeline.load(args.artifact, threads=args.threads), Pipeline.load(args.artifact, threads=args.threads)
    levers = {"greedy_in_graph": fast.backend.greedy_in_graph, "io_binding": fast.backend.decoder.binds}
    slow.backend.decoder.greedy_in_graph = slow.backend.decoder.binds = False
    records: dict[str, list] = {"with_levers": [], "without": []}
    for start in range(0, len(items), DEFAULT_BATCH):  # batch by batch, in turn
        chunk = items[start : start + DEFAULT_BATCH]
        records["with_levers"] += answer_items(fast, chunk)
        records["without"] += answer_items(slow, chunk)
    same = sum(a["answer"] == b["answer"] for a, b in zip(records["with_levers"], records["without"]))
    report = {"artifact": args.artifact, "questions": len(items), "levers": levers, "same_answers": same / len(items)}
    for side, rows in records.items():
        report[side] = {"accuracy": sum(r["correct"] for r in rows) / len(rows),
                        "seconds_per_question_median": statistics.median(r["seconds"] for r in rows)}
    report["speed_ratio_median"] = statistics.median(
        b["seconds"] / a["seconds"] for a, b in zip(records["with_levers"], records["without"]))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
