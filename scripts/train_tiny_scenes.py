"""Train tiny-scenes (with AttAnchor in the training layout, or the no-anchor baseline) on the CPU.

    python scripts/train_tiny_scenes.py --out attanchor_export/load/tiny_scenes_parts --ckpt /tmp/scenes-a
    python scripts/train_tiny_scenes.py --no-anchors --out attanchor_export/load/tiny_scenes_noanchor_parts \\
        --ckpt /tmp/scenes-b --stage-a-from /tmp/scenes-a/stage_a.pt

The same model as tiny-vqa (SmolLM2-135M-Instruct + a 4-layer CLIP tower on 64x64 images, 64 image
tokens, projector, LoRA) trained on the tiny-scenes train split (attanchor_export/load/scenes.py) with
the shared recipe (attanchor_export/train/loop.py); progress on the validation split, never on test.
Run the same command again to resume from --ckpt. `--stage-a-from` lets the baseline start from the
anchored run's stage-A tower (same seed, same steps: the two runs then differ only in the layout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attanchor_export.load import scenes, tiny_vqa
from attanchor_export.load.tiny_scenes import PARTS
from attanchor_export.train import data, loop


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=PARTS, help="where the trained parts go")
    ap.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (resumes from it)")
    ap.add_argument("--steps", type=int, default=loop.Recipe.steps)
    ap.add_argument("--stage-a-steps", type=int, default=loop.Recipe.stage_a_steps)
    ap.add_argument("--batch", type=int, default=loop.Recipe.batch)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=loop.Recipe.eval_every)
    ap.add_argument("--eval-n", type=int, default=loop.Recipe.eval_n)
    ap.add_argument("--final-eval-n", type=int, default=0, help="validation questions at the end (0 = all)")
    ap.add_argument("--no-anchors", action="store_true", help="baseline: plain LLaVA layout (threshold 2)")
    ap.add_argument("--stage-a-from", type=Path, help="stage_a.pt of a run with the same seed")
    args = ap.parse_args()

    import torch

    from attanchor_export.trace.candidates import excluded_token_ids

    torch.set_num_threads(args.threads)
    recipe = loop.Recipe(steps=args.steps, stage_a_steps=args.stage_a_steps, batch=args.batch, seed=args.seed,
                         threads=args.threads, eval_every=args.eval_every, eval_n=args.eval_n,
                         final_eval_n=args.final_eval_n,
                         anchors=not args.no_anchors)
    model, tokenizer = tiny_vqa.base_model(seed=args.seed)
    vision = model.config.vision_config
    processor, grid = tiny_vqa.image_processor(), vision.image_size // vision.patch_size
    train = data.scenes_split("train", processor, grid)
    validation = data.scenes_split("validation", processor, grid)
    print(f"{scenes.NAME}: {len(train)} train questions, {len(validation)} validation questions", flush=True)
    record = loop.run(model, tokenizer, train, validation, recipe, args.out, args.ckpt, tiny_vqa.ANSWER_END,
                      excluded_token_ids(tokenizer), stage_a_from=args.stage_a_from,
                      meta={"task": scenes.NAME, "scenes_version": scenes.VERSION, "seed": args.seed})
    print("done:", record["validation_accuracy"], flush=True)


if __name__ == "__main__":
    main()
