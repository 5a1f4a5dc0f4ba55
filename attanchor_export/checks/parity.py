"""Graph-by-graph parity of an artifact against its PyTorch source.

Every case uses shapes other than the traced ones (batch 1 and batch 3 left-padded, prompt and past
lengths the tracer never saw, fresh images), because a graph can match at the traced shape and be
wrong elsewhere. Anchor indices must be identical; float outputs within `atol` (fp32: 1e-4), logits
within atol + 1e-5 x their largest magnitude (`logits_limit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from attanchor_runtime.decoder_feeds import Step, empty_past, past_names, prefill_feeds
from attanchor_runtime.sessions import ort_session

from attanchor_export.checks.torch_reference import anchored_inputs
from attanchor_export.trace.decoder import DecoderWithCache
from attanchor_export.trace.specs import kv_names


@dataclass
class CheckResult:
    graph: str
    case: str
    metric: str
    value: float
    limit: float
    passed: bool

    def to_json(self) -> dict:
        return asdict(self)


def _max_diff(a, b, mask=None) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is not None:
        diff = diff[mask]
    return float(diff.max()) if diff.size else 0.0


LOGITS_RTOL = 1e-5  # ~80 float32 ulps of the largest logit


def logits_limit(atol: float, ref_logits: np.ndarray) -> float:
    """atol + LOGITS_RTOL * max|logit|. Trained models with tied embeddings (SmolLM2 in tiny-vqa) reach
    logits in the tens, where reassociation over 30 layers alone moves them by ~3e-4; an absolute 1e-4
    would fail every correct export of them, and a broken graph is off by far more than either bound."""
    peak = float(np.abs(ref_logits).max()) if ref_logits.size else 0.0
    return float(atol + LOGITS_RTOL * peak)


# Text the validation prompts are cut from (through the artifact's own tokenizer): VQA-style questions
# and captions, so a trained model sees language. Uniformly random ids are mostly rare, barely trained
# rows of a real 49k vocabulary, which drive a trained LM (tiny-vqa's SmolLM2) into outlier activations
# where two correct fp32 implementations differ by 0.02 in the logits; real prompts through the same
# graphs and shapes agree within 1.4e-4 (logits up to 39). What the check is about, shapes the tracer
# never saw, is kept: lengths, batch sizes and padding are as before.
VALIDATION_TEXT = (
    "What is in the image? Describe the image in detail. What color is the car parked next to the green "
    "tree? How many people are walking a dog in the park? Is there a cat sleeping on the brown sofa? What "
    "is on the table near the window? Which object is on the left, and which one is on the right? Is it "
    "day or night? What is written on the sign? A small boat is floating on the water near the mountains."
)


def token_pool(manifest) -> np.ndarray | None:
    """Ids of VALIDATION_TEXT under the artifact's tokenizer, special tokens removed; None without one."""
    path = manifest.folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    dims = manifest.dims
    special = {dims["image_token_id"], dims.get("pad_token_id"), dims.get("bos_token_id"), *dims["eos_token_ids"]}
    ids = [i for i in Tokenizer.from_file(str(path)).encode(VALIDATION_TEXT, add_special_tokens=False).ids
           if i not in special and i < dims["vocab_size"]]
    return np.asarray(ids, np.int64) if len(ids) >= 32 else None


def make_prompts(dims, rng: np.random.Generator, lengths: list[int], pool: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of the given lengths, one image placeholder in each at a random place with at
    least one text token after it (so t2i has candidates). Tokens: a window of `pool` (token_pool) at a
    random offset, or random ids when there is no pool."""
    special = {dims["image_token_id"], dims.get("pad_token_id")}
    width = max(lengths)
    ids = np.full((len(lengths), width), dims.get("pad_token_id") or 0, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        if pool is not None:
            tokens = np.take(pool, np.arange(n) + rng.integers(0, len(pool)), mode="wrap")
        else:
            tokens = rng.integers(0, dims["vocab_size"], size=n)
        while (bad := np.isin(tokens, list(special))).any():
            tokens[bad] = rng.integers(0, dims["vocab_size"], size=int(bad.sum()))
        tokens[rng.integers(0, max(n - 1, 1))] = dims["image_token_id"]
        ids[row, width - n :] = tokens
        mask[row, width - n :] = 1
    return ids, mask


def _pixels(dims, batch, rng) -> np.ndarray:
    return rng.standard_normal((batch, 3, dims["image_size"], dims["image_size"])).astype(np.float32)


# (case, prompt lengths): batch 1 and a left-padded batch of 3, lengths the tracer never saw.
PARITY_CASES = (("batch1", [11]), ("batch3-ragged", [7, 13, 10]))

# Present KV kept for comparison: every layer while they fit in this many bytes, else the first,
# middle and last layers (their logits still depend on all layers), so a 7B reference stays small.
PRESENT_BUDGET_BYTES = 256 << 20


@dataclass
class DecoderCall:
    feeds: dict  # inputs_embeds, attention_mask, position_ids of this call (the past is each side's own)
    logits: np.ndarray
    present: dict  # layer index -> (key, value) of the kept layers
    valid_q: np.ndarray  # [B, S]: real (unpadded) query rows


@dataclass
class ParityCase:
    label: str
    ids: np.ndarray
    text_mask: np.ndarray
    threshold: float
    features: np.ndarray  # the PyTorch tower's image features (fed to embedding.onnx, as before)
    anchored: tuple  # reference inputs_embeds, attention_mask, position_ids, gather_index
    calls: list  # prefill, decode1, decode2


@dataclass
class ParityReference:
    """Everything PyTorch says about the validation inputs; enough to judge the artifact without the model."""

    vision: list  # (case, pixels, reference features)
    cases: list
    kept_layers: list
    method: dict


def compute_reference(loaded, manifest, seed: int = 1234, decoder: bool = True) -> ParityReference:
    """PyTorch outputs for every validation input (vision, anchored inputs, three decoder calls per case).
    `decoder=False`: no decoder calls (the fp32 decoder graph is over the memory budget; the exporter
    then judges the reduced-precision decoder against PyTorch in the accuracy gate instead)."""
    dims, anchor = manifest.dims, manifest.anchor
    rng = np.random.default_rng(seed)
    vision_module = loaded.adapter.vision_tower_and_projector(loaded.model).eval()
    module = DecoderWithCache(loaded.adapter.language_model(loaded.model), loaded.adapter.lm_head(loaded.model),
                              dims["num_layers"])
    torch_decoder = TorchSession(module, ["inputs_embeds", "attention_mask", "position_ids"], dims["num_layers"])
    pool = token_pool(manifest)
    table = loaded.adapter.embed_tokens(loaded.model).weight.detach().float().numpy() if pool is not None else None
    kept = _kept_layers(dims, anchor["max_anchors"])
    reference = ParityReference([], [], kept, {
        "method": "pytorch-reference-first", "present_layers": "all" if len(kept) == dims["num_layers"] else kept,
        "decoder": "parity" if decoder else "skipped: the fp32 decoder is over the memory budget",
    })
    # Lengths and thresholds differ from the tracer's (batch 2, seq 5, past 3).
    threshold_grid = sorted({float(anchor["threshold"]), 2.0})
    for case, lengths in PARITY_CASES:
        pixels = _pixels(dims, len(lengths), rng)
        with torch.no_grad():
            features = vision_module(torch.from_numpy(pixels)).numpy()
        reference.vision.append((case, pixels, features))
        ids, text_mask = make_prompts(dims, rng, lengths, pool)
        for threshold in threshold_grid:
            anchored = tuple(np.asarray(t) for t in anchored_inputs(
                loaded, ids, text_mask, pixels, threshold, mode=anchor["mode"], max_anchors=anchor["max_anchors"],
                excluded_token_ids=anchor.excluded_token_ids))
            calls = _reference_calls(torch_decoder, dims, anchored[:3], kept, rng, pool, table) if decoder else []
            reference.cases.append(ParityCase(f"{case} thr={threshold:g}", ids, text_mask, threshold, features,
                                              anchored, calls))
    return reference


def _kept_layers(dims, max_anchors: int | None) -> list[int]:
    layers = dims["num_layers"]
    batch = max(len(lengths) for _, lengths in PARITY_CASES)
    text = max(max(lengths) for _, lengths in PARITY_CASES)
    anchors = max_anchors or max(text, dims["image_tokens"])  # at most one per candidate, or the budget K
    longest = text + dims["image_tokens"] + anchors + 2  # prompt, image tokens, anchors, two decode steps
    per_layer = 2 * batch * dims["num_kv_heads"] * longest * dims["head_dim"] * 4
    if per_layer * layers <= PRESENT_BUDGET_BYTES:
        return list(range(layers))
    return sorted({0, layers // 2, layers - 1})


def _reference_calls(torch_decoder, dims, prefill, kept, rng, pool, table) -> list[DecoderCall]:
    """Prefill the anchored prompt, then two cached steps on PyTorch's own cache. The step embeddings
    are real table rows (random ones without a token pool), drawn here so the artifact gets the same."""
    embeds, mask, pos = prefill
    batch, layers = embeds.shape[0], dims["num_layers"]
    names = past_names(layers)
    feeds = prefill_feeds(embeds, mask, pos, empty_past(dims, batch))
    step = Step.after_prefill(mask, pos)
    calls = []
    for i in range(3):
        outs = torch_decoder.run(None, feeds)
        call_feeds = {k: feeds[k] for k in ("inputs_embeds", "attention_mask", "position_ids")}
        width = feeds["inputs_embeds"].shape[1]
        calls.append(DecoderCall(call_feeds, outs[0], {j: (outs[1 + 2 * j], outs[2 + 2 * j]) for j in kept},
                                 feeds["attention_mask"][:, -width:].astype(bool)))
        if table is not None:  # embeddings of real tokens, as decode steps see them
            step_embeds = table[rng.choice(pool, size=batch)][:, None, :].astype(np.float32)
        else:
            step_embeds = rng.standard_normal((batch, 1, dims["hidden_size"])).astype(np.float32)
        if i == 2:  # the third draw is unused; kept so the inputs of later cases stay as they were
            break
        step = step.advance()
        feeds = step.feeds(step_embeds, names, outs[1:])
    return calls


def compare_to_reference(reference: ParityReference, manifest, atol: float = 1e-4) -> list[CheckResult]:
    """Run the artifact's graphs (onnxruntime, CPU) on the reference's inputs and judge every output."""
    dims = manifest.dims
    results: list[CheckResult] = []

    def record(graph, case, metric, value, limit):
        results.append(CheckResult(graph, case, metric, float(value), float(limit), bool(value <= limit)))

    # One graph open at a time, without onnxruntime's arena: a big model's export peaks here.
    vision = ort_session(manifest.graph_path("vision"), memory_arena=False)
    for case_name, pixels, ref_features in reference.vision:
        (features,) = vision.run(["image_features"], {"pixel_values": pixels})
        record("vision", case_name, "max_abs_diff", _max_diff(features, ref_features), atol)
    del vision
    embedding = ort_session(manifest.graph_path("embedding"))
    with_decoder = any(case.calls for case in reference.cases)
    decoder = ort_session(manifest.graph_path("decoder"), memory_arena=False) if with_decoder else None
    for case in reference.cases:
        ref_embeds, ref_mask, ref_pos, ref_index = case.anchored
        feeds = {"input_ids": case.ids, "text_attention_mask": case.text_mask,
                 "image_features": case.features, "threshold": np.array(case.threshold, np.float32)}
        embeds, mask, pos, index = embedding.run(
            ["inputs_embeds", "attention_mask", "position_ids", "gather_index"], feeds)
        same_layout = index.shape == ref_index.shape and (index == ref_index).all() and (mask == ref_mask).all()
        record("embedding", case.label, "anchor_index_mismatch", 0 if same_layout else 1, 0)
        if not same_layout:
            continue
        record("embedding", case.label, "position_ids_mismatch", int((pos != ref_pos).sum()), 0)
        record("embedding", case.label, "max_abs_diff", _max_diff(embeds, ref_embeds), atol)
        if decoder is not None:
            results.extend(_compare_decoder(decoder, dims, case, reference.kept_layers, atol))
    return results


def _compare_decoder(decoder, dims, case: ParityCase, kept: list[int], atol: float) -> list[CheckResult]:
    """The artifact's decoder on the reference's feeds, each call on the artifact's own cache; logits
    and present KV compared on real (unpadded) positions only."""
    results = []
    names = past_names(dims["num_layers"])
    past = empty_past(dims, case.calls[0].feeds["inputs_embeds"].shape[0])
    for step, call in zip(("prefill", "decode1", "decode2"), case.calls):
        outs = decoder.run(None, {**call.feeds, **past})
        logits = outs[0]
        ref_logits = call.logits[:, -logits.shape[1]:]  # last-logits-only graphs return one position
        valid_q = call.valid_q[:, -logits.shape[1]:]
        valid_kv = call.feeds["attention_mask"].astype(bool)[:, None, :, None]
        kv_diff = max(
            _max_diff(got, want, np.broadcast_to(valid_kv, got.shape))
            for j in kept
            for got, want in zip((outs[1 + 2 * j], outs[2 + 2 * j]), call.present[j])
        )
        logits_diff = _max_diff(logits, ref_logits, valid_q)
        limit = logits_limit(atol, ref_logits[valid_q])
        label = f"{case.label} {step}"
        results.append(CheckResult("decoder", label, "logits_max_abs_diff", logits_diff, limit, logits_diff <= limit))
        results.append(CheckResult("decoder", label, "present_max_abs_diff", kv_diff, atol, kv_diff <= atol))
        past = dict(zip(names, outs[1:]))
    return results


def validate_graphs(loaded, manifest, atol: float = 1e-4, seed: int = 1234) -> list[CheckResult]:
    """Graph parity in one call (the `check` verb); export runs the two halves with the model freed between."""
    return compare_to_reference(compute_reference(loaded, manifest, seed), manifest, atol)


class TorchSession:
    """A torch module behind onnxruntime's `run(names, feeds)`: the same feeds go to both sides of a
    comparison (graph parity here, the accuracy gate of a quantized artifact in recheck.py)."""

    def __init__(self, module, input_names: list[str], flat_past: int = 0):
        self.module, self.input_names, self.flat_past = module.eval(), input_names, flat_past

    def run(self, output_names, feeds):
        args = [torch.from_numpy(feeds[n]) for n in self.input_names]
        if self.flat_past:
            past = tuple(torch.from_numpy(feeds[n]) for n in kv_names(self.flat_past, "past_key_values"))
            args.append(past)
        with torch.no_grad():
            outs = self.module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return [o.numpy() for o in outs]


def validate_end_to_end(loaded, manifest, max_new_tokens: int = 12, seed: int = 99) -> list[CheckResult]:
    """Greedy tokens of the torch-free runtime vs the PyTorch reference (the HF language model fed the
    same anchored embeddings and position ids), plus `transformers` generate where no anchor is inserted.
    Batch 1 and ragged batch 3; thresholds: none inserted (2.0), the default, and half the default."""
    from attanchor_runtime.pipeline import Pipeline

    from attanchor_export.checks.torch_reference import expand_image_tokens, greedy_generate

    dims, anchor = manifest.dims, manifest.anchor
    pipe = Pipeline.load(manifest.folder, verify="none")
    rng = np.random.default_rng(seed)
    pool = token_pool(manifest)
    eos = dims["eos_token_ids"] or None
    results = []
    default = float(anchor["threshold"])
    for case, lengths in (("batch1", [9]), ("batch3-ragged", [12, 6, 9])):
        ids, mask = make_prompts(dims, rng, lengths, pool)
        pixels = _pixels(dims, len(lengths), rng)
        rows = [r[m.astype(bool)] for r, m in zip(ids, mask)]
        for threshold in (2.0, default, default / 2):
            label = f"{case} thr={threshold:g}"
            out = pipe.generate(input_ids=rows, pixel_values=pixels, max_new_tokens=max_new_tokens,
                                threshold=threshold)
            embeds, amask, pos, _ = anchored_inputs(loaded, ids, mask, pixels, threshold,
                                                    mode=anchor["mode"], max_anchors=anchor["max_anchors"],
                                                    excluded_token_ids=anchor.excluded_token_ids)
            ref = greedy_generate(loaded, embeds, amask, pos, max_new_tokens, eos_token_id=eos).numpy()
            anchors = sum(len(a) for a in out.anchors)
            results.append(_token_check(f"{label} anchors={anchors}", out.tokens, ref, "vs reference"))
            if threshold > 1:
                hf_ids, hf_mask = expand_image_tokens(ids, mask, dims["image_token_id"], dims["image_tokens"],
                                                      dims["pad_token_id"] or 0)
                with torch.no_grad():
                    generated = loaded.model.generate(
                        input_ids=hf_ids, attention_mask=hf_mask, pixel_values=torch.from_numpy(pixels),
                        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                        pad_token_id=dims["pad_token_id"] or 0,
                    )
                hf = generated[:, hf_ids.shape[1]:].numpy()
                results.append(_token_check(label, out.tokens, hf, "vs transformers generate"))
    return results


def _token_check(case: str, tokens: np.ndarray, ref: np.ndarray, what: str) -> CheckResult:
    width = max(tokens.shape[1], ref.shape[1])
    a = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=-1)
    b = np.pad(ref, ((0, 0), (0, width - ref.shape[1])), constant_values=-1)
    mismatches = int((a != b).sum()) if a.shape == b.shape else a.size
    return CheckResult("end-to-end", case, f"token_mismatch {what}", mismatches, 0, mismatches == 0)
