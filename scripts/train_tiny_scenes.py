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

from attanchor_export.load import scenes, tiny_vqa
from attanchor_export.load.tiny_scenes import PARTS
from attanchor_export.train import cli, data, loop


def main():
    args = cli.parser(__doc__, PARTS).parse_args()

    import torch

    from attanchor_export.trace.candidates import excluded_token_ids

    torch.set_num_threads(args.threads)
    recipe = cli.recipe(args)
    model, tokenizer = tiny_vqa.base_model(seed=args.seed)
    vision = model.config.vision_config
    processor, grid = tiny_vqa.image_processor(), vision.image_size // vision.patch_size
    train = data.scenes_split("train", processor, grid)
    validation = data.scenes_split("validation", processor, grid)
    print(f"{scenes.NAME}: {len(train)} train questions, {len(validation)} validation questions", flush=True)
    record = loop.run(model, tokenizer, train, validation, recipe, args.out, args.ckpt, tiny_vqa.ANSWER_END,
                      excluded_token_ids(tokenizer), init_parts=args.init_parts, stage_a_from=args.stage_a_from,
                      meta={"task": scenes.NAME, "scenes_version": scenes.VERSION, "seed": args.seed})
    print("done:", record["validation_accuracy"], flush=True)


if __name__ == "__main__":
    main()
