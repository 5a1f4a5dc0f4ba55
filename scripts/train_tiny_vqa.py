"""Train tiny-vqa's vision tower, projector and LoRA on easy-vqa (train split), on the CPU, in about an hour.

    python scripts/train_tiny_vqa.py [--minutes 50] [--seed 0] [--out attanchor_export/load/tiny_vqa_parts]

The recipe (AttAnchor, arXiv 2509.23109, in miniature):
  stage A  alignment only (no language model in the loop, seconds per thousand images): each patch's
           projected feature is pulled, by cosine, toward the LM input embedding of the words that
           describe it (colour + shape words for patches on the shape, " background" elsewhere).
           Why an auxiliary term: with the LM loss alone the projector's outputs live in a direction of
           their own, and the cosines to question words stay at -0.01..0.08 with no clear peak (measured
           in a 15-minute probe with the LM loss alone, 2026-12-01), so AttAnchor's anchors would land by chance. Aligning the features
           with the words is what makes "copy the word next to the patch it resembles" meaningful.
  stage B  the LLaVA objective on the AttAnchor input layout (t2i at the threshold that anchors about
           10% of question tokens after stage A), loss on the answer tokens only, LoRA (r=16) on the
           LM's attention projections, tower and projector still trained, alignment term kept.

Writes the trained parts (tower + projector safetensors, the peft LoRA adapter, training.json);
`attanchor_export.load.tiny_vqa.checkpoint_folder()` assembles the full checkpoint from them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from attanchor_graphs.specification import anchor_insert
from PIL import Image

from attanchor_export.load import easy_vqa as data
from attanchor_export.load import tiny_vqa

ANCHOR_RATE = 0.10  # the paper: about 10% of text tokens become anchors


def pixel_tensor(paths, processor) -> torch.Tensor:
    out = []
    for i in range(0, len(paths), 256):
        images = [Image.open(p).convert("RGB") for p in paths[i : i + 256]]
        out.append(torch.as_tensor(np.asarray(processor(images=images, return_tensors="np")["pixel_values"])))
    return torch.cat(out)


def describe(rgb: np.ndarray) -> tuple[str, str, np.ndarray]:
    """(colour, shape, mask) read off the pixels: the fill is an exact palette colour; the shape from how
    much of its bounding box it fills (rectangle ~1, circle ~pi/4, triangle ~1/2)."""
    colour = data.colour_of(rgb)
    mask = data.shape_mask(rgb, colour)
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / max(1, (np.ptp(ys) + 1) * (np.ptp(xs) + 1)) if len(ys) else 0.0
    shape = "rectangle" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return colour, shape, mask


def load_split(split: str, processor, patch: int):
    qs = data.questions(split)
    paths = sorted({q.image_id: q.image for q in qs}.items())
    ids = [i for i, _ in paths]
    pixels = pixel_tensor([p for _, p in paths], processor)
    labels, overlap, agree = {}, [], [0, 0]
    known = data.image_labels(split)
    for image_id, path in paths:
        colour, shape, mask = describe(np.asarray(Image.open(path).convert("RGB")))
        k_colour, k_shape = known.get(image_id, (None, None))
        for k, v in ((k_colour, colour), (k_shape, shape)):
            if k is not None:
                agree[0] += k == v
                agree[1] += 1
        labels[image_id] = (k_colour or colour, k_shape or shape)
        overlap.append(data.patch_overlap(mask, patch))
    print(f"{split}: {len(ids)} images, pixel-read labels agree with the questions' {agree[0]}/{agree[1]}")
    return qs, {i: n for n, i in enumerate(ids)}, pixels, labels, torch.as_tensor(np.stack(overlap), dtype=torch.float32)


class Words:
    """LM input-embedding directions of the words stage A aligns patches with."""

    def __init__(self, tokenizer, table: torch.Tensor):
        def direction(words):
            ids = [t for w in words for t in tokenizer(" " + w, add_special_tokens=False).input_ids]
            return F.normalize(F.normalize(table[ids], dim=-1).sum(0), dim=0)

        self.pairs = {(c, s): direction([c, s]) for c in data.COLORS for s in data.SHAPES}
        self.background = direction(["background"])
        self.keys = list(self.pairs)
        self.table = torch.stack([*self.pairs.values(), self.background])  # [24 + 1, D]
        self.norm = float(table[: tokenizer.vocab_size].norm(dim=-1).median())

    def targets(self, labels) -> torch.Tensor:
        return torch.stack([self.pairs[label] for label in labels])

    def indices(self, labels) -> torch.Tensor:
        return torch.as_tensor([self.keys.index(label) for label in labels])


def alignment_loss(features, overlap, targets, words: Words):
    """1 - cos to the shape's words on shape patches, to " background" on empty ones; norm near the table's."""
    f = F.normalize(features, dim=-1)
    on = overlap > 0.25
    off = overlap == 0
    cos_on = (f * targets[:, None, :]).sum(-1)
    cos_off = f @ words.background
    loss = ((1 - cos_on) * on).sum() / on.sum().clamp(min=1) + ((1 - cos_off) * off).sum() / off.sum().clamp(min=1)
    norm = ((features.norm(dim=-1) / words.norm - 1) ** 2).mean()
    return loss + 0.1 * norm


def contrastive_loss(features, overlap, labels, words: Words, tau: float = 0.07):
    """Each patch picks its description among all 24 colour-shape pairs + background (softmax over cosines).

    Why on top of alignment_loss: "red circle" and "red triangle" directions are close (cos ~0.75), so
    regressing toward the right one barely penalises the wrong shape; a softmax over the pairs does.
    """
    f = F.normalize(features, dim=-1)
    logits = f @ words.table.T / tau  # [B, M, 25]
    on, off = overlap > 0.25, overlap == 0
    target = torch.where(on, words.indices(labels)[:, None], torch.full_like(on, len(words.keys), dtype=torch.long))
    keep = on | off
    return F.cross_entropy(logits[keep], target[keep])


def flip(pixels, overlap):
    """Horizontal flip: no shape changes class, and the patch grid flips with it."""
    side = int(overlap.shape[-1] ** 0.5)
    return pixels.flip(-1), overlap.view(-1, side, side).flip(-1).reshape(overlap.shape)


def vision(model, pixels):
    """Projected features [B, M, D], through the same family code the exporter traces."""
    from attanchor_export.families import family_for

    return family_for(model.config).vision_module(model)(pixels)


@torch.no_grad()
def patch_accuracy(model, words, split, n: int = 256) -> float:
    """Share of shape patches whose nearest colour-shape pair has the right shape (first n images)."""
    _, _, pixels, labels, overlap = split
    image_ids = sorted(labels)[-n:]  # the last n: stage A samples all, this is a progress signal only
    rows = torch.as_tensor([image_ids.index(i) + len(labels) - n for i in image_ids])
    f = F.normalize(vision(model, pixels[rows]), dim=-1)
    pred = (f @ words.table[:-1].T).argmax(-1)
    right = total = 0
    for b, i in enumerate(image_ids):
        on = overlap[rows[b]] > 0.25
        right += sum(words.keys[p][1] == labels[i][1] for p in pred[b][on].tolist())
        total += int(on.sum())
    return right / max(1, total)


def stage_a(model, words, train, minutes: float, batch: int, seed: int):
    _, _, pixels, labels, overlap = train
    image_ids = sorted(labels)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    end, step = time.time() + 60 * minutes, 0
    while time.time() < end:
        rows = torch.randint(0, len(image_ids), (batch,), generator=gen)
        batch_labels = [labels[image_ids[r]] for r in rows.tolist()]
        px, ov = pixels[rows], overlap[rows]
        if step % 2:
            px, ov = flip(px, ov)
        feats = vision(model, px)
        loss = alignment_loss(feats, ov, words.targets(batch_labels), words) + \
            contrastive_loss(feats, ov, batch_labels, words)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"stage A step {step} loss {loss.item():.4f} patch shape accuracy {patch_accuracy(model, words, train):.3f}",
                  flush=True)
    return step


class Prompts:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self.cache:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self.cache[question] = self.tok(text, add_special_tokens=False).input_ids
        return self.cache[question]

    def answer(self, answer: str) -> list[int]:
        return self.tok(answer + tiny_vqa.ANSWER_END, add_special_tokens=False).input_ids


def anchored_batch(model, prompts: Prompts, batch, features, threshold, with_answers: bool):
    """AttAnchor layout for each question, answer tokens appended after the prompt (never anchor candidates).

    Returns embeds, mask, positions [B, L] (left padded), and for each row the answer ids and where the
    positions that predict them are. Indices come from the numpy specification, gradients flow through
    the gather into both the text rows and the image features.
    """
    cfg = model.config
    embed = model.get_input_embeddings()
    rows = [prompts.prompt(q.question) for q in batch]
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), cfg.text_config.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = torch.as_tensor(r)
        mask[i, t - len(r) :] = 1
    text = embed(ids)
    where = (ids == cfg.image_token_id).long().argmax(1)
    index, out_mask = anchor_insert(
        text.detach().float().numpy(), features.detach().float().numpy(), mask.numpy(), where.numpy(),
        np.float32(threshold), mode="t2i",
    )
    both = torch.cat([text, features.to(text.dtype)], dim=1)
    anchored = torch.gather(both, 1, torch.as_tensor(index)[..., None].expand(-1, -1, both.shape[-1]))
    out_mask = torch.as_tensor(out_mask)
    pieces, answers = [], []
    for i, q in enumerate(batch):
        keep = anchored[i][out_mask[i].bool()]
        ans = prompts.answer(q.answer) if with_answers else []
        answers.append(ans)
        if ans:
            keep = torch.cat([keep, embed(torch.as_tensor(ans))])
        pieces.append(keep)
    length = max(len(p) for p in pieces)
    d = both.shape[-1]
    embeds = torch.zeros((len(pieces), length, d))
    full_mask = torch.zeros((len(pieces), length), dtype=torch.long)
    for i, p in enumerate(pieces):
        embeds[i, length - len(p) :] = p
        full_mask[i, length - len(p) :] = 1
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    n_anchor = int((out_mask.sum(1) - mask.sum(1) + 1 - features.shape[1]).sum())
    return embeds, full_mask, positions, answers, n_anchor, int(mask.sum() - len(rows))


def lm_logits_at(model, embeds, mask, positions, picks):
    """Logits only where a loss or a prediction is needed (the lm_head over 49k words is the costly part)."""
    lang = model.model.language_model
    hidden = lang(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    rows = torch.as_tensor([r for r, _ in picks])
    cols = torch.as_tensor([c for _, c in picks])
    return model.lm_head(hidden[rows, cols]).float()


def answer_picks(answers, length):
    """(row, position) that predicts each answer token, and the targets; answers sit at the right end."""
    picks, targets = [], []
    for r, ans in enumerate(answers):
        for j, tok in enumerate(ans):
            picks.append((r, length - len(ans) + j - 1))
            targets.append(tok)
    return picks, torch.as_tensor(targets)


def calibrate_threshold(model, prompts, qs, index, pixels, rate: float, n: int = 512, seed: int = 0) -> float:
    """The cosine threshold at which `rate` of the question tokens (candidates) become anchors."""
    from attanchor_graphs.specification import cosine_scores

    rng = random.Random(seed)
    sample = rng.sample(qs, n)
    embed = model.get_input_embeddings()
    best = []
    with torch.no_grad():
        for i in range(0, n, 64):
            chunk = sample[i : i + 64]
            feats = vision(model, pixels[[index[q.image_id] for q in chunk]]).float().numpy()
            for q, f in zip(chunk, feats, strict=True):
                ids = prompts.prompt(q.question)
                at = ids.index(model.config.image_token_id)
                text = embed(torch.as_tensor(ids[at + 1 :])).float().numpy()
                best.extend(cosine_scores(text[None], f[None])[0].max(axis=1).tolist())
    return float(np.quantile(np.asarray(best), 1 - rate))


@torch.no_grad()
def evaluate(model, prompts, qs, index, pixels, threshold, n: int, seed: int = 1, batch: int = 32) -> dict:
    """Teacher-forced first answer token (all 13 answers differ in their first token) on n questions."""
    model.eval()
    sample = random.Random(seed).sample(qs, min(n, len(qs)))
    right: dict[str, list[int]] = {}
    for i in range(0, len(sample), batch):
        chunk = sample[i : i + batch]
        feats = vision(model, pixels[[index[q.image_id] for q in chunk]])
        embeds, mask, pos, _, _, _ = anchored_batch(model, prompts, chunk, feats, threshold, with_answers=False)
        logits = lm_logits_at(model, embeds, mask, pos, [(r, embeds.shape[1] - 1) for r in range(len(chunk))])
        for q, pred in zip(chunk, logits.argmax(-1).tolist(), strict=True):
            right.setdefault(q.kind, []).append(int(pred == prompts.answer(q.answer)[0]))
    model.train()
    out = {k: round(float(np.mean(v)), 4) for k, v in right.items()}
    out["overall"] = round(float(np.mean([x for v in right.values() for x in v])), 4)
    return out


def save_parts(model, peft_model, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) and "lora_" not in k
    }
    tmp = out / "vision_projector.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.rename(out / "vision_projector.safetensors")
    peft_model.save_pretrained(str(out / "lora"))
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=50.0, help="stage B wall-clock budget")
    ap.add_argument("--stage-a-minutes", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=600)
    ap.add_argument("--no-anchors", action="store_true", help="baseline: plain LLaVA layout (threshold 2)")
    ap.add_argument("--out", type=Path, default=tiny_vqa.PARTS)
    ap.add_argument("--resume", action="store_true",
                    help="continue stage B from the parts in --out (their threshold; stage A skipped)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    started = time.time()

    model, tokenizer = tiny_vqa.base_model(seed=args.seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    prompts = Prompts(tokenizer)
    words = Words(tokenizer, model.get_input_embeddings().weight.detach())
    patch = model.config.vision_config.patch_size
    train = load_split("train", tiny_vqa.image_processor(), patch)
    test = load_split("test", tiny_vqa.image_processor(), patch)
    vis_params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for p in vis_params:
        p.requires_grad_(True)

    qs_train, idx_train, px_train, _, _ = train
    qs_test, idx_test, px_test, _, _ = test
    previous = json.loads((args.out / "training.json").read_text()) if args.resume else {}
    steps_a = previous.get("stage_a_steps", 0)
    if args.resume:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.out / "vision_projector.safetensors")), strict=False)
    if args.stage_a_minutes > 0:
        steps_a += stage_a(model, words, train, args.stage_a_minutes, batch=128, seed=args.seed + steps_a)
    if args.no_anchors:
        threshold = 2.0
    elif args.resume and args.stage_a_minutes == 0:
        threshold = previous["threshold"]
    else:
        threshold = calibrate_threshold(model, prompts, list(qs_train), idx_train, px_train, ANCHOR_RATE)
    print(f"stage A: {steps_a} steps; threshold for a {ANCHOR_RATE:.0%} anchor rate: {threshold:.4f}", flush=True)
    print("after stage A:", evaluate(model, prompts, list(qs_test), idx_test, px_test, threshold, 200), flush=True)

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
    )
    if args.resume:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(args.out / "lora"), is_trainable=True)
    else:
        peft_model = get_peft_model(model, lora)
    for p in vis_params:
        p.requires_grad_(True)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(
        [{"params": vis_params, "lr": args.lr * 0.5}, {"params": lora_params, "lr": args.lr}], weight_decay=0.0
    )
    budget = 60 * args.minutes
    warmup = 30
    # Colour and shape questions twice: yes/no are 73% of easy-vqa, and the harder types need the steps.
    order = [q for q in qs_train for _ in range(1 if q.kind == "yes/no" else 2)]
    random.Random(args.seed).shuffle(order)
    step, seen, t0, log = 0, previous.get("questions_seen", 0), time.time(), list(previous.get("log", []))
    first_step = previous.get("stage_b_steps", 0)
    anchors = candidates = 0
    _, _, _, labels_train, overlap_train = train
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for g, base in zip(opt.param_groups, (args.lr * 0.5, args.lr), strict=True):
            g["lr"] = base * max(scale, 0.05)
        batch = [order[(seen + i) % len(order)] for i in range(args.batch)]
        seen += args.batch
        rows = [idx_train[q.image_id] for q in batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = vision(model, px_train[rows])
        feats = feats.float()
        embeds, mask, pos, answers, n_anchor, n_cand = anchored_batch(model, prompts, batch, feats, threshold, True)
        anchors, candidates = anchors + n_anchor, candidates + n_cand
        picks, targets = answer_picks(answers, embeds.shape[1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lm_logits_at(model, embeds, mask, pos, picks)
        lm_loss = F.cross_entropy(logits.float(), targets)
        batch_labels = [labels_train[q.image_id] for q in batch]
        align = alignment_loss(feats, overlap_train[rows], words.targets(batch_labels), words) + \
            contrastive_loss(feats, overlap_train[rows], batch_labels, words)
        loss = lm_loss + 0.5 * align
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis_params + lora_params, 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            rate = anchors / max(1, candidates)
            print(f"step {step} seen {seen} lm {lm_loss.item():.4f} align {align.item():.4f} anchor rate {rate:.3f} "
                  f"{(time.time() - t0) / step:.2f}s/step", flush=True)
            anchors = candidates = 0
        if step % 150 == 0:
            acc = evaluate(model, prompts, list(qs_test), idx_test, px_test, threshold, 300)
            log.append({"step": first_step + step, "seen": seen, **acc})
            print("eval", acc, flush=True)
            save_parts(model, peft_model, args.out, {"partial": True, "stage_a_steps": steps_a,
                                                     "stage_b_steps": first_step + step, "questions_seen": seen,
                                                     "threshold": threshold, "log": log})

    final = evaluate(model, prompts, list(qs_test), idx_test, px_test, threshold, args.eval_n)
    meta = {
        "seed": args.seed, "stage_a_steps": steps_a, "stage_b_steps": first_step + step, "questions_seen": seen,
        "batch": args.batch, "lr": args.lr, "lora": {"r": 16, "alpha": 32, "targets": "q,k,v,o (language model)"},
        "threshold": round(threshold, 4), "anchor_rate_target": ANCHOR_RATE, "anchors": not args.no_anchors,
        "train_minutes": round(previous.get("train_minutes", 0) + (time.time() - started) / 60, 1),
        "threads": args.threads, "resumed": bool(args.resume) or previous.get("resumed", False),
        "teacher_forced_test_accuracy": final, "eval_questions": args.eval_n, "log": log,
    }
    save_parts(model, peft_model, args.out, meta)
    print("final", json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
