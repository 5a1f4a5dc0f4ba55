"""The command-line options every training script shares (scripts/train_*.py), mapped onto loop.Recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from attanchor_export.train.loop import Recipe


def parser(doc: str, out: Path) -> argparse.ArgumentParser:
    """The shared options; a script adds its own after this."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=out, help="where the trained parts go")
    ap.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (resumes from it)")
    ap.add_argument("--init-parts", type=Path,
                    help="start from these parts (tower + projector + lora/); a folder holding only lora/ starts "
                         "the LoRA there and the vision parts from scratch")
    ap.add_argument("--stage-a-from", type=Path, help="stage_a.pt of a run with the same seed (skips stage A)")
    ap.add_argument("--steps", type=int, default=Recipe.steps, help="stage-B steps")
    ap.add_argument("--stage-a-steps", type=int, default=Recipe.stage_a_steps)
    ap.add_argument("--batch", type=int, default=Recipe.batch)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=Recipe.eval_every)
    ap.add_argument("--eval-n", type=int, default=Recipe.eval_n)
    ap.add_argument("--final-eval-n", type=int, default=0, help="validation questions at the end (0 = all)")
    ap.add_argument("--no-anchors", action="store_true", help="baseline: the plain layout (threshold 2)")
    ap.add_argument("--stage-a-fp32", action="store_true",
                    help="stage A in fp32, as runs before 2026-12-05 (default: bf16 autocast, ~3.5x faster where "
                         "the CPU has AMX/AVX512-BF16; training.json records which)")
    ap.add_argument("--kind-weight", action="append", default=[], metavar="KIND=N",
                    help="sample questions of KIND N times per pass (e.g. yes/no=1); overrides the script's default")
    return ap


def _kind_weights(pairs: list[str]) -> dict[str, int]:
    weights = {}
    for pair in pairs:
        kind, _, n = pair.partition("=")
        if not kind or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"error: --kind-weight {pair!r}: expected KIND=N with N a positive integer")
        weights[kind] = int(n)
    return weights


def recipe(args: argparse.Namespace, kind_weights: dict | None = None, **extra) -> Recipe:
    """The Recipe these options ask for; `kind_weights` is the script's default, --kind-weight wins over it."""
    extra["kind_weights"] = {**(kind_weights or {}), **_kind_weights(args.kind_weight)}
    return Recipe(steps=args.steps, stage_a_steps=args.stage_a_steps, stage_a_bf16=not args.stage_a_fp32,
                  batch=args.batch, lr=args.lr, seed=args.seed, threads=args.threads, eval_every=args.eval_every,
                  eval_n=args.eval_n, final_eval_n=args.final_eval_n, anchors=not args.no_anchors, **extra)
