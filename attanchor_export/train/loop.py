"""The tiny models' training recipe (AttAnchor, arXiv 2509.23109, in miniature), resumable.

  stage A  alignment only (no language model in the loop): each patch's projected feature is pulled,
           by cosine, toward the LM input embedding of the words that describe it (colour + shape of
           the item on it, " background" elsewhere), plus a softmax over all (colour, shape) pairs +
           background. Why: with the LM loss alone the projector's outputs live in a direction of
           their own and cosines to question words stay near 0 with no peak, so anchors would land by
           chance; aligning features with words is what makes "copy the word next to the patch it
           resembles" meaningful. The softmax term separates "red circle" from "red triangle" (cos
           ~0.75 apart), which cosine regression alone barely does.
  stage B  the LLaVA objective on the AttAnchor layout (attanchor_export.train.layout: t2i, words-only
           candidates, threshold recalibrated to the anchor rate as the features move; threshold 2 =
           no anchors for a baseline), cross-entropy on the answer tokens only, LoRA on the LM's
           attention projections, tower and projector still trained (half the LR), alignment kept.

A run is a fixed number of steps (the LR schedule follows the step, not the clock), so two runs of one
recipe differ only in what they are asked to differ in. Every `checkpoint_minutes` the trainable
tensors, the optimizer and the log go to CKPT/state.pt (atomically); the same command resumes there.
Progress is measured on the VALIDATION split (teacher-forced first answer token; every answer of both
tasks starts with its own token); the final weights are the last step's, never chosen on test data.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attanchor_export.train.data import IGNORE, TaskData
from attanchor_export.train.layout import Layout, anchored_layout, answer_slots, sequential_positions

NO_ANCHORS = 2.0  # a cosine never reaches it: the plain LLaVA layout


@dataclass
class Recipe:
    steps: int = 600  # stage B
    batch: int = 16
    lr: float = 5e-4
    stage_a_steps: int = 300
    stage_a_batch: int = 128
    stage_a_lr: float = 1e-3
    stage_a_bf16: bool = False  # bf16 autocast in stage A (stage B always uses it): ~3.5x faster on AMX CPUs
    align_weight: float = 0.5
    anchors: bool = True
    anchor_rate: float = 0.10  # the paper: about 10% of text tokens become anchors
    lora_r: int = 16
    lora_alpha: int = 32
    warmup: int = 30
    seed: int = 0
    threads: int = 2
    eval_every: int = 100
    eval_n: int = 300
    final_eval_n: int = 0  # 0 = the whole validation split
    checkpoint_minutes: float = 5.0
    kind_weights: dict = field(default_factory=dict)  # e.g. {"color": 2}: sample those questions twice


@dataclass(frozen=True)
class Family:
    """How training reaches into one model family (LLaVA here; a 3-D M-RoPE family brings its own)."""

    features: Callable  # (model, pixels [B,3,H,W]) -> [B, M, D]
    hidden: Callable  # (model, Layout) -> last hidden states [B, L, D]
    head: Callable  # (model, hidden rows [N, D]) -> logits [N, V]
    vision_modules: Callable  # model -> modules trained from scratch (tower, projector)
    positions: Callable[[Layout], torch.Tensor] = sequential_positions
    lora_targets: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    part_prefixes: tuple[str, ...] = ("model.vision_tower.", "model.multi_modal_projector.")  # what save_parts keeps


def _llava_features(model, pixels):
    from attanchor_export.families import family_for

    return family_for(model.config).vision_module(model)(pixels)


def _llava_hidden(model, layout: Layout):
    lang = model.model.language_model
    return lang(inputs_embeds=layout.embeds, attention_mask=layout.mask, position_ids=layout.positions).last_hidden_state


LLAVA = Family(
    features=_llava_features,
    hidden=_llava_hidden,
    head=lambda model, h: model.lm_head(h),
    vision_modules=lambda model: [model.model.vision_tower, model.model.multi_modal_projector],
)


class Words:
    """Unit directions, in the LM's input-embedding space, of every (colour, shape) pair and of " background"."""

    def __init__(self, tokenizer, table: torch.Tensor, pairs: list[tuple[str, str]]):
        def direction(words):
            ids = [t for w in words for t in tokenizer(" " + w, add_special_tokens=False).input_ids]
            return F.normalize(F.normalize(table[ids], dim=-1).sum(0), dim=0)

        self.table = torch.stack([*(direction(p) for p in pairs), direction(["background"])])  # [P + 1, D]
        self.norm = float(table[: tokenizer.vocab_size].norm(dim=-1).median())


def alignment_loss(features, labels, words: Words, tau: float = 0.07):
    """Cosine regression to each patch's words + softmax over pairs (tau) + norm near the table's rows."""
    f = F.normalize(features, dim=-1)
    keep = labels != IGNORE
    target = words.table[labels.clamp(min=0)]  # [B, M, D]
    regression = ((1 - (f * target).sum(-1)) * keep).sum() / keep.sum().clamp(min=1)
    logits = f @ words.table.T / tau
    contrastive = F.cross_entropy(logits[keep], labels[keep])
    norm = ((features.norm(dim=-1) / words.norm - 1) ** 2).mean()
    return regression + contrastive + 0.1 * norm


def flip(pixels, labels):
    """Horizontal flip with the patch grid (stage A only: no colour or shape changes, relations would)."""
    side = int(labels.shape[-1] ** 0.5)
    return pixels.flip(-1), labels.view(-1, side, side).flip(-1).reshape(labels.shape)


class Prompts:
    """Prompt ids through the checkpoint's own chat template (cached per question), answer ids + end of turn."""

    def __init__(self, tokenizer, answer_end: str):
        self.tok, self.end = tokenizer, answer_end
        self.cache: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self.cache:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self.cache[question] = self.tok(text, add_special_tokens=False).input_ids
        return self.cache[question]

    def answer(self, answer: str) -> list[int]:
        return self.tok(answer + self.end, add_special_tokens=False).input_ids


class Trainer:
    def __init__(self, model, tokenizer, train: TaskData, validation: TaskData, recipe: Recipe, answer_end: str,
                 excluded_token_ids, family: Family = LLAVA):
        self.model, self.tok, self.train, self.val, self.r, self.family = model, tokenizer, train, validation, recipe, family
        self.prompts = Prompts(tokenizer, answer_end)
        self.excluded = sorted(set(excluded_token_ids))
        self.words = Words(tokenizer, model.get_input_embeddings().weight.detach(), train.pairs)
        self.cfg = model.config
        self.threshold = NO_ANCHORS
        self.log: list[dict] = []
        # Stage A draws images of the train questions only (easy-vqa's validation images share the table).
        self.train_rows = torch.as_tensor(sorted({train.row[q.image_id] for q in train.questions}))

    # -- the layout -------------------------------------------------------------------------------
    def layout(self, questions, features, with_answers: bool) -> Layout:
        answers = [self.prompts.answer(q.answer) if with_answers else [] for q in questions]
        return anchored_layout(
            self.model.get_input_embeddings(), [self.prompts.prompt(q.question) for q in questions], answers,
            features, self.threshold, self.cfg.image_token_id, self.cfg.text_config.pad_token_id, self.excluded,
            positions=self.family.positions,
        )

    def pixels(self, data: TaskData, questions) -> torch.Tensor:
        return data.pixels[[data.row[q.image_id] for q in questions]]

    @torch.no_grad()
    def calibrate(self, n: int = 512) -> float:
        """The threshold at which `anchor_rate` of the candidates (words after the image) become anchors."""
        from attanchor_graphs.specification import cosine_scores

        sample = random.Random(self.r.seed).sample(self.train.questions, min(n, len(self.train.questions)))
        embed = self.model.get_input_embeddings()
        excluded = set(self.excluded)
        best = []
        for i in range(0, len(sample), 64):
            chunk = sample[i : i + 64]
            feats = self.family.features(self.model, self.pixels(self.train, chunk)).float().numpy()
            for q, f in zip(chunk, feats, strict=True):
                ids = self.prompts.prompt(q.question)
                after = [t for t in ids[ids.index(self.cfg.image_token_id) + 1 :] if t not in excluded]
                text = embed(torch.as_tensor(after)).float().numpy()
                best.extend(cosine_scores(text[None], f[None])[0].max(axis=1).tolist())
        return float(np.quantile(np.asarray(best), 1 - self.r.anchor_rate))

    @torch.no_grad()
    def evaluate(self, n: int, batch: int = 32) -> dict:
        """Validation accuracy (teacher-forced first answer token) per kind, and the anchor rate."""
        self.model.eval()
        qs = self.val.questions
        sample = random.Random(1).sample(qs, n) if 0 < n < len(qs) else list(qs)
        right: dict[str, list[int]] = {}
        anchors = candidates = 0
        for i in range(0, len(sample), batch):
            chunk = sample[i : i + batch]
            layout = self.layout(chunk, self.family.features(self.model, self.pixels(self.val, chunk)), False)
            anchors, candidates = anchors + layout.anchors, candidates + layout.candidates
            hidden = self.family.hidden(self.model, layout)[:, -1]
            pred = self.family.head(self.model, hidden).argmax(-1).tolist()
            for q, p in zip(chunk, pred, strict=True):
                right.setdefault(q.kind, []).append(int(p == self.prompts.answer(q.answer)[0]))
        self.model.train()
        out = {k: round(float(np.mean(v)), 4) for k, v in sorted(right.items())}
        out["overall"] = round(float(np.mean([x for v in right.values() for x in v])), 4)
        out["questions"] = len(sample)
        out["anchor_rate"] = round(anchors / max(1, candidates), 4)
        return out

    # -- stages ------------------------------------------------------------------------------------
    def vision_params(self):
        return [p for m in self.family.vision_modules(self.model) for p in m.parameters()]

    def stage_a_step(self, step: int, opt) -> float:
        gen = torch.Generator().manual_seed(self.r.seed * 1_000_003 + step)
        rows = self.train_rows[torch.randint(0, len(self.train_rows), (self.r.stage_a_batch,), generator=gen)]
        px, lab = self.train.pixels[rows], self.train.labels[rows]
        if step % 2:
            px, lab = flip(px, lab)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.r.stage_a_bf16):
            feats = self.family.features(self.model, px)
        loss = alignment_loss(feats.float(), lab, self.words)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def order(self) -> list:
        weights = self.r.kind_weights
        order = [q for q in self.train.questions for _ in range(int(weights.get(q.kind, 1)))]
        random.Random(self.r.seed).shuffle(order)
        return order

    def stage_b_step(self, batch, opt, groups) -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = self.family.features(self.model, self.pixels(self.train, batch))
        feats = feats.float()
        layout = self.layout(batch, feats, with_answers=True)
        rows, cols, targets = answer_slots(layout)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = self.family.hidden(self.model, layout)
            logits = self.family.head(self.model, hidden[rows, cols])
        lm = F.cross_entropy(logits.float(), targets)
        labels = self.train.labels[[self.train.row[q.image_id] for q in batch]]
        align = alignment_loss(feats, labels, self.words)
        loss = lm + self.r.align_weight * align
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g], 1.0)
        opt.step()
        return {"lm": lm.item(), "align": align.item(), "anchors": layout.anchors, "candidates": layout.candidates}


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, tensors: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint tensors not in the model: {missing[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def run(model, tokenizer, train: TaskData, validation: TaskData, recipe: Recipe, out: Path, ckpt: Path,
        answer_end: str, excluded_token_ids, family: Family = LLAVA, init_parts: Path | None = None,
        stage_a_from: Path | None = None, meta: dict | None = None) -> dict:
    """Train (or resume from ckpt/state.pt) and write the trained parts to `out`; returns training.json's dict.

    init_parts: start from an earlier run's parts (tower + projector + LoRA) instead of from scratch; a
    folder with lora/ only starts the LoRA there and trains the vision parts from scratch.
    stage_a_from: a stage_a.pt another run of the same seed wrote (two runs that differ only in stage B
    then start from the very same aligned tower and projector).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.set_num_threads(recipe.threads)
    ckpt.mkdir(parents=True, exist_ok=True)
    state_file, stage_a_file = ckpt / "state.pt", ckpt / "stage_a.pt"
    state = torch.load(state_file, weights_only=False) if state_file.is_file() else None
    trainer = Trainer(model, tokenizer, train, validation, recipe, answer_end, excluded_token_ids, family)
    started = time.time()
    minutes_before = state["minutes"] if state else 0.0
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    vision = trainer.vision_params()
    for p in vision:
        p.requires_grad_(True)

    if init_parts is not None and state is None and (init_parts / "vision_projector.safetensors").is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(init_parts / "vision_projector.safetensors")), strict=False)
    # ---- stage A: alignment -------------------------------------------------------------------------
    a_done = state["stage"] == "B" if state else False
    if not a_done and stage_a_from is not None:
        loaded = torch.load(stage_a_from, weights_only=False)
        _load_trainable(model, loaded["trainable"])
        a_done = True
        print(f"stage A taken from {stage_a_from} ({loaded['steps']} steps)", flush=True)
    if not a_done and recipe.stage_a_steps:
        opt = torch.optim.AdamW(vision, lr=recipe.stage_a_lr, weight_decay=0.01)
        first = 0
        if state and state["stage"] == "A":
            _load_trainable(model, state["trainable"])
            opt.load_state_dict(state["opt"])
            first = state["step"]
        last_save = time.time()
        for step in range(first, recipe.stage_a_steps):
            loss = trainer.stage_a_step(step, opt)
            if (step + 1) % 50 == 0:
                print(f"stage A step {step + 1}/{recipe.stage_a_steps} loss {loss:.4f}", flush=True)
            if time.time() - last_save > 60 * recipe.checkpoint_minutes:
                _save_state(state_file, {"stage": "A", "step": step + 1, "trainable": _trainable(model),
                                         "opt": opt.state_dict(), "minutes": minutes_before + (time.time() - started) / 60})
                last_save = time.time()
        _save_state(stage_a_file, {"steps": recipe.stage_a_steps, "trainable": _trainable(model)})

    # ---- stage B: the LM objective on the anchored layout -------------------------------------------
    if init_parts is not None and (init_parts / "lora" / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, str(init_parts / "lora"), is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                                                 target_modules=family.lora_targets))
    base = model.get_base_model()
    trainer.model = base
    for p in vision:
        p.requires_grad_(True)
    lora = [p for n, p in base.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW([{"params": vision, "lr": recipe.lr * 0.5}, {"params": lora, "lr": recipe.lr}],
                            weight_decay=0.0)
    first = 0
    if state and state["stage"] == "B":
        _load_trainable(base, state["trainable"])
        opt.load_state_dict(state["opt"])
        first, trainer.threshold, trainer.log = state["step"], state["threshold"], state["log"]
    else:
        trainer.threshold = trainer.calibrate() if recipe.anchors else NO_ANCHORS
        print(f"threshold {trainer.threshold:.4f}; validation before stage B:", trainer.evaluate(recipe.eval_n), flush=True)
    order = trainer.order()
    last_save, window = time.time(), {"lm": 0.0, "align": 0.0, "anchors": 0, "candidates": 0, "n": 0}
    for step in range(first, recipe.steps):
        scale = min(1.0, (step + 1) / recipe.warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * step / recipe.steps)))
        for g, lr in zip(opt.param_groups, (recipe.lr * 0.5, recipe.lr), strict=True):
            g["lr"] = lr * scale
        batch = [order[(step * recipe.batch + i) % len(order)] for i in range(recipe.batch)]
        t0 = time.time()
        stats = trainer.stage_b_step(batch, opt, (vision, lora))
        for k in ("lm", "align", "anchors", "candidates"):
            window[k] += stats[k]
        window["n"] += 1
        if (step + 1) % 20 == 0:
            n = window["n"]
            print(f"step {step + 1}/{recipe.steps} lm {window['lm'] / n:.4f} align {window['align'] / n:.4f} "
                  f"anchor rate {window['anchors'] / max(1, window['candidates']):.3f} {time.time() - t0:.2f}s/step",
                  flush=True)
            window = dict.fromkeys(window, 0)
            window["lm"] = window["align"] = 0.0
        if (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps:
            if recipe.anchors:  # keep the anchor rate where it was set as the features move
                trainer.threshold = trainer.calibrate()
            acc = trainer.evaluate(recipe.eval_n)
            trainer.log.append({"step": step + 1, "threshold": round(trainer.threshold, 4), **acc})
            print("validation", trainer.log[-1], flush=True)
        if time.time() - last_save > 60 * recipe.checkpoint_minutes or step + 1 == recipe.steps:
            _save_state(state_file, {"stage": "B", "step": step + 1, "trainable": _trainable(base),
                                     "opt": opt.state_dict(), "threshold": trainer.threshold, "log": trainer.log,
                                     "minutes": minutes_before + (time.time() - started) / 60})
            last_save = time.time()

    if recipe.anchors:
        trainer.threshold = trainer.calibrate()
    final = trainer.evaluate(recipe.final_eval_n)
    print("final validation", final, flush=True)
    record = {
        **(meta or {}), "recipe": asdict(recipe), "threshold": round(trainer.threshold, 4),
        "anchors": recipe.anchors, "excluded_token_ids": len(trainer.excluded),
        "train_questions": len(train), "validation_questions": len(validation),
        "validation_accuracy": final, "log": trainer.log,
        "train_minutes": round(minutes_before + (time.time() - started) / 60, 1),
        "init_parts": str(init_parts) if init_parts else None, "stage_a_from": str(stage_a_from) if stage_a_from else None,
    }
    save_parts(base, model, out, record, family.part_prefixes)
    return record


def save_parts(model, peft_model, out: Path, record: dict,
               prefixes: tuple[str, ...] = Family.part_prefixes) -> None:
    """vision_projector.safetensors (tower + projector: the state dict under `prefixes`), lora/ (peft),
    training.json: the committed parts."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if k.startswith(prefixes) and "lora_" not in k}
    tmp = out / "vision_projector.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / "vision_projector.safetensors")
    peft_model.save_pretrained(str(out / "lora"))
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
