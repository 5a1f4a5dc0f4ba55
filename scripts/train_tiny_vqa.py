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

from attanchor_export.load import tiny_vqa
from attanchor_export.train import cli, data, loop


def main():
    args = cli.parser(__doc__, tiny_vqa.PARTS).parse_args()

    import torch

    from attanchor_export.trace.candidates import excluded_token_ids

    torch.set_num_threads(args.threads)
    # Colour and shape questions twice: yes/no are 73% of easy-vqa, and the harder kinds need the steps.
    recipe = cli.recipe(args, kind_weights={"color": 2, "shape": 2})
    model, tokenizer = tiny_vqa.base_model(seed=args.seed)
    train, validation = data.easy_vqa_splits(tiny_vqa.image_processor(), model.config.vision_config.patch_size,
                                             seed=args.seed)
    record = loop.run(model, tokenizer, train, validation, recipe, args.out, args.ckpt, tiny_vqa.ANSWER_END,
                      excluded_token_ids(tokenizer), init_parts=args.init_parts, stage_a_from=args.stage_a_from,
                      meta={"task": "easy-vqa", "seed": args.seed})
    print("done:", record["validation_accuracy"], flush=True)


if __name__ == "__main__":
    main()
