"""Train tiny-vqa's vision tower, projector and LoRA on easy-vqa (train split), on the CPU.

    python scripts/train_tiny_vqa.py --ckpt /tmp/tiny-vqa-run [--steps 600] [--seed 0] \\
        [--out attanchor_export/load/tiny_vqa_parts] [--init-parts attanchor_export/load/tiny_vqa_parts]

The recipe is attanchor_export/train/loop.py (stage A: patch/word alignment; stage B: the LM loss on the
answer tokens over the AttAnchor layout with words-only candidates, LoRA), shared with tiny-scenes.
Validation is a seeded 10% of easy-vqa's TRAIN images (attanchor_export/train/data.py); the test split
is never read. `--init-parts` starts from an earlier run's parts (then `--stage-a-steps 0` skips the
alignment stage). Run the same command again to resume from --ckpt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attanchor_export.load import tiny_vqa
from attanchor_export.train import data, loop


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=tiny_vqa.PARTS, help="where the trained parts go")
    ap.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (resumes from it)")
    ap.add_argument("--init-parts", type=Path, help="start from these parts (tower + projector + lora/)")
    ap.add_argument("--steps", type=int, default=loop.Recipe.steps)
    ap.add_argument("--stage-a-steps", type=int, default=loop.Recipe.stage_a_steps)
    ap.add_argument("--batch", type=int, default=loop.Recipe.batch)
    ap.add_argument("--lr", type=float, default=loop.Recipe.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=loop.Recipe.eval_every)
    ap.add_argument("--eval-n", type=int, default=loop.Recipe.eval_n)
    ap.add_argument("--final-eval-n", type=int, default=0, help="validation questions at the end (0 = all)")
    ap.add_argument("--no-anchors", action="store_true", help="baseline: plain LLaVA layout (threshold 2)")
    args = ap.parse_args()

    import torch

    from attanchor_export.trace.candidates import excluded_token_ids

    torch.set_num_threads(args.threads)
    # Colour and shape questions twice: yes/no are 73% of easy-vqa, and the harder kinds need the steps.
    recipe = loop.Recipe(steps=args.steps, stage_a_steps=args.stage_a_steps, batch=args.batch, lr=args.lr,
                         seed=args.seed, threads=args.threads, eval_every=args.eval_every, eval_n=args.eval_n,
                         final_eval_n=args.final_eval_n, anchors=not args.no_anchors,
                         kind_weights={"color": 2, "shape": 2})
    model, tokenizer = tiny_vqa.base_model(seed=args.seed)
    train, validation = data.easy_vqa_splits(tiny_vqa.image_processor(), model.config.vision_config.patch_size,
                                             seed=args.seed)
    record = loop.run(model, tokenizer, train, validation, recipe, args.out, args.ckpt, tiny_vqa.ANSWER_END,
                      excluded_token_ids(tokenizer), init_parts=args.init_parts,
                      meta={"task": "easy-vqa", "seed": args.seed})
    print("done:", record["validation_accuracy"], flush=True)


if __name__ == "__main__":
    main()
