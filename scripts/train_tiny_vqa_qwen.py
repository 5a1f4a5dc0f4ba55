"""Train tiny-vqa-qwen's vision tower, merger and LoRA on easy-vqa (train split), on the CPU.

    python scripts/train_tiny_vqa_qwen.py --ckpt /tmp/issue-22/tiny-vqa-qwen [--steps 600] [--seed 0] \\
        [--out attanchor_export/load/tiny_vqa_qwen_parts]

The model is attanchor_export/load/tiny_vqa_qwen.py (SmolLM2-135M as a Qwen2 text model + a 4-block
Qwen2.5-VL tower, 224x224 images, 64 merged image tokens); the recipe is the shared one
(attanchor_export/train/loop.py: stage A patch/word alignment, stage B the LM loss over the anchored
layout with words-only candidates and LoRA), with 3-D M-RoPE positions under anchors
(attanchor_export/train/qwen2_5_vl.py). Validation: a seeded 10% of easy-vqa's TRAIN images; the test
split is never read. Run the same command again to resume from --ckpt.
"""

from __future__ import annotations

from attanchor_export.load import tiny_vqa_qwen
from attanchor_export.train import cli, data, loop


def main():
    ap = cli.parser(__doc__, tiny_vqa_qwen.PARTS)
    ap.add_argument("--limit-images", type=int, help="train on the first N images only (a smoke run)")
    args = ap.parse_args()

    import torch
    from attanchor_runtime.families.qwen2_5_vl import ImageGrid

    from attanchor_export.trace.candidates import excluded_token_ids
    from attanchor_export.train.qwen2_5_vl import TrainPixels, qwen_family

    torch.set_num_threads(args.threads)
    # Colour and shape questions twice, as tiny-vqa: yes/no are 73% of easy-vqa.
    recipe = cli.recipe(args, kind_weights={"color": 2, "shape": 2})
    model, tokenizer = tiny_vqa_qwen.base_model(seed=args.seed)
    vision = model.config.vision_config
    size = tiny_vqa_qwen.IMAGE_SIZE
    grid = ImageGrid(size, size, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size,
                     vision.in_channels)
    rows, _ = grid.merged_hw
    # Patch labels on easy-vqa's 64x64 pictures: one label per merged token, 64 / rows pixels a side.
    train, validation = data.easy_vqa_splits(TrainPixels(grid, tiny_vqa_qwen.image_processor()), 64 // rows,
                                             seed=args.seed)
    if args.limit_images:
        keep = {q.image_id for q in train.questions[: args.limit_images * 10]}
        train.questions = [q for q in train.questions if q.image_id in keep]
    record = loop.run(model, tokenizer, train, validation, recipe, args.out, args.ckpt, tiny_vqa_qwen.ANSWER_END,
                      excluded_token_ids(tokenizer), family=qwen_family(grid, model.config.image_token_id),
                      init_parts=args.init_parts, stage_a_from=args.stage_a_from,
                      meta={"task": "easy-vqa", "seed": args.seed, "model": tiny_vqa_qwen.NAME,
                            "image_size": [size, size]})
    print("done:", record["validation_accuracy"], flush=True)


if __name__ == "__main__":
    main()
