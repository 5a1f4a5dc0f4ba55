"""Which tokens become anchors under three candidate rules, and what each does to tiny-vqa's accuracy.

    python scripts/measure_candidates.py [--n 320] [--checkpoint DIR]

Rules: every token after the image (AnchorInsert version 1), special tokens excluded, special and
whitespace-only tokens excluded (version 2's rule, attanchor_export/trace/candidates.py). For each rule
the threshold is recalibrated to a 10% anchor rate over that rule's candidates on 256 easy-vqa TRAIN
questions (as `--threshold auto` does); then on N fixed random easy-vqa test questions: accuracy of the
teacher-forced first answer token (PyTorch), anchors per question, and how many anchored tokens were
special, whitespace or words. --checkpoint: a tiny-vqa folder (default: the one the committed parts build).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from attanchor_graphs.specification import (
    anchor_insert,
    candidate_mask_from_ids,
    cosine_scores,
    position_ids_from_mask,
)
from PIL import Image

from attanchor_export.families import family_for
from attanchor_export.load import easy_vqa, tiny_vqa
from attanchor_export.trace.candidates import special_token_ids, whitespace_token_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--checkpoint", type=Path)
    args = ap.parse_args()
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    folder = args.checkpoint or tiny_vqa.checkpoint_folder()
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    tok, proc = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    vision = family_for(model.config).vision_module(model)
    embed, image_id, width = model.get_input_embeddings(), model.config.image_token_id, model.config.text_config.hidden_size
    special, ws = set(special_token_ids(tok)), set(whitespace_token_ids(tok))
    rules = {"every token (v1)": set(), "special excluded": special, "special + whitespace excluded": special | ws}

    def prompt(q):
        m = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        return tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids

    def features(paths):
        return vision(proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]).float()

    calib = random.Random(1).sample(easy_vqa.questions("train"), 256)
    best = {r: [] for r in rules}
    for i in range(0, len(calib), 32):
        chunk = calib[i : i + 32]
        for q, f in zip(chunk, features([q.image for q in chunk]), strict=True):
            ids = prompt(q.question)
            after = ids[ids.index(image_id) + 1 :]
            s = cosine_scores(embed(torch.tensor(after))[None].numpy(), f[None].numpy())[0].max(1)
            for r, excluded in rules.items():
                best[r].extend(x for t, x in zip(after, s, strict=True) if t not in excluded)
    threshold = {r: float(np.quantile(best[r], 0.9)) for r in rules}

    test = random.Random(0).sample(easy_vqa.questions("test"), args.n)
    first = {a: tok(a + tiny_vqa.ANSWER_END, add_special_tokens=False).input_ids[0]
             for a in ["yes", "no", *easy_vqa.COLORS, *easy_vqa.SHAPES]}
    stats = {r: {"right": 0, "special": 0, "whitespace": 0, "words": 0} for r in rules}
    for i in range(0, len(test), 32):
        chunk = test[i : i + 32]
        f = features([q.image for q in chunk])
        rows = [prompt(q.question) for q in chunk]
        t = max(map(len, rows))
        ids = np.full((len(rows), t), model.config.text_config.pad_token_id)
        mask = np.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, t - len(r) :], mask[j, t - len(r) :] = r, 1
        text = embed(torch.tensor(ids)).float()
        where = (ids == image_id).argmax(1)
        for r, excluded in rules.items():
            cm = candidate_mask_from_ids(ids, excluded) if excluded else None
            gi, om = anchor_insert(text.numpy(), f.numpy(), mask, where, np.float32(threshold[r]), candidate_mask=cm)
            e = torch.gather(torch.cat([text, f], 1), 1, torch.tensor(gi)[..., None].expand(-1, -1, width))
            hidden = model.model.language_model(inputs_embeds=e, attention_mask=torch.tensor(om),
                                                position_ids=torch.tensor(position_ids_from_mask(om))).last_hidden_state
            pred = model.lm_head(hidden[:, -1]).argmax(-1).tolist()
            st = stats[r]
            for j, q in enumerate(chunk):
                st["right"] += pred[j] == first[q.answer]
                values, counts = np.unique(gi[j][(om[j] == 1) & (gi[j] < t)], return_counts=True)
                for n in values[counts > 1]:  # a text index that appears twice was copied: an anchor
                    tid = int(ids[j, n])
                    st["special" if tid in special else "whitespace" if tid in ws else "words"] += 1
    print("| candidates | threshold (10% rate) | accuracy | anchors / question | anchored: special / whitespace / words |")
    print("| --- | --- | --- | --- | --- |")
    for r, st in stats.items():
        anchors = st["special"] + st["whitespace"] + st["words"]
        print(f"| {r} | {threshold[r]:.3f} | {st['right'] / args.n:.3f} | {anchors / args.n:.2f} | "
              f"{st['special']} / {st['whitespace']} / {st['words']} |")


if __name__ == "__main__":
    main()
