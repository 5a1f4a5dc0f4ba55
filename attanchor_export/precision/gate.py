"""Accuracy gate for reduced-precision artifacts: quantized graphs against the fp32 ones they came from.

What is measured (over `calibration.gate_samples()`: fixed synthetic images + questions, run through the
artifact's own vision and embedding graphs, so anchors are inserted exactly as at run time):

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

The gate (per format, floors below) fails on a NaN/inf anywhere, on a logits cosine mean below
`cos_mean`, on a top-1 agreement below `top1`, or on a vision feature cosine mean below `vision_cos_mean`.
With a task set (tiny-vqa: easy-vqa) it also fails when a form's task accuracy drops more than
TASK_FLOORS below the fp32 artifact's on the same questions.

`compute_reference` runs the fp32 artifact once; `run_gate` judges every distinct (decoder, vision)
pair the backends open against it and returns the manifest's precision.gate section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from attanchor_runtime.decoder_feeds import cosine_rows, empty_past, greedy, prefill_feeds
from attanchor_runtime.manifest import KV_CONCAT, Precision

from attanchor_export.errors import ExportError
from attanchor_export.precision.calibration import ArtifactFrontEnd, Sample, gate_samples

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
# fp32 artifact on the same questions (fractions: 0.02 = 2 points), the targets in DESIGN.md.
TASK_FLOORS: dict[str, float] = {"fp16": 0.01, "int8": 0.01, "int4": 0.02}
TASK_GATE_QUESTIONS = 200  # a fixed random subset of the task's test questions
TARGET_COS = 0.99  # TensorRT-Edge-LLM's gate; reported as `meets_target`, not enforced for int4
DEFAULT_NEW_TOKENS = 32


class AccuracyGateFailed(ExportError):
    """A reduced-precision graph is below its format's floor. `results`: the gate's per-form records
    (JSON-ready dicts); `precision`: the manifest precision section as far as it got (set by quantize)."""

    def __init__(self, message: object = "", results=None, precision: dict | None = None) -> None:
        super().__init__(message)
        self.results = list(results or [])
        self.precision = precision


@dataclass
class GateReference:
    """What the fp32 artifact produced on the gate set: kept in memory until every form is judged."""

    labels: list[str]
    features: np.ndarray  # [B, M, D] fp32 image features
    inputs: dict  # batched, left-padded decoder inputs from the fp32 vision + embedding graphs
    tokens: np.ndarray  # [B, n] fp32 greedy tokens
    logits: np.ndarray  # [P, V] teacher-forced logits at the valid positions, concatenated over rows
    answer: np.ndarray  # [P] bool: positions that predict a generated token
    prompt_source: str = "tokenizer"
    new_tokens: int = DEFAULT_NEW_TOKENS
    samples: list[Sample] = field(default_factory=list)
    task: dict | None = None  # fp32_task_answers: the fp32 answers on the task's gate subset
    # What produced `tokens` and `logits`: the fp32 decoder graph, or the PyTorch model where that graph
    # is over the memory budget (precision.quantize.torch_gate_reference).
    decoder: str = "fp32 decoder graph (onnxruntime)"


def _run_decoder(session, dims: dict, inputs: dict, new_tokens: int, embed, forced: np.ndarray | None = None,
                 prefilled: list | None = None, keep_prefill: bool = False, kv_cache: str = KV_CONCAT):
    """Prefill, then `new_tokens - 1` cached decode steps. Returns (tokens [B, n], logits [P, V], answer [P],
    the prefill's outputs if `keep_prefill` else None): per row, its valid prompt positions then one position per
    step; `answer` marks the positions that predict a generated token (the prompt's last, and every step's).

    `forced`: feed these tokens instead of the model's own arg-max (teacher forcing); the tokens returned
    are still the model's own arg-max at each step. `prefilled`: an earlier run's prefill outputs on the
    same inputs (decoder_feeds.greedy)."""
    mask = inputs["attention_mask"]
    batch = mask.shape[0]
    prefill = prefill_feeds(inputs["inputs_embeds"], mask, inputs["position_ids"], empty_past(dims, batch))
    run = greedy(session.run, dims["num_layers"], prefill, embed, new_tokens, forced=forced, keep_logits=True,
                 prefilled=prefilled, keep_prefill=keep_prefill, kv_cache=kv_cache)
    prompt, steps = run.logits[0], run.logits[1:]
    valid = mask[:, -prompt.shape[1]:].astype(bool)
    rows, answer = [], []
    for b in range(batch):
        idx = np.flatnonzero(valid[b])
        rows += [prompt[b, idx], *(step[b, -1:] for step in steps)]
        answer += [False] * (len(idx) - 1) + [True] * (1 + len(steps))
    return run.tokens, np.concatenate(rows, axis=0), np.array(answer, bool), run.prefill_outputs


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """decoder_feeds.cosine_rows over the last axis, with the gate's rule for rows a cosine cannot judge:
    two all-zero rows agree (1.0); NaN/inf, or a zero row against a non-zero one, score -1.0, so a
    broken form can never pass a floor."""
    a, b = a.astype(np.float64).reshape(-1, a.shape[-1]), b.astype(np.float64).reshape(-1, b.shape[-1])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), cosine_rows(a, b), -1.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return np.nan_to_num(cos, nan=-1.0, posinf=-1.0, neginf=-1.0)


def compute_reference(front: ArtifactFrontEnd, decoder_session, samples: Sequence[Sample] | None = None,
                      new_tokens: int = DEFAULT_NEW_TOKENS) -> GateReference:
    """Run the fp32 artifact (front end + `decoder_session`) over the gate set. One greedy run gives the
    teacher-forced logits too: fed its own tokens, the reference is its own teacher."""
    samples = list(samples or gate_samples())
    features = front.image_features(front.pixels(samples))
    inputs = front.decoder_inputs(samples, features)
    front.release_vision()  # the decoder run (minutes, at 7B) does not need it
    tokens, logits, answer, _ = _run_decoder(decoder_session, front.dims, inputs, new_tokens, front.embed)
    return GateReference(
        labels=[s.label for s in samples], features=features, inputs=inputs, tokens=tokens, logits=logits,
        answer=answer, prompt_source=front.encoder.source, new_tokens=new_tokens, samples=samples,
    )


def pytorch_reference(loaded, folder: Path, manifest_data: dict, torch_vision: bool = False,
                      new_tokens: int = DEFAULT_NEW_TOKENS) -> GateReference:
    """The reference with the PyTorch decoder (fp32; one layer's weights in memory at a time when the
    model is streamed) in place of the fp32 decoder graph, on the inputs the artifact's own vision and
    embedding graphs build (`torch_vision`: image features from the PyTorch tower instead). No task
    answers: those need the fp32 graphs. Used where the fp32 decoder is over the memory budget, and by
    the `check` verb, long after the fp32 graphs are gone."""
    from attanchor_export.checks.parity import TorchSession
    from attanchor_export.trace.decoder import DecoderWithCache

    adapter, model, dims = loaded.adapter, loaded.model, manifest_data["dims"]
    front = ArtifactFrontEnd(folder, manifest_data)
    if torch_vision:
        front.vision = TorchSession(adapter.vision_tower_and_projector(model), ["pixel_values"])
    last_only = bool(manifest_data["graphs"]["decoder"].get("notes", {}).get("last_logits_only", False))
    module = DecoderWithCache(adapter.language_model(model), adapter.lm_head(model), dims["num_layers"], last_only)
    session = TorchSession(module, ["inputs_embeds", "attention_mask", "position_ids"], dims["num_layers"])
    reference = compute_reference(front, session, gate_samples(), new_tokens)
    reference.decoder = f"PyTorch fp32 ({loaded.streaming})"
    return reference


def _prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else len(a)


def _rows(inputs: dict, rows: slice) -> dict:
    """Decoder inputs of some rows, without the columns that are padding in all of them."""
    part = {k: v[rows] for k, v in inputs.items()}
    first = int(np.flatnonzero(part["attention_mask"].any(axis=0))[0])
    return {k: v[:, first:] for k, v in part.items()}


def evaluate(reference: GateReference, decoder_session, front: ArtifactFrontEnd,
             vision_changed: bool = False, rows_per_run: int | None = None, kv_cache: str = KV_CONCAT) -> dict:
    """Metrics of one reduced-precision form against `reference`. `front`: the front end with the
    form's own vision graph (used for greedy generation and the vision metrics when `vision_changed`).
    `rows_per_run`: run the gate set this many rows at a time (None: all at once). Per row the positions
    and tokens are the same either way; fewer rows hold less KV cache (2.6 GB per 4 x 632-token rows at 7B).
    kv_cache: what the decoder's present outputs hold (manifest KV_CONCAT / KV_APPEND)."""
    dims, embed = front.dims, front.embed
    result = {}
    free_inputs = reference.inputs
    if vision_changed:
        features = front.image_features(front.pixels(reference.samples))
        vcos = _cosines(features, reference.features)
        result["vision_cos_mean"] = float(vcos.mean())
        result["vision_cos_min"] = float(vcos.min())
        vision_finite = bool(np.isfinite(features).all())
        free_inputs = front.decoder_inputs(reference.samples, features)
        front.release_vision()
    batch = reference.tokens.shape[0]
    step = rows_per_run or batch
    logits, answer, tokens = [], [], []
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        # The free-running greedy starts from the same prompt unless the vision graph changed: its
        # prefill is the teacher-forced run's, kept rather than run twice.
        _, part, part_answer, prefilled = _run_decoder(
            decoder_session, dims, _rows(reference.inputs, rows), reference.new_tokens, embed,
            forced=reference.tokens[rows], keep_prefill=not vision_changed, kv_cache=kv_cache)
        free, _, _, _ = _run_decoder(decoder_session, dims, _rows(free_inputs, rows), reference.new_tokens, embed,
                                     prefilled=prefilled, kv_cache=kv_cache)
        del prefilled
        logits.append(part)
        answer.append(part_answer)
        tokens.append(free)
    logits, answer, tokens = np.concatenate(logits), np.concatenate(answer), np.concatenate(tokens)
    finite = bool(np.isfinite(logits).all())
    if logits.shape != reference.logits.shape:
        raise ValueError(f"gate: logits shape {logits.shape} differs from the reference {reference.logits.shape}")
    cos = _cosines(logits, reference.logits)
    top1 = logits.argmax(-1) == reference.logits.argmax(-1)
    result = {
        "positions": int(len(cos)),
        "finite": finite and (vision_finite if vision_changed else True),
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "top1": float(top1.mean()),
        "cos_mean_answer": float(cos[answer].mean()),
        "top1_answer": float(top1[answer].mean()),
        "max_abs_diff": float(np.abs(logits.astype(np.float64) - reference.logits).max()) if finite else None,
        **result,
    }
    result["greedy_match"] = float((tokens == reference.tokens).mean())
    result["greedy_prefix"] = float(np.mean([_prefix_len(t, r) for t, r in zip(tokens, reference.tokens)]))
    result["greedy_tokens"] = int(reference.new_tokens)
    result["meets_target"] = result["cos_mean"] >= TARGET_COS
    return result


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


def run_gate(folder: Path, manifest_data: dict, reference, fmt: str, backends: dict, changed: dict,
             floors: dict | None = None, low_memory: bool = False, graphs: dict | None = None) -> dict:
    """Evaluate every distinct (decoder, vision) pair the backends open; JSON-ready results.
    `graphs`: the precision section's per-file records (how each decoder file carries its KV cache).
    `low_memory`: decoder sessions without an arena that feed fp16 weights from disk instead of widening
    them all at load (sessions.FedWeightsSession: an fp16 7B decoder on a CPU), run one gate row at a time."""
    from attanchor_runtime.sessions import FedWeightsSession, ort_session

    limits = floors_for(fmt, floors)
    results, done = [], set()
    for backend, files in backends.items():
        decoder, vision = files["decoder"], files["vision"]
        if decoder is None:
            continue
        key = (decoder, vision)
        if key in done:
            next(r for r in results if (r["decoder"], r["vision"]) == key)["backends"].append(backend)
            continue
        done.add(key)
        front = ArtifactFrontEnd(folder, manifest_data, vision_file=vision)
        session = FedWeightsSession(folder / decoder) if low_memory else ort_session(folder / decoder)
        metrics = evaluate(reference, session, front, vision_changed=changed["vision"],
                           rows_per_run=1 if low_memory else None, kv_cache=Precision({"graphs": graphs}).kv_cache(decoder))
        del session
        failures = judge(metrics, limits)
        if reference.task is not None:
            metrics["task"] = task_metrics(folder, manifest_data, files, reference.task, fmt, graphs)
            failures += metrics["task"]["failures"]
        results.append({"backends": [backend], "decoder": decoder, "vision": vision,
                        "vision_changed": changed["vision"], **metrics,
                        "passed": not failures, "failures": failures})
    return {
        "format": fmt,
        "floors": limits,
        "target_cos": TARGET_COS,
        "set": {"samples": len(reference.labels), "images": "synthetic (calibration.gate_samples)",
                "prompts": reference.prompt_source, "new_tokens": reference.new_tokens,
                "positions": results[0]["positions"] if results else 0, "reference": reference.decoder},
        "task": None if reference.task is None else {
            "data": reference.task["task"], "questions": len(reference.task["items"]),
            "fp32_accuracy": reference.task["accuracy"], "max_drop": TASK_FLOORS[fmt],
        },
        "evaluated_on": "onnxruntime CPU (TensorRT forms are checked again after each engine build)",
        "passed": all(r["passed"] for r in results),
        "results": results,
    }


def _task_pipeline(folder: Path, manifest_data: dict, files: dict, graphs: dict | None = None):
    """A runtime Pipeline over the staging folder that opens `files` (one precision form) on onnxruntime;
    `graphs`: their precision records (the KV cache form)."""
    from attanchor_runtime import Pipeline
    from attanchor_runtime.manifest import Manifest
    from attanchor_runtime.ort_backend import OrtBackend

    precision = {**manifest_data.get("precision", {}), "backends": {"ort": dict(files)}}
    if graphs:
        precision["graphs"] = graphs
    manifest = Manifest(Path(folder), {**manifest_data, "precision": precision})
    return Pipeline(manifest, OrtBackend(manifest))


def fp32_task_answers(folder: Path, manifest_data: dict, files: dict, task: str) -> dict:
    """The fp32 artifact's answers on the task's gate subset (before any graph is rewritten)."""
    from attanchor_export.checks.task_accuracy import evaluate_artifact, load_task

    items = load_task(task, limit=TASK_GATE_QUESTIONS)
    result = evaluate_artifact(_task_pipeline(folder, manifest_data, files), items)
    return {"task": task, "items": items, "accuracy": result["accuracy"], "by_kind": result["by_kind"],
            "answers": [r["answer"] for r in result["records"]]}


def task_metrics(folder: Path, manifest_data: dict, files: dict, fp32: dict, fmt: str, graphs: dict | None = None) -> dict:
    """Task accuracy of one form vs fp32 on the same questions; failures if it lost more than the floor."""
    from attanchor_export.checks.task_accuracy import evaluate_artifact

    result = evaluate_artifact(_task_pipeline(folder, manifest_data, files, graphs), fp32["items"])
    floor = fp32["accuracy"] - TASK_FLOORS[fmt]
    same = sum(r["answer"] == a for r, a in zip(result["records"], fp32["answers"], strict=True))
    failures = []
    if not result["accuracy"] >= floor - 1e-9:
        failures.append(f"task accuracy {result['accuracy']:.4f} < fp32 {fp32['accuracy']:.4f} - {TASK_FLOORS[fmt]}")
    return {"task": fp32["task"], "questions": len(fp32["items"]), "accuracy": result["accuracy"],
            "fp32_accuracy": fp32["accuracy"], "max_drop": TASK_FLOORS[fmt], "by_kind": result["by_kind"],
            "fp32_by_kind": fp32["by_kind"], "same_answers": same / len(fp32["items"]), "failures": failures}


__all__ = [
    "AccuracyGateFailed", "DEFAULT_NEW_TOKENS", "GATE_FLOORS", "GateReference", "TARGET_COS", "TASK_FLOORS",
    "compute_reference", "evaluate", "floors_for", "fp32_task_answers", "judge", "run_gate", "task_metrics",
]
