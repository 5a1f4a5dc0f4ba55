"""The shared training code: the anchored layout it trains on, and a run that stops and resumes.

The layout must be what the exported embedding graph computes (AnchorInsert version 2 with the same
excluded ids) with the answer appended; the run uses a tiny random checkpoint (seconds, not minutes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from attanchor_graphs.specification import anchor_insert, candidate_mask_from_ids, position_ids_from_mask

from attanchor_export.train.layout import anchored_layout, answer_slots


def _embed(vocab=50, dim=6, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(vocab, dim)


@pytest.mark.parametrize("threshold", [-1.0, 0.2, 2.0])
def test_layout_is_the_graph_layout_with_the_answer_appended(threshold):
    embed = _embed()
    image, pad, excluded = 40, 41, [1, 2, 3]  # 1..3: "special" ids, never anchors
    prompts = [[1, 5, image, 6, 2, 7, 3], [image, 8, 9, 2]]
    answers = [[10, 2], [11, 12, 2]]
    feats = torch.randn(2, 4, 6)
    layout = anchored_layout(embed, prompts, answers, feats, threshold, image, pad, excluded)
    # The prompt part of each row is AnchorInsert v2 on the prompt alone; then the answer embeddings.
    for r, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids = np.asarray([prompt])
        text = embed(torch.as_tensor(ids)).detach().numpy()
        gi, om = anchor_insert(text, feats[r : r + 1].numpy(), np.ones_like(ids), np.array([prompt.index(image)]),
                               np.float32(threshold), candidate_mask=candidate_mask_from_ids(ids, excluded))
        both = np.concatenate([text, feats[r : r + 1].numpy()], 1)[0]
        want = np.concatenate([both[gi[0]], embed(torch.as_tensor(answer)).detach().numpy()])
        row = layout.embeds[r][layout.mask[r].bool()].detach().numpy()
        np.testing.assert_allclose(row, want, rtol=0, atol=0)
    assert torch.equal(layout.positions, torch.from_numpy(position_ids_from_mask(layout.mask.numpy())))
    # Every answer token is predicted from the slot before it.
    rows, cols, targets = answer_slots(layout)
    assert targets.tolist() == [10, 2, 11, 12, 2]
    assert rows.tolist() == [0, 0, 1, 1, 1]
    length = layout.embeds.shape[1]
    assert cols.tolist() == [length - 3, length - 2, length - 4, length - 3, length - 2]
    if threshold == -1.0:  # every word after the image anchored: 6, 7 and 8, 9; never 1, 2, 3 or the answers
        assert layout.anchors == 4 and layout.candidates == 4
    if threshold == 2.0:
        assert layout.anchors == 0


def test_a_run_checkpoints_and_resumes(checkpoint, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from attanchor_export.trace.candidates import excluded_token_ids
    from attanchor_export.train import data, loop

    folder = checkpoint("siglip-qwen2")
    tok = AutoTokenizer.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)

    def fresh():
        return LlavaForConditionalGeneration.from_pretrained(folder)

    model = fresh()
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    train = data.scenes_split("train", processor, grid, limit=40)
    validation = data.scenes_split("validation", processor, grid, limit=8)
    assert train.labels.shape == (40, grid * grid) and (train.labels >= 0).any()
    recipe = loop.Recipe(steps=3, batch=4, stage_a_steps=2, stage_a_batch=8, eval_every=2, eval_n=8,
                         final_eval_n=8, checkpoint_minutes=0.0, warmup=1, threads=1, stage_a_bf16=True)
    ckpt, parts = tmp_path / "ckpt", tmp_path / "parts"
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.multi_modal_projector")}
    record = loop.run(model, tok, train, validation, recipe, parts, ckpt, tok.eos_token, excluded_token_ids(tok))
    assert (ckpt / "stage_a.pt").is_file() and (ckpt / "state.pt").is_file()
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["stage"] == "B" and state["step"] == 3
    assert record["log"] and record["log"][0]["step"] == 2 and record["validation_accuracy"]["questions"] == 8
    assert 0.0 < record["threshold"] < 1.0 and record["anchors"] is True
    saved = json.loads((parts / "training.json").read_text())
    assert saved["recipe"]["steps"] == 3
    assert (parts / "lora" / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    trained = load_file(str(parts / "vision_projector.safetensors"))
    assert any(not torch.equal(trained[k], v) for k, v in before.items())  # the projector was trained

    # Same command with more steps: resumes at step 3 (stage A not run again) and runs one more.
    capsys.readouterr()
    recipe.steps = 4
    loop.run(fresh(), tok, train, validation, recipe, parts, ckpt, tok.eos_token, excluded_token_ids(tok))
    out = capsys.readouterr().out
    assert "stage A step" not in out and "validation before stage B" not in out
    assert torch.load(ckpt / "state.pt", weights_only=False)["step"] == 4

    # The baseline: no anchors at all, same code path.
    baseline = loop.run(fresh(), tok, train, validation, loop.Recipe(**{**recipe.__dict__, "anchors": False}),
                        tmp_path / "parts-b", tmp_path / "ckpt-b", tok.eos_token, excluded_token_ids(tok),
                        stage_a_from=ckpt / "stage_a.pt")
    assert baseline["threshold"] == loop.NO_ANCHORS and baseline["validation_accuracy"]["anchor_rate"] == 0.0


def test_training_scripts_share_one_option_set(tmp_path):
    from attanchor_export.train import cli

    ap = cli.parser("Train something.\n", tmp_path / "parts")
    args = ap.parse_args(["--ckpt", str(tmp_path / "c"), "--steps", "5", "--no-anchors", "--seed", "3"])
    recipe = cli.recipe(args, kind_weights={"color": 2})
    assert (recipe.steps, recipe.anchors, recipe.seed, recipe.stage_a_bf16) == (5, False, 3, True)
    assert recipe.kind_weights == {"color": 2} and args.out == tmp_path / "parts"
    fp32 = cli.recipe(ap.parse_args(["--ckpt", "c", "--stage-a-fp32"]))
    assert fp32.stage_a_bf16 is False and fp32.anchors is True
    mixed = cli.recipe(ap.parse_args(["--ckpt", "c", "--kind-weight", "color=1", "--kind-weight", "yes/no=3"]),
                       kind_weights={"color": 2, "shape": 2})
    assert mixed.kind_weights == {"color": 1, "shape": 2, "yes/no": 3}
    with pytest.raises(SystemExit, match="KIND=N"):
        cli.recipe(ap.parse_args(["--ckpt", "c", "--kind-weight", "color"]))
    with pytest.raises(SystemExit):  # --ckpt is required: a run always has somewhere to resume from
        ap.parse_args([])


def test_training_never_reads_a_test_split():
    from attanchor_export.train import data

    with pytest.raises(ValueError, match="never reads the test split"):
        data.scenes_split("test", None, 8)
