"""Task accuracy through the torch-free runtime: `attanchor-export eval DIR --data easy-vqa|FILE.jsonl`.

Questions are answered in batches by `attanchor_runtime.Pipeline.generate` (greedy, left-padded rows,
the artifact's own vision, anchor and decoder graphs). An answer is right when the generated text,
lower-cased and stripped of surrounding punctuation, equals the expected one. For easy-vqa the anchors
of colour and shape words are also scored: how often the patch a word was copied next to overlaps the
shape, against the chance rate (the share of the image's patches that overlap it).

The same answering loop serves the quantization gate (accuracy of each precision against fp32) and
the CI test that the fp32 artifact answers exactly as the PyTorch model does.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from attanchor_runtime import Pipeline
from attanchor_runtime.batch import left_pad
from attanchor_runtime.errors import RuntimeInputError
from attanchor_runtime.pipeline import FrontEnd

from attanchor_export.checks.regression import (
    REPORT_VERSION,
    baseline_comparison,
    check_same_questions,
    question_set,
    read_baseline,
)
from attanchor_export.errors import ExportError
from attanchor_export.load import easy_vqa as ev
from attanchor_export.load.datasets import TaskItem, load_task

DEFAULT_BATCH = 16
ANSWER_TOKENS = 8  # easy-vqa answers are one word: at most 3 tokens + end of turn


def readable_items(pipe, items: Sequence[TaskItem], on_skip: Callable[[str], None] | None = None
                   ) -> tuple[list[TaskItem], list[dict]]:
    """The items the artifact can answer, and a record of each one it cannot (an image that does not
    decode or is over the size limits, a question too long for the context), checked before any
    question is answered so one bad row costs neither the run nor the rows measured before it."""
    fixed = pipe.manifest.dims.image_tokens - 1 + (pipe.manifest.anchor.max_anchors or 0) + ANSWER_TOKENS
    kept, skipped = [], []
    for it in items:
        try:
            pipe.images(it.image)
            length = len(pipe.prompt_ids(it.question))
            if length + fixed > pipe.max_positions:
                raise RuntimeInputError(f"the question is {length} tokens, too long for the model's context")
        except RuntimeInputError as e:
            where = it.source or it.image
            skipped.append({"row": where, "image": it.image, "reason": str(e)})
            if on_skip:
                on_skip(f"{where}: {e}; skipped")
            continue
        kept.append(it)
    return kept, skipped
def normalize(text: str) -> str:
    return text.strip().strip(string.punctuation + " ").lower()


class SharedFronts:
    """The front ends (vision, embedding graph, anchors) of one question set's batches, made by one pipeline
    and reused by another whose vision graph, embedding graph and token table are the same graphs: the
    accuracy gate's forms that rewrite only the decoder answer the fp32 artifact's questions on the fp32
    artifact's front ends instead of running the same graphs again. Batches are kept while they fit in
    `budget_bytes` (a 1B model's 200 prompts of ~600 positions would be ~1 GB); the rest are made again."""

    BUDGET_BYTES = 256 << 20

    def __init__(self, threshold: float | None = None, batch: int = DEFAULT_BATCH, budget_bytes: int = BUDGET_BYTES):
        self.threshold, self.batch, self.budget_bytes = threshold, batch, budget_bytes
        self.fronts: dict[int, FrontEnd] = {}
        self.bytes = 0

    def get(self, start: int) -> FrontEnd | None:
        return self.fronts.get(start)

    def keep(self, start: int, front: FrontEnd) -> None:
        size = front.inputs_embeds.nbytes + front.image_features.nbytes
        if self.bytes + size <= self.budget_bytes:
            self.fronts[start] = front
            self.bytes += size


def answer_items(pipe, items: Sequence[TaskItem], threshold: float | None = None, batch: int = DEFAULT_BATCH,
                 progress: Callable[[int], None] | None = None, shared: SharedFronts | None = None) -> list[dict]:
    """One record per item: the answer text, whether it is right, the anchors, seconds per question.
    `shared`: front ends of these items at this threshold and batch size, reused where it has a batch's
    and filled where it has not (a pipeline whose front graphs are the ones that made them: SharedFronts);
    a reused batch's seconds are its decoder's only."""
    if shared is not None and (shared.threshold, shared.batch) != (threshold, batch):
        raise ValueError(f"shared front ends of threshold {shared.threshold} and batch {shared.batch}, "
                         f"asked for {threshold} and {batch}")
    records = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        ids = [pipe.prompt_ids(it.question) for it in chunk]
        t0 = time.perf_counter()
        front = shared.get(start) if shared is not None else None
        if front is None:
            pixels = np.concatenate([pipe.images(it.image) for it in chunk])
            front = pipe.front_end(ids, pixels, threshold, max_new_tokens=ANSWER_TOKENS)
            if shared is not None:
                shared.keep(start, front)
        out = pipe.generate(input_ids=ids, pixel_values=None, max_new_tokens=ANSWER_TOKENS, front=front)
        per_item = (time.perf_counter() - t0) / len(chunk)
        for row, it in enumerate(chunk):
            text = pipe.text.decode(out.tokens[row, : out.lengths[row]])
            records.append({
                "question": it.question, "expected": it.answer, "answer": text.strip(),
                "correct": normalize(text) == normalize(it.answer), "kind": it.kind,
                "anchors": [list(p) for p in out.anchors[row]], "seconds": per_item,
                "prompt_ids": ids[row].tolist(),
            })
        if progress:
            progress(len(chunk))
    return records


def accuracy(records: Sequence[dict]) -> dict:
    kinds = sorted({r["kind"] for r in records})
    out = {"accuracy": float(np.mean([r["correct"] for r in records])) if records else 0.0,
           "questions": len(records)}
    out["by_kind"] = {
        k: {"accuracy": float(np.mean([r["correct"] for r in records if r["kind"] == k])),
            "questions": sum(r["kind"] == k for r in records)}
        for k in kinds
    }
    out["anchors_per_question"] = float(np.mean([len(r["anchors"]) for r in records])) if records else 0.0
    out["seconds_per_question"] = float(np.mean([r["seconds"] for r in records])) if records else 0.0
    return out


def localisation(pipe, items: Sequence[TaskItem], records: Sequence[dict]) -> dict:
    """easy-vqa: share of colour/shape-word anchors on a patch that overlaps the shape, and chance."""
    from PIL import Image

    size = pipe.manifest.dims.image_size
    _, cols = pipe.family.patch_grid()  # image tokens per side (Qwen2.5-VL: merged tokens, 2x2 patches each)
    patch = size // cols
    words = [*ev.COLORS, *ev.SHAPES]
    word_ids = {int(t) for w in words for t in pipe.text.encode(" " + w, add_special_tokens=False)}
    labels: dict = {}
    hits = total = 0
    chance = []
    for it, rec in zip(items, records, strict=True):
        if it.image_id is None:
            continue
        if it.image not in labels:
            rgb = np.asarray(Image.open(it.image).convert("RGB").resize((size, size), Image.NEAREST))
            # The shape's colour from its pixels: a question's colour word is often another colour
            # ("is there a red shape?" about a blue one).
            labels[it.image] = ev.patch_overlap(ev.shape_mask(rgb, ev.colour_of(rgb)), patch) > 0
        on_shape = labels[it.image]
        ids = rec["prompt_ids"]
        for text_index, image_index in rec["anchors"]:
            if ids[text_index] in word_ids:
                total += 1
                hits += bool(on_shape[image_index])
                chance.append(on_shape.mean())
    rate = hits / total if total else 0.0
    base = float(np.mean(chance)) if chance else 0.0
    return {"word_anchors": total, "on_shape": rate, "chance": base, "ratio_to_chance": rate / base if base else 0.0}


def scenes_localisation(pipe, items: Sequence[TaskItem], records: Sequence[dict]) -> dict:
    """tiny-scenes: share of colour/shape-word anchors on a patch of an item that word describes, and chance
    (the share of the image's patches that are), from the generator's own item masks."""
    from attanchor_export.load import scenes

    patch = pipe.manifest.dims.patch_size
    word_ids = {int(pipe.text.encode(" " + w, add_special_tokens=False)[0]): w for w in [*scenes.COLORS, *scenes.SHAPES]}
    hits = total = 0
    chance = []
    cache: dict = {}
    for it, rec in zip(items, records, strict=True):
        if it.image_id not in cache:
            cache[it.image_id] = scenes.word_patches(scenes.scene(it.split, it.image_id), patch)
        on = cache[it.image_id]
        for text_index, image_index in rec["anchors"]:
            word = word_ids.get(rec["prompt_ids"][text_index])
            if word is None:
                continue
            patches = on.get(word)
            total += 1
            hits += bool(patches is not None and patches[image_index])
            chance.append(float(patches.mean()) if patches is not None else 0.0)
    rate = hits / total if total else 0.0
    base = float(np.mean(chance)) if chance else 0.0
    return {"word_anchors": total, "on_shape": rate, "chance": base, "ratio_to_chance": rate / base if base else 0.0}


def evaluate_artifact(pipe, items: Sequence[TaskItem], threshold: float | None = None,
                      progress: Callable[[int], None] | None = None, batch: int = DEFAULT_BATCH,
                      shared: SharedFronts | None = None) -> dict:
    """accuracy(...) + localisation (easy-vqa) + the per-question records, for one threshold (`shared`:
    answer_items')."""
    records = answer_items(pipe, items, threshold, batch=batch, progress=progress, shared=shared)
    result = accuracy(records)
    result["threshold"] = float(pipe.default_threshold if threshold is None else threshold)
    if any(it.image_id is not None for it in items):
        scored = scenes_localisation if items[0].split else localisation
        result["localisation"] = scored(pipe, items, records)
    result["records"] = records
    return result


def torch_answers(loaded, pipe, items: Sequence[TaskItem], threshold: float, batch: int = DEFAULT_BATCH) -> list[str]:
    """The PyTorch model's greedy answers to the same prompt ids and pixels (attanchor_export.source_model)."""
    from attanchor_export.source_model import anchored_inputs, greedy_generate

    answers = []
    eos = list(loaded.tokens.eos_token_ids)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        ids, mask = left_pad([pipe.prompt_ids(it.question) for it in chunk], pipe.pad_token_id)
        pixels = np.concatenate([pipe.images(it.image) for it in chunk])
        embeds, out_mask, positions, _ = anchored_inputs(
            loaded, ids, mask, pixels, threshold, mode=pipe.mode, max_anchors=pipe.manifest.anchor.max_anchors,
            excluded_token_ids=pipe.manifest.anchor.excluded_token_ids)
        tokens = greedy_generate(loaded, embeds, out_mask, positions, ANSWER_TOKENS, eos_token_id=eos)
        for row in tokens.tolist():
            kept = []
            for t in row:
                if t in eos:
                    break
                kept.append(t)
            answers.append(pipe.text.decode(np.asarray(kept, np.int64)).strip())
    return answers


def run_eval(folder, data: str, split: str = "test", limit: int | None = None, thresholds=(None,),
             backend: str = "ort", device: str = "cpu", batch: int = DEFAULT_BATCH, progress_factory=None,
             compare_torch: bool = False, compare: Path | None = None, verify: str = "size",
             on_skip: Callable[[str], None] | None = None, baseline: Path | None = None) -> dict:
    """`attanchor-export eval`: one result per threshold (None = the artifact's default), JSON-ready.

    The top-level "accuracy" is the first threshold's, so `--json | jq .accuracy` answers "how good is it".
    compare_torch: also answer with the source PyTorch model on the same prompt ids and pixels, and
    report its accuracy and the share of identical answers. compare: the same for another artifact
    (another precision, or the same one exported without onnxruntime fusions), on the same backend.
    verify: how the artifacts' files are checked first (Pipeline.load). Rows that cannot be answered
    (readable_items) are left out, each reported through on_skip and listed under "skipped".
    baseline: a committed report of this function (`eval --json`, checks.regression): each result gets
    its accuracy and the share of identical answers, after it is checked to be of the same questions.
    Every result carries its answers in question order, so the report can serve as a later baseline.
    """
    if not thresholds:
        raise ExportError("no threshold to evaluate")
    report = read_baseline(baseline) if baseline is not None else None  # before minutes of loading
    pipe = Pipeline.load(folder, backend=backend, device=device, verify=verify)
    other = Pipeline.load(compare, backend=backend, device=device, verify=verify) if compare is not None else None
    items, skipped = readable_items(pipe, load_task(data, split=split, limit=limit), on_skip)
    if not items:
        raise ExportError(f"--data {data}: none of its {len(skipped)} questions can be answered (see the warnings)")
    split = split if data in ("easy-vqa", "tiny-scenes") else None  # a JSONL file has no splits
    questions = {**question_set(items), "limit": limit}
    if report is not None:
        check_same_questions(report, baseline, data, split, questions)
    if compare_torch:
        from attanchor_export.load.source import load_source  # torch: only for --compare-torch

        loaded = load_source(pipe.manifest)
    else:
        loaded = None
    results = []
    for threshold in thresholds:
        label = f"threshold {pipe.default_threshold if threshold is None else threshold:g}"
        with (progress_factory(label, len(items)) if progress_factory else _no_progress()) as advance:
            result = evaluate_artifact(pipe, items, threshold, progress=advance, batch=batch)
        records = result.pop("records")
        result["answers"] = [r["answer"] for r in records]
        if report is not None:
            result["baseline"] = baseline_comparison(report, baseline, result["answers"])
        if loaded is not None:
            answers = torch_answers(loaded, pipe, items, result["threshold"], batch=batch)
            result["pytorch"] = _agreement(answers, records, items)
        if other is not None:
            with (progress_factory(f"{label}, {Path(compare).name}", len(items)) if progress_factory
                  else _no_progress()) as advance:
                theirs = answer_items(other, items, threshold, batch=batch, progress=advance)
            result["compared"] = {"folder": str(compare), "precision": _precision(other.manifest),
                                  **_agreement([r["answer"] for r in theirs], records, items)}
        results.append(result)
    return {
        "report_version": REPORT_VERSION, "folder": str(folder), "data": data, "split": split,
        "precision": _precision(pipe.manifest), "backend": backend, "questions": questions,
        "accuracy": results[0]["accuracy"], "results": results, "skipped": skipped,
    }


def _precision(manifest) -> str:
    """"fp32/none", "fp32/int4 fused" (the onnxruntime decoder has fused kernels), ..."""
    precision = manifest.precision
    record = precision.graphs.get(manifest.graph_file("decoder", "ort"))
    return precision.label + (" fused" if record is not None and record.ort_fusions else "")


def _agreement(answers: list[str], records: list[dict], items) -> dict:
    """Another system's answers to the same questions: its accuracy and the share equal to `records`'."""
    return {"accuracy": float(np.mean([normalize(a) == normalize(it.answer) for a, it in zip(answers, items, strict=True)])),
            "same_answers": float(np.mean([a == r["answer"] for a, r in zip(answers, records, strict=True)]))}


class _no_progress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
