"""Accuracy gate for reduced-precision artifacts: quantized graphs against the fp32 ones they came from.

What is measured (over `load.datasets.gate_samples()`: fixed synthetic images + questions, run through
the artifact's own Pipeline (vision, prompt template, embedding graph), so anchors are inserted exactly
as at run time, and decoded by the runtime's own loop, decode.generate):

- Teacher-forced logits. The fp32 decoder greedily generates `new_tokens` (32) tokens; then both
  decoders are fed the same prompt and the same fp32 tokens (prefill over the prompt, then one cached
  decode step per token), and their logits are compared at every valid position: the prompt's
  (image and text rows, where the graph returns them) and each generated token's. Per position:
  cosine similarity and whether the arg-max agrees. Reported: mean and min cosine, top-1 agreement,
  over all positions and over the answer positions only (the ones that predict generated tokens).
- Greedy agreement. The quantized graphs generate on their own (their own vision features too,
  when the vision graph was converted) for `new_tokens` tokens; reported: the fraction of tokens equal
  to the fp32 ones, position by position, and the mean length of the common prefix. Greedy decoding
  is a cliff (one flipped near-tie and the rest of the text differs), so this is reported, not gated.
- Vision features (when vision.onnx was converted): cosine per image token, mean and min.

Against the PyTorch source model (`source_model_baseline`: the fp32 decoder graph over the memory
budget, and `check`) the reference is teacher-forced on the form's tokens instead (gate_reference.py):
each form generates greedily once (the runtime's decode loop, on the reference's image features and
anchors); PyTorch computes the prompts' logits once (one layer-streamed forward for all rows) and, per
form, the logits over that form's greedy tokens in one cached forward, so each decoder layer is read
once per forward rather than once per token. The logits metrics are the same positions, compared the
same way. Greedy agreement is counted per position given the form's own prefix: the fraction of the
form's tokens that are PyTorch's arg-max after the same tokens (which is the top-1 agreement over the
answer positions), and the prefix is the number of tokens before the first one PyTorch would have chosen
differently (the common prefix with PyTorch's own greedy run, which follows the same tokens up to
there). After a first disagreement the fp32 count compares two diverged texts; this one keeps asking
whether PyTorch agrees with each next token. A converted vision graph is judged by its feature cosine;
the decoder runs on PyTorch's image features, so one PyTorch prompt pass serves every form.

The gate (per format, floors below) fails on a NaN/inf anywhere, on a logits cosine mean below
`cos_mean`, on a top-1 agreement below `top1`, or on a vision feature cosine mean below `vision_cos_mean`.
With a task set (tiny-vqa: easy-vqa) it also fails when a form's task accuracy drops more than
TASK_FLOORS below the fp32 artifact's on the same questions: TASK_GATE_QUESTIONS of the data set's
validation split (datasets.GATE_SPLIT; a JSONL task file has no splits: its first rows), never the test
questions `eval` reports.

`fp32_baseline` runs the fp32 artifact once (or `source_model_baseline` the PyTorch source model, where
the fp32 decoder graph is over the memory budget and in `check`); `run_gate` judges every distinct
(decoder, vision) pair the backends open against it and returns the manifest's precision.gate section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from attanchor_runtime.decode import generate
from attanchor_runtime.manifest import Gate, GateResult, Manifest, Precision, TaskResult
from attanchor_runtime.ort_backend import OrtBackend
from attanchor_runtime.pipeline import FrontEnd, Pipeline

from attanchor_export.checks.compare import cosine_rows
from attanchor_export.checks.task_accuracy import SharedFronts, evaluate_artifact
from attanchor_export.errors import ExportError
from attanchor_export.load.datasets import GATE_SPLIT, Sample, gate_samples, load_task
from attanchor_export.precision.gate_reference import TorchReference
from attanchor_export.source_model import TorchBackend

# Floors per format for trained models (docs/QUANTIZATION.md has the tables). int4 is set from tiny-vqa,
# the trained model (SmolLM2-135M decoder), gate set of 4 synthetic prompts x 32 tokens:
#   int4 MatMulNBits b128 (ort)   cos mean 0.956  top-1 0.58  task accuracy 0.995 (fp32 0.995)
#   int4 QDQ sym b128 (trt)       cos mean 0.944  top-1 0.61  task accuracy 0.985
# so the int4 floor sits ~0.045 under the worse form. top-1 over 32 free-running tokens of generic prompts
# is noisy on a model fine-tuned for one-word answers; the task accuracy (TASK_FLOORS) is what tiny-vqa
# is judged on. int8 is set from tiny-vqa too (docs/QUANTIZATION.md, scripts/measure_int8.py):
#   int8 MatMulNBits (ort)                          cos mean 0.997  top-1 0.923  task 0.995 (fp32 0.995)
#   int8 QDQ, SmoothQuant 0.7 + MinMax (trt)        cos mean 0.988  top-1 0.870  task 0.995 (fp32 0.995)
#   int8 QDQ, SmoothQuant 0.5                       cos mean 0.963  top-1 0.700  task 0.990
#   int8 QDQ without smoothing (broken by outliers) cos mean 0.919  top-1 0.567  task 0.855
# (artifacts with every token an anchor candidate; with AnchorInsert v2's words-only candidates the two
# forms gate at cos 0.999 / 0.986, top-1 0.913 / 0.842, task 0.985 = fp32's)
# so the floor sits under every working variant and over the unsmoothed one. fp16 on tiny-vqa: cos mean
# 1.0000 (min 0.9999), top-1 1.000, task 0.995 with every answer as fp32's, so its floors stay where the
# tiny random checkpoints put them (they clear cos 0.99998).
# The tiny random test checkpoints are chaotic by construction and declare looser floors of their own
# (attanchor_export.load.tiny_random.RANDOM_CHECKPOINT_FLOORS, in their attanchor_config.json).
GATE_FLOORS: dict[str, dict[str, float]] = {
    "fp16": {"cos_mean": 0.999, "top1": 0.95, "vision_cos_mean": 0.999},
    "int8": {"cos_mean": 0.95, "top1": 0.65, "vision_cos_mean": 0.99},
    "int4": {"cos_mean": 0.90, "top1": 0.45, "vision_cos_mean": 0.95},
}
# Task accuracy (where a task set is given, always for tiny-vqa): the most a format may lose against the
# fp32 artifact on the same questions (fractions: 0.02 = 2 points).
TASK_FLOORS: dict[str, float] = {"fp16": 0.01, "int8": 0.01, "int4": 0.02}
TASK_GATE_QUESTIONS = 200  # a fixed random subset of the task's validation split (datasets.GATE_SPLIT)
TARGET_COS = 0.99  # TensorRT-Edge-LLM's gate; reported as `meets_target`, not enforced for int4
DEFAULT_NEW_TOKENS = 32


class AccuracyGateFailed(ExportError):
    """A reduced-precision graph is below its format's floor. `results`: the gate's per-form records;
    `precision`: the manifest precision section as far as it got (set by quantize)."""

    def __init__(self, message: object = "", results=(), precision: Precision | None = None) -> None:
        super().__init__(message)
        self.results = list(results)
        self.precision = precision


@dataclass
class GateBaseline:
    """What the fp32 artifact (or the source model) produced on the gate set: kept until every form is judged."""

    labels: list[str]
    features: np.ndarray  # [B, M, D] fp32 image features
    front: FrontEnd  # the batched, left-padded decoder inputs (vision + embedding of the baseline)
    # With a `reference` (PyTorch, teacher-forced per form) these three are None: each form brings its tokens.
    tokens: np.ndarray | None  # [B, n] fp32 greedy tokens
    logits: np.ndarray | None  # [P, V] teacher-forced logits at the valid positions, concatenated over rows
    answer: np.ndarray | None  # [P] bool: positions that predict a generated token
    new_tokens: int = DEFAULT_NEW_TOKENS
    samples: list[Sample] = field(default_factory=list)
    task: dict | None = None  # fp32_task_answers: the fp32 answers on the task's gate subset
    # What produced `tokens` and `logits`: the fp32 decoder graph, or the PyTorch source model where that
    # graph is over the memory budget (source_model_baseline).
    decoder: str = "fp32 decoder graph (onnxruntime)"
    reference: TorchReference | None = None  # source_model_baseline's: PyTorch logits for any form's tokens


def gate_pipeline(manifest: Manifest, files: dict | None = None, low_memory: bool = False) -> Pipeline:
    """A Pipeline over `files` ({graph: file}, one precision form; default: the manifest's onnxruntime
    files) on onnxruntime CPU. low_memory: no arena, fp16 weights fed from disk (OrtDecoder.open)."""
    backend = OrtBackend(manifest, files=files, memory_arena=not low_memory, fed_weights=low_memory)
    return Pipeline(manifest, backend)


def _front(pipe: Pipeline, samples: Sequence[Sample], features: np.ndarray | None = None) -> FrontEnd:
    """The gate set through the pipeline's front end: chat prompts, images, anchors."""
    pixels = np.concatenate([pipe.images(s.image) for s in samples], axis=0)
    return pipe.front_end([pipe.prompt_ids(s.prompt) for s in samples], pixels, image_features=features)


def _features(pipe: Pipeline, samples: Sequence[Sample]) -> np.ndarray:
    pixels = np.concatenate([pipe.images(s.image) for s in samples], axis=0)
    return pipe.backend.vision(pipe.family.vision_feeds(pixels, len(samples)))


def _features_and_front(pipe: Pipeline, samples: Sequence[Sample]) -> tuple[np.ndarray, FrontEnd]:
    features = _features(pipe, samples)
    front = _front(pipe, samples, features)
    pipe.backend.release("vision")  # the decoder run (minutes, at 7B) does not need it
    return features, front


def _rows(front: FrontEnd, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs_embeds, attention_mask, position_ids) of some rows, without the columns that are padding
    in all of them. Positions may carry leading axes (M-RoPE [3, B, L]): rows and columns are the last two."""
    mask = front.attention_mask[rows]
    first = int(np.flatnonzero(mask.any(axis=0))[0])
    return front.inputs_embeds[rows, first:], mask[:, first:], front.position_ids[..., rows, first:]


def _run_decoder(pipe: Pipeline, inputs: tuple, new_tokens: int, forced: np.ndarray | None = None,
                 start=None, keep_prefill: bool = False):
    """Prefill, then `new_tokens - 1` cached decode steps (decode.generate). Returns (tokens [B, n],
    logits [P, V], answer [P], the prefill call if `keep_prefill`): per row, its valid prompt positions
    then one position per step; `answer` marks the positions that predict a generated token (the
    prompt's last, and every step's). `forced`: teacher forcing (the tokens returned are still the
    model's own arg-max). `start`: an earlier run's prefill call on the same inputs."""
    embeds, mask, positions = inputs
    *_, run = generate(pipe.backend, pipe.family.first_step(mask, positions), embeds, pipe.embed, new_tokens,
                       forced=forced, keep_logits=True, keep_prefill=keep_prefill, start=start)
    prompt, steps = run.logits[0], run.logits[1:]
    valid = mask[:, -prompt.shape[1]:].astype(bool)
    # Written into one array, not gathered and concatenated: at Qwen's vocabulary (151,936) the gate set's
    # rows are ~0.9 GB of fp32 logits, and every extra copy shows in the export's peak.
    logits = np.empty((int(valid.sum()) + len(mask) * len(steps), prompt.shape[-1]), prompt.dtype)
    answer, at = [], 0
    for b in range(len(mask)):
        idx = np.flatnonzero(valid[b])
        for part in (prompt[b, idx], *(step[b, -1:] for step in steps)):
            logits[at:at + len(part)] = part
            at += len(part)
        answer += [False] * (len(idx) - 1) + [True] * (1 + len(steps))
    return run.tokens, logits, np.array(answer, bool), run.prefill


CHUNK_BYTES = 64 << 20  # float64 rows compared at a time (_chunks): ~55 rows of a 151,936-token vocabulary


def _chunks(a: np.ndarray, b: np.ndarray):
    """Matching [rows, D] slices of a and b (flattened to rows over the last axis), CHUNK_BYTES of float64
    each: the gate's comparisons never widen the whole gate set's logits (4 x ~1.7 GB at Qwen's vocabulary)."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rows = max(1, CHUNK_BYTES // (8 * max(1, a.shape[-1])))
    for start in range(0, len(a), rows):
        yield a[start:start + rows], b[start:start + rows]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """compare.cosine_rows over the last axis, with the gate's rule for rows a cosine cannot judge:
    two all-zero rows agree (1.0); NaN/inf, or a zero row against a non-zero one, score -1.0, so a
    broken form can never pass a floor."""
    parts = [_chunk_cosines(x, y) for x, y in _chunks(a, b)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _chunk_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), cosine_rows(a, b), -1.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return np.nan_to_num(cos, nan=-1.0, posinf=-1.0, neginf=-1.0)


def fp32_baseline(pipe: Pipeline, samples: Sequence[Sample] | None = None,
                  new_tokens: int = DEFAULT_NEW_TOKENS) -> GateBaseline:
    """Run the fp32 artifact (`pipe`) over the gate set. One greedy run gives the teacher-forced logits
    too: fed its own tokens, the baseline is its own teacher."""
    samples = list(samples or gate_samples())
    features, front = _features_and_front(pipe, samples)
    tokens, logits, answer, _ = _run_decoder(pipe, _rows(front, slice(None)), new_tokens)
    return GateBaseline(labels=[s.label for s in samples], features=features, front=front, tokens=tokens,
                        logits=logits, answer=answer, new_tokens=new_tokens, samples=samples)


def source_model_baseline(loaded, manifest: Manifest, new_tokens: int = DEFAULT_NEW_TOKENS,
                          samples: Sequence[Sample] | None = None) -> GateBaseline:
    """The baseline from the PyTorch source model (fp32; one decoder layer's weights in memory at a time
    when the model is streamed) in place of the fp32 graphs: vision, anchors and decoder all PyTorch
    (source_model.TorchBackend), prompts from the artifact's tokenizer. Runs the vision tower, the anchors
    and the prompts' forward now; each form's greedy tokens get their PyTorch logits in `evaluate`
    (gate_reference.TorchReference, which keeps the decoder and the prompts' KV cache until then). No task
    answers: those need the fp32 graphs. Used where the fp32 decoder is over the memory budget, and by the
    `check` verb, long after the fp32 graphs are gone."""
    samples = list(samples or gate_samples())
    pipe = Pipeline(manifest, TorchBackend(loaded, manifest))
    features, front = _features_and_front(pipe, samples)
    reference = TorchReference(loaded, manifest, pipe.family, pipe.embed, _rows(front, slice(None)))
    return GateBaseline(labels=[s.label for s in samples], features=features, front=front, tokens=None, logits=None,
                        answer=None, new_tokens=new_tokens, samples=samples, reference=reference,
                        decoder=f"PyTorch fp32 ({loaded.streaming}), teacher-forced on each form's greedy tokens")


def _prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else len(a)


class _Tally:
    """Position-by-position comparisons of a form's logits with the reference's, added part by part."""

    def __init__(self) -> None:
        self.cos, self.top1, self.answer = [], [], []
        self.finite, self.max_abs = True, 0.0

    def add(self, part: np.ndarray, reference: np.ndarray, answer) -> None:
        if part.shape != reference.shape:
            raise ValueError(f"gate: logits {part.shape} do not match the reference's {reference.shape}")
        for x, y in _chunks(part, reference):
            self.finite = self.finite and bool(np.isfinite(x).all())
            if self.finite:
                self.max_abs = max(self.max_abs, float(np.abs(x.astype(np.float64) - y).max(initial=0.0)))
        self.cos.append(_cosines(part, reference))
        self.top1.append(part.argmax(-1) == reference.argmax(-1))
        self.answer.append(np.broadcast_to(np.asarray(answer, bool), (len(part),)))

    def metrics(self) -> dict:
        cos, top1, answer = (np.concatenate(x) for x in (self.cos, self.top1, self.answer))
        return {
            "positions": int(len(cos)),
            "finite": self.finite,
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "top1": float(top1.mean()),
            "cos_mean_answer": float(cos[answer].mean()),
            "top1_answer": float(top1[answer].mean()),
            "max_abs_diff": self.max_abs if self.finite else None,
        }


def evaluate(baseline: GateBaseline, pipe: Pipeline, vision_changed: bool = False,
             rows_per_run: int | None = None) -> dict:
    """Metrics of one reduced-precision form (`pipe`: a Pipeline over its files) against `baseline`.
    `vision_changed`: the form has its own vision graph (used for greedy generation and the vision metrics;
    against a PyTorch `baseline.reference`, for the vision metrics only).
    `rows_per_run`: run the gate set this many rows at a time (None: all at once). Per row the positions
    and tokens are the same either way; fewer rows hold less KV cache (2.6 GB per 4 x 632-token rows at 7B)."""
    vision = {}
    free_front = baseline.front
    if vision_changed:
        features = _features(pipe, baseline.samples)
        vcos = _cosines(features, baseline.features)
        vision = {"vision_cos_mean": float(vcos.mean()), "vision_cos_min": float(vcos.min())}
        vision_finite = bool(np.isfinite(features).all())
        if baseline.reference is None:
            free_front = _front(pipe, baseline.samples, features)
        pipe.backend.release("vision")
    if baseline.reference is not None:
        tally, tokens, expected = _against_reference(baseline, pipe, rows_per_run)
    else:
        tally, tokens = _against_fp32(baseline, pipe, free_front, vision_changed, rows_per_run)
        expected = baseline.tokens
    result = {**tally.metrics(), **vision}
    result["finite"] = result["finite"] and (vision_finite if vision_changed else True)
    result["greedy_match"] = float((tokens == expected).mean())
    result["greedy_prefix"] = float(np.mean([_prefix_len(t, r) for t, r in zip(tokens, expected)]))
    result["greedy_tokens"] = int(baseline.new_tokens)
    result["meets_target"] = result["cos_mean"] >= TARGET_COS
    return result


def _against_fp32(baseline: GateBaseline, pipe: Pipeline, free_front: FrontEnd, vision_changed: bool,
                  rows_per_run: int | None) -> tuple[_Tally, np.ndarray]:
    """The form teacher-forced on the fp32 tokens (compared with the fp32 logits), then free-running
    (its tokens returned, for greedy agreement with the fp32 ones)."""
    batch = baseline.tokens.shape[0]
    step = rows_per_run or batch
    tally, tokens, offset = _Tally(), [], 0
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        # The free-running greedy starts from the same prompt unless the vision graph changed: its
        # prefill is the teacher-forced run's, kept rather than run twice.
        _, part, part_answer, prefilled = _run_decoder(pipe, _rows(baseline.front, rows), baseline.new_tokens,
                                                       forced=baseline.tokens[rows], keep_prefill=not vision_changed)
        free, _, _, _ = _run_decoder(pipe, _rows(free_front, rows), baseline.new_tokens, start=prefilled)
        del prefilled
        # Judged run by run against the baseline's rows at the same positions (rows are concatenated in
        # order), so no run's logits outlive it.
        reference = baseline.logits[offset:offset + len(part)]
        if part.shape[1:] != baseline.logits.shape[1:] or len(reference) < len(part):
            raise ValueError(f"gate: logits of rows {rows.start}-{rows.start + len(free) - 1} ({part.shape}) do not "
                             f"match the baseline's {baseline.logits.shape} from position {offset}")
        offset += len(part)
        tally.add(part, reference, part_answer)
        tokens.append(free)
        del part, reference
    if offset != len(baseline.logits):
        raise ValueError(f"gate: {offset} logits positions, the baseline has {len(baseline.logits)}")
    return tally, np.concatenate(tokens)


def _against_reference(baseline: GateBaseline, pipe: Pipeline,
                       rows_per_run: int | None) -> tuple[_Tally, np.ndarray, np.ndarray]:
    """The form generates greedily once on the reference's front end (fed its own tokens, it is its own
    teacher: one run gives its tokens and their logits); the prompt positions are compared with the
    reference's as each run ends, the generated ones after PyTorch's one forward over every row's
    tokens. Returns the tally, the form's tokens [B, n] and PyTorch's choices after the same prefixes."""
    reference, n = baseline.reference, baseline.new_tokens
    batch = reference.rows
    step = rows_per_run or batch
    tally, tokens, generated = _Tally(), [], []
    for start in range(0, batch, step):
        rows = range(start, min(start + step, batch))
        own, part, _, _ = _run_decoder(pipe, _rows(baseline.front, slice(rows.start, rows.stop)), n)
        at = 0
        for row in rows:  # per row: its prompt positions, then one per decode step (_run_decoder)
            prompt = reference.prompt(row)
            tally.add(part[at:at + len(prompt)], prompt, np.arange(len(prompt)) == len(prompt) - 1)
            at += len(prompt)
            generated.append(part[at:at + n - 1].copy())  # small: n - 1 positions a row
            at += n - 1
        if at != len(part):
            raise ValueError(f"gate: {len(part)} logits positions for rows {rows.start}-{rows.stop - 1}, the "
                             f"reference's prompts and {n} tokens make {at}")
        tokens.append(own)
        del part
    pipe.backend.release("decoder")  # the form's session is not needed beside PyTorch's forward
    tokens = np.concatenate(tokens)
    continuation = reference.continuation(tokens)
    for row, part in enumerate(generated):
        tally.add(part, continuation[row], True)
    return tally, tokens, reference.choices(tokens, continuation)


def floors_for(fmt: str, overrides: dict | None = None) -> dict:
    floors = dict(GATE_FLOORS[fmt])
    if overrides:
        floors.update(overrides.get(fmt, {}) if isinstance(overrides.get(fmt), dict) else
                      {k: v for k, v in overrides.items() if not isinstance(v, dict)})
    return floors


def judge(result: dict, floors: dict) -> list[str]:
    """Failure reasons of one result against its floors (empty list: passed)."""
    reasons = []
    if not result.get("finite", True):
        reasons.append("NaN/inf in the outputs")
    for key in ("cos_mean", "top1", "vision_cos_mean"):
        if key in floors and key in result and not result[key] >= floors[key]:
            label = {"cos_mean": "logits cosine mean", "top1": "top-1 agreement",
                     "vision_cos_mean": "image-feature cosine mean"}[key]
            reasons.append(f"{label} {result[key]:.4f} < floor {floors[key]}")
    return reasons


def run_gate(manifest: Manifest, baseline: GateBaseline, fmt: str, backends: dict, changed: dict,
             floors: dict | None = None, low_memory: bool = False, graphs: dict | None = None,
             vision_format: str | None = None) -> Gate:
    """Evaluate every distinct (decoder, vision) pair the backends open; the manifest's gate section.
    `manifest`: the artifact (a staging folder's draft while exporting). `graphs`: the precision section's
    per-file records (how each decoder file carries its KV cache). `low_memory`: decoder sessions without
    an arena, run one gate row at a time; an fp16 decoder's weights fed from disk instead of widened all at
    load (an fp16 7B decoder on a CPU). `vision_format`: the vision tower's own precision where it differs
    from `fmt` (--vision-quant int8 behind an int4 decoder): its image-feature cosine takes that format's
    floor, the rest `fmt`'s."""
    limits = floors_for(fmt, floors)
    if vision_format is not None and vision_format != fmt:
        limits["vision_cos_mean"] = floors_for(vision_format, floors)["vision_cos_mean"]
    results: list[GateResult] = []
    for backend, files in backends.items():
        decoder, vision = files["decoder"], files["vision"]
        if decoder is None:
            continue
        same = next((r for r in results if (r.decoder, r.vision) == (decoder, vision)), None)
        if same is not None:
            results[results.index(same)] = GateResult(**{**vars(same), "backends": (*same.backends, backend)})
            continue
        form = manifest.with_files(manifest.folder, files, graphs)
        pipe = gate_pipeline(form, files, low_memory)
        metrics = evaluate(baseline, pipe, vision_changed=changed["vision"], rows_per_run=1 if low_memory else None)
        failures = judge(metrics, limits)
        task = None
        if baseline.task is not None:
            # The task's questions on the same sessions, unless they were opened for low memory (no arena,
            # weights fed from disk): batches of questions run on a pipeline of their own.
            task = task_metrics(form, files, baseline.task, fmt, pipe=None if low_memory else pipe)
            failures += list(task.failures)
        del pipe  # its sessions close before the next form's open: two decoders never sit in memory at once
        results.append(GateResult(backends=(backend,), decoder=decoder, vision=vision,
                                  vision_changed=changed["vision"], **metrics, task=task, passed=not failures,
                                  failures=tuple(failures)))
    return Gate(
        format=fmt,
        floors=limits,
        target_cos=TARGET_COS,
        set={"samples": len(baseline.labels), "images": "synthetic (datasets.gate_samples)",
             "prompts": "tokenizer", "new_tokens": baseline.new_tokens,
             "positions": results[0].positions if results else 0, "reference": baseline.decoder},
        task=None if baseline.task is None else {
            "data": baseline.task["task"], "split": baseline.task.get("split"), "questions": len(baseline.task["items"]),
            "fp32_accuracy": baseline.task["accuracy"], "max_drop": TASK_FLOORS[fmt],
        },
        evaluated_on="onnxruntime CPU (TensorRT forms are checked again after each engine build)",
        passed=all(r.passed for r in results),
        results=tuple(results),
    )


def fp32_task_answers(manifest: Manifest, files: dict, task: str, pipe: Pipeline | None = None) -> dict:
    """The fp32 artifact's answers on the task's gate subset (before any graph is rewritten). `pipe`: the
    fp32 pipeline already open over `files` (default: one is opened). Its front ends (vision, anchors) are
    kept for the forms that keep the fp32 vision and embedding graphs (task_metrics)."""
    items = load_task(task, split=GATE_SPLIT, limit=TASK_GATE_QUESTIONS)
    pipe = pipe or gate_pipeline(manifest.with_files(manifest.folder, files), files)
    shared = SharedFronts()
    result = evaluate_artifact(pipe, items, shared=shared)
    return {"task": task, "split": None if Path(task).expanduser().is_file() else GATE_SPLIT, "items": items,
            "accuracy": result["accuracy"], "by_kind": result["by_kind"],
            "answers": [r["answer"] for r in result["records"]], "fronts": shared}


def _fp32_front_graphs(manifest: Manifest, files: dict) -> bool:
    """Whether `files`' vision and embedding graphs are still the fp32 ones. A rewritten graph has a record
    in the precision section and may keep its fp32 file's name (the MatMulNBits and int8 vision forms do),
    so names alone do not tell; with no records at all nothing can be told, and nothing is shared."""
    rewritten = set(manifest.precision.graphs)
    return bool(rewritten) and not rewritten & {files.get("vision"), files.get("embedding")}


def task_metrics(manifest: Manifest, files: dict, fp32: dict, fmt: str, pipe: Pipeline | None = None) -> TaskResult:
    """Task accuracy of one form (`manifest` opening `files`; `pipe`: a pipeline over them already open)
    vs fp32 on the same questions; failures if it lost more than the floor. A form whose vision and
    embedding graphs are fp32's answers on fp32's front ends (the same graphs' outputs; no second run)."""
    result = evaluate_artifact(pipe or gate_pipeline(manifest, files), fp32["items"],
                               shared=fp32.get("fronts") if _fp32_front_graphs(manifest, files) else None)
    floor = fp32["accuracy"] - TASK_FLOORS[fmt]
    same = sum(r["answer"] == a for r, a in zip(result["records"], fp32["answers"], strict=True))
    failures = []
    if not result["accuracy"] >= floor - 1e-9:
        failures.append(f"task accuracy {result['accuracy']:.4f} < fp32 {fp32['accuracy']:.4f} - {TASK_FLOORS[fmt]}")
    return TaskResult(task=fp32["task"], questions=len(fp32["items"]), accuracy=result["accuracy"],
                      fp32_accuracy=fp32["accuracy"], max_drop=TASK_FLOORS[fmt], by_kind=result["by_kind"],
                      fp32_by_kind=fp32["by_kind"], same_answers=same / len(fp32["items"]),
                      failures=tuple(failures))


__all__ = [
    "AccuracyGateFailed", "DEFAULT_NEW_TOKENS", "GATE_FLOORS", "GateBaseline", "TARGET_COS", "TASK_FLOORS",
    "evaluate", "floors_for", "fp32_baseline", "fp32_task_answers", "gate_pipeline", "judge", "run_gate",
    "source_model_baseline", "task_metrics",
]
