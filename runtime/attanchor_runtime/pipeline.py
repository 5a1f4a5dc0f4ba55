"""Pipeline: artifact folder -> text. Vision, anchors, prefill, then a KV-cache decode loop.

    pipe = Pipeline.load("out/tiny")                       # backend "ort" (cpu|cuda) or "trt"
    out = pipe.generate(input_ids=ids, pixel_values=pix, max_new_tokens=32)
    front = pipe.front_end(ids, pix)                       # vision + embedding + anchors only
    pipe.chat("What is in the image?", image="cat.jpg")    # -> str
    stream = pipe.stream("What is in the image?", "cat.jpg")
    for piece in stream: print(piece, end="")              # then stream.output: the GenerateOutput
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from attanchor_graphs.reference import anchor_insert, anchor_pairs, position_ids_from_mask

from . import prompt_cost
from .decoder_feeds import Step
from .errors import NumericsError, RuntimeInputError
from .image_placeholders import image_run_keep, image_run_starts
from .manifest import Manifest
from .sampling import Sampler


@dataclass
class GenerateOutput:
    tokens: np.ndarray  # int64 [B, new]: generated ids only; rows that stopped early are padded
    anchors: list[list[tuple[int, int]]]  # per row: (index in that row's input_ids, image index)
    lengths: np.ndarray  # int64 [B]: generated tokens per row, EOS included
    timings: dict = field(default_factory=dict)  # seconds: vision, embedding, prefill, decode_steps
    # K when the prompt's anchors were cut to the K best per row so prompt + anchors + new tokens fit
    # the context (an artifact without a budget K only); None when every anchor was kept.
    anchor_cap: int | None = None


@dataclass
class PreparedBatch:
    """input_ids left-padded to one width, one placeholder per row, and where each row came from."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    # source_index[b][j] = index in the caller's row b of the token now at padded column j
    source_index: list[np.ndarray]


def prepare_input_ids(input_ids, image_token_id: int, pad_token_id: int, attention_mask=None) -> PreparedBatch:
    """Accept [B, T] or a list of 1-D rows; collapse placeholder runs; left-pad."""
    if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != input_ids.shape:
            raise RuntimeInputError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
        rows = [np.asarray(r)[np.asarray(m).astype(bool)] for r, m in zip(input_ids, mask)]
        offsets = [int(np.argmax(m)) if np.asarray(m).any() else 0 for m in mask]
    elif isinstance(input_ids, (str, bytes)):
        raise RuntimeInputError("input_ids must be token ids (int64 [B, T] or a list of 1-D arrays), not text")
    elif isinstance(input_ids, Sequence) or (isinstance(input_ids, np.ndarray) and input_ids.ndim == 1):
        rows = [np.asarray(r) for r in (input_ids if not isinstance(input_ids, np.ndarray) else [input_ids])]
        offsets = [0] * len(rows)
    else:
        raise RuntimeInputError("input_ids must be an int64 [B, T] array or a list of 1-D arrays")
    if not rows:
        raise RuntimeInputError("input_ids is empty")
    kept_rows, sources = [], []
    for b, row in enumerate(rows):
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise RuntimeInputError(f"input_ids row {b} must be a 1-D integer array, got {row.dtype} {row.shape}")
        # A run of placeholders (newer HF processors expand <image> to M tokens) counts as one.
        runs = image_run_starts(row, image_token_id).size
        if runs != 1:
            raise RuntimeInputError(f"input_ids row {b} has {runs} image placeholder runs, expected exactly 1")
        keep = image_run_keep(row, image_token_id)
        kept_rows.append(row[keep].astype(np.int64))
        sources.append(np.flatnonzero(keep) + offsets[b])
    width = max(len(r) for r in kept_rows)
    ids = np.full((len(kept_rows), width), pad_token_id, np.int64)
    mask = np.zeros((len(kept_rows), width), np.int64)
    source_index = []
    for b, row in enumerate(kept_rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
        source_index.append(np.concatenate([np.full(width - len(row), -1), sources[b]]))
    return PreparedBatch(ids, mask, source_index)


@dataclass
class FrontEnd:
    """Everything before the decoder for one batch: what the prefill is fed and what it came from."""

    batch: PreparedBatch  # the caller's input_ids as the embedding graph received them
    image_features: np.ndarray  # float32 [B, M, D]: the vision graph's output
    inputs_embeds: np.ndarray  # [B, L, H]: text, image features and anchors, left padded
    attention_mask: np.ndarray  # int64 [B, L]
    position_ids: np.ndarray  # int64 [B, L]
    gather_index: np.ndarray  # int64 [B, L]: text n -> n, image m -> T + m (T = batch width)
    anchors: list[list[tuple[int, int]]]  # as GenerateOutput.anchors
    timings: dict  # seconds: vision, embedding
    anchor_cap: int | None = None  # as GenerateOutput.anchor_cap


def _check_budget(gib: float | None) -> None:
    if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0):
        raise RuntimeInputError(f"memory_budget must be a positive number of GiB, got {gib!r}")


def _rss_bytes() -> int:
    """This process's resident memory now (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Stream(Iterator[str]):
    """The text pieces of one answer, as they are decoded; `.output` is the GenerateOutput afterwards.

    Iterate it as a transformers TextIteratorStreamer (`"".join(stream)` is the answer); once it is
    exhausted, `output` holds the tokens, anchors and timings that `generate` would have returned.
    Before that `output` is None. Nothing runs until the first piece is asked for.
    """

    def __init__(self, pieces):
        self.output: GenerateOutput | None = None
        self._pieces = pieces(self)

    def __next__(self) -> str:
        return next(self._pieces)


class Pipeline:
    def __init__(self, manifest: Manifest, backend, text=None, image_preprocessor=None):
        self.manifest, self.backend = manifest, backend
        dims, text_cfg = manifest.dims, manifest.text
        self.image_token_id = int(text_cfg["image_token_id"])
        self.pad_token_id = int(text_cfg.get("pad_token_id") if text_cfg.get("pad_token_id") is not None else 0)
        self.eos_token_ids = [int(i) for i in text_cfg.get("eos_token_ids") or []]
        self.max_positions = int(dims["max_position_embeddings"])
        self.default_threshold = float(manifest.anchor["threshold"])
        self.mode = manifest.anchor["mode"]
        # Decode steps embed new tokens straight from the table file: no graph, no copy of the table.
        self.embed_table = manifest.embed_table()
        self.vocab_size = int(self.embed_table.shape[0])
        self._text, self._images = text, image_preprocessor
        # GiB one generate call may use (prompt_cost); None: what is available when the call starts.
        self.memory_budget: float | None = None
        self._rss_at_load = _rss_bytes()

    @classmethod
    def load(cls, folder, backend: str = "ort", device: str = "cpu", threads: int | None = None,
             verify: str = "size", memory_budget: float | None = None) -> Pipeline:
        """verify: "none", "size" (default: catches missing and truncated files) or "sha256" (reads every
        byte: also catches a same-size edit). memory_budget: GiB one generate call may use (see
        prompt_cost); None = the memory available at each call."""
        if verify not in ("none", "size", "sha256"):
            raise RuntimeInputError(f"verify must be none, size or sha256, got {verify!r}")
        _check_budget(memory_budget)
        manifest = Manifest.load(folder, verify=verify)
        if backend == "ort":
            from .ort_backend import OrtBackend

            impl = OrtBackend(manifest, device=device, threads=threads)
        elif backend == "trt":
            from .trt_backend import TrtBackend

            impl = TrtBackend(manifest)
        else:
            raise RuntimeInputError(f"unknown backend {backend!r}: choose ort or trt")
        pipe = cls(manifest, impl)
        pipe.memory_budget = memory_budget
        return pipe

    # -- text and images, loaded on first use so generate() alone needs neither ---------------------
    @property
    def text(self):
        if self._text is None:
            from .text import TextProcessor

            t = self.manifest.text
            self._text = TextProcessor.from_folder(
                self.manifest.folder, chat_template=t.get("chat_template"), image_token=t.get("image_token"),
                image_token_id=t.get("image_token_id"), bos_token_id=t.get("bos_token_id"),
                eos_token_id=t.get("eos_token_ids") or None, pad_token_id=t.get("pad_token_id"),
            )
        return self._text

    @property
    def images(self):
        if self._images is None:
            from .preprocess import ImagePreprocessor

            self._images = ImagePreprocessor.from_config(self.manifest.data["image_preprocessing"])
        return self._images

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, input_ids, pixel_values, max_new_tokens: int = 32, threshold: float | None = None,
                 attention_mask=None, **sampling) -> GenerateOutput:
        *_, output = self.generate_steps(input_ids, pixel_values, max_new_tokens, threshold, attention_mask,
                                         **sampling)
        return output  # the last item generate_steps yields is the GenerateOutput

    def generate_steps(self, input_ids, pixel_values, max_new_tokens: int = 32, threshold: float | None = None,
                       attention_mask=None, memory_budget: float | None = None, **sampling) -> Iterator:
        """Yields each step's new tokens (int64 [B]) and finally the GenerateOutput.

        memory_budget: GiB this call may use (default: the pipeline's, see Pipeline.load); a prompt whose
        estimated cost (prompt_cost) is over it is refused before it runs."""
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        front = self.front_end(input_ids, pixel_values, threshold, attention_mask, max_new_tokens=max_new_tokens,
                               memory_budget=memory_budget)
        yield from self.decode_steps(front, max_new_tokens, **sampling)

    def decode_steps(self, front: FrontEnd, max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     eos_token_id=None, stop_token_ids: Sequence[int] = ()) -> Iterator:
        """The decode loop over a `front_end` result: as `generate_steps`, for a caller that needs the
        anchors before the answer ends (a server sends them with its stream and may stop early)."""
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = self.eos_token_ids if eos_token_id is None else list(np.atleast_1d(eos_token_id))
        stop = np.array(sorted({*eos, *stop_token_ids}), np.int64)
        sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
        timings, clock = dict(front.timings), time.perf_counter
        seq_len = front.inputs_embeds.shape[1]
        if seq_len + max_new_tokens > self.max_positions:
            raise RuntimeInputError(
                f"prompt ({seq_len} positions with image tokens and anchors) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's context of {self.max_positions}"
            )

        B = len(front.batch.input_ids)
        t0 = clock()
        logits, past = self.backend.decode(front.inputs_embeds, front.attention_mask, front.position_ids,
                                           self.backend.empty_cache(B))
        timings["prefill"] = clock() - t0
        step = Step.after_prefill(front.attention_mask, front.position_ids)
        tokens = np.full((B, max_new_tokens), self.pad_token_id, np.int64)
        lengths = np.zeros(B, np.int64)
        done = np.zeros(B, bool)
        step_times = []
        for i in range(max_new_tokens):
            last = logits[:, -1, :]
            if not np.isfinite(last).all():
                raise NumericsError(self._numerics_message(i))
            new = np.where(done, self.pad_token_id, sampler(last))
            tokens[:, i] = new
            lengths += ~done
            done |= np.isin(new, stop)
            yield new
            if done.all() or i == max_new_tokens - 1:
                break
            t0 = clock()
            step = step.advance()
            step_embeds = np.asarray(self.embed_table[new], np.float32)[:, None, :]
            logits, past = self.backend.decode(step_embeds, step.attention_mask, step.position_ids, past)
            step_times.append(clock() - t0)
        timings["decode_steps"] = step_times
        yield GenerateOutput(tokens[:, : int(lengths.max())], front.anchors, lengths, timings, front.anchor_cap)

    def _numerics_message(self, step: int) -> str:
        precision = self.manifest.precision
        where = f"{self.manifest.graphs['decoder']['file']} produced NaN/Inf logits at step {step} ({precision.label})"
        if not precision.quantized:  # fp32 has no lower precision to blame: the weights or inputs are at fault
            return (f"{where}: the artifact's weights or this input hold NaN/Inf; "
                    f"run attanchor-export check {self.manifest.folder}")
        return f"{where}: use an fp32 artifact or another precision"

    def front_end(self, input_ids, pixel_values, threshold: float | None = None, attention_mask=None,
                  max_new_tokens: int = 0, memory_budget: float | None = None) -> FrontEnd:
        """Vision, embedding and anchors for a batch: the decoder's prefill inputs (see FrontEnd).

        input_ids and attention_mask as for `generate`; threshold None = the manifest's default.
        max_new_tokens: positions to leave free in the context. A prompt that cannot fit is refused before
        anything runs; anchors that would not fit are cut to the best K per row (FrontEnd.anchor_cap)."""
        batch = prepare_input_ids(input_ids, self.image_token_id, self.pad_token_id, attention_mask)
        self._check_token_ids(batch)
        B, width = batch.input_ids.shape
        M, K = int(self.manifest.dims["image_tokens"]), self.manifest.anchor.max_anchors
        positions = width - 1 + M + (K or 0)  # before anchors; with K, the static length
        if positions + max_new_tokens > self.max_positions:
            raise RuntimeInputError(
                f"prompt ({width} tokens, {M} image tokens{f', {K} anchor slots' if K else ''}) + max_new_tokens "
                f"({max_new_tokens}) exceeds the model's context of {self.max_positions}: shorten the prompt"
            )
        self._check_memory(B, positions, max_new_tokens, memory_budget)
        pixels = self._check_pixels(pixel_values, B)
        threshold = self.default_threshold if threshold is None else float(threshold)
        if not np.isfinite(threshold):
            raise RuntimeInputError(f"threshold must be a finite number, got {threshold}")
        clock = time.perf_counter
        t0 = clock()
        features = self.backend.vision(pixels)
        t1 = clock()
        embedded = self.backend.embed(batch.input_ids, batch.attention_mask, features, threshold)
        t2 = clock()
        cap = None
        if not K and embedded["inputs_embeds"].shape[1] + max_new_tokens > self.max_positions:
            cap = self.max_positions - max_new_tokens - positions  # >= 0: the prompt alone fits
            embedded = self._capped_anchors(batch, features, threshold, cap)
        if embedded["inputs_embeds"].shape[1] > positions:
            self._check_memory(B, embedded["inputs_embeds"].shape[1], max_new_tokens, memory_budget)
        anchors = self._anchors(embedded["gather_index"], embedded["attention_mask"], batch)
        return FrontEnd(batch, features, embedded["inputs_embeds"], embedded["attention_mask"],
                        embedded["position_ids"], embedded["gather_index"], anchors,
                        {"vision": t1 - t0, "embedding": t2 - t1}, cap)

    def _capped_anchors(self, batch: PreparedBatch, features: np.ndarray, threshold: float, cap: int) -> dict:
        """The embedding graph's outputs with at most `cap` anchors per row (the highest scores), computed
        with the AnchorInsert reference (the specification the graph is held to) from the same table rows
        and image features; the graph itself has no budget to pass."""
        ids, mask = batch.input_ids, batch.attention_mask
        text = np.asarray(self.embed_table[ids], np.float32)
        image_position = np.argmax(ids == self.image_token_id, axis=1).astype(np.int64)
        limit = (np.float32(np.inf), None) if cap == 0 else (threshold, cap)  # K = 0 means "no budget"
        gather, out_mask = anchor_insert(text, features, mask, image_position, limit[0], self.mode, limit[1])
        used = int(out_mask.sum(axis=1).max())
        gather, out_mask = gather[:, gather.shape[1] - used:], out_mask[:, out_mask.shape[1] - used:]
        sources = np.concatenate([text, features.astype(np.float32, copy=False)], axis=1)
        embeds = np.take_along_axis(sources, gather[:, :, None], axis=1)
        return {"inputs_embeds": embeds, "attention_mask": out_mask, "position_ids": position_ids_from_mask(out_mask),
                "gather_index": gather}

    def _check_token_ids(self, batch: PreparedBatch) -> None:
        """Negative ids would wrap around in the table lookup; ids past the table fail inside onnxruntime."""
        for b, (row, mask) in enumerate(zip(batch.input_ids, batch.attention_mask, strict=True)):
            real = row[mask.astype(bool)]
            if real.size and real.min() < 0:
                raise RuntimeInputError(f"input_ids row {b} holds token id {int(real.min())}: ids must be >= 0")
            if real.size and real.max() >= self.vocab_size:
                raise RuntimeInputError(f"input_ids row {b} holds token id {int(real.max())}, outside the "
                                        f"vocabulary of {self.vocab_size} (ids 0..{self.vocab_size - 1})")

    def _check_memory(self, batch: int, positions: int, new_tokens: int, budget_gib: float | None) -> None:
        _check_budget(budget_gib)
        budget_gib = self.memory_budget if budget_gib is None else budget_gib
        if budget_gib is None:  # what is free, plus what this process already holds beyond the loaded weights
            budget = prompt_cost.available_bytes() + max(0, _rss_bytes() - self._rss_at_load)
        else:
            budget = int(budget_gib * (1 << 30))
        logits = self.manifest.graphs["decoder"]["outputs"][0]["shape"]
        need = prompt_cost.prompt_bytes(self.manifest.dims, batch, positions, new_tokens,
                                        all_logits=len(logits) < 2 or logits[1] != 1)
        if need > budget:
            raise RuntimeInputError(
                f"this call would need about {prompt_cost.gib(need)} ({batch} row(s) x {positions} positions + "
                f"{new_tokens} new tokens: KV cache, attention, logits), over the memory budget of "
                f"{prompt_cost.gib(budget)}: shorten the prompt, lower max_new_tokens or the batch, or raise the "
                "budget (memory_budget=GiB, --memory-budget)"
            )

    def _check_pixels(self, pixel_values, batch: int) -> np.ndarray:
        pixels = np.asarray(pixel_values)
        size = self.manifest.dims["image_size"]
        if pixels.shape != (batch, 3, size, size):
            raise RuntimeInputError(
                f"pixel_values must be float32 [{batch}, 3, {size}, {size}] (one image per row), got {pixels.shape}"
            )
        if not np.issubdtype(pixels.dtype, np.floating):
            raise RuntimeInputError(
                f"pixel_values must be float32 as the image processor makes them (pipe.images(image)), got "
                f"{pixels.dtype}: raw 0-255 pixels are not normalized"
            )
        if not np.isfinite(pixels).all():
            raise RuntimeInputError("pixel_values contain NaN or Inf")
        low, high = self.images.value_range(margin=4.0)
        if pixels.min() < low or pixels.max() > high:
            raise RuntimeInputError(
                f"pixel_values range from {float(pixels.min()):.4g} to {float(pixels.max()):.4g}, far outside "
                f"what the artifact's image processor makes ({self.images.value_range()[0]:.3g} to "
                f"{self.images.value_range()[1]:.3g}): pass pipe.images(image), not raw pixels"
            )
        return pixels.astype(np.float32, copy=False)

    def _anchors(self, gather_index, out_mask, batch: PreparedBatch) -> list[list[tuple[int, int]]]:
        width = batch.input_ids.shape[1]
        pairs = anchor_pairs(gather_index, out_mask, width, self.mode)
        return [[(int(batch.source_index[b][t]), int(m)) for t, m in row] for b, row in enumerate(pairs)]

    # -- chat -----------------------------------------------------------------------------------
    def _chat_inputs(self, prompt: str, image):
        return [self.text.prompt_ids(prompt)], self.images(image)

    def chat(self, prompt: str, image, max_new_tokens: int = 128, **kwargs) -> str:
        return "".join(self.stream(prompt, image, max_new_tokens=max_new_tokens, **kwargs))

    def stream(self, prompt: str, image, max_new_tokens: int = 128, **kwargs) -> Stream:
        """Answer `prompt` about `image` piece by piece: a Stream of str, then `.output` (see Stream).

        kwargs as for `generate_steps` (threshold, sampling, stop_token_ids); stop tokens are not shown."""
        stop = set(self.eos_token_ids) | set(kwargs.get("stop_token_ids", ()))

        def pieces(stream: Stream) -> Iterator[str]:
            ids, pixels = self._chat_inputs(prompt, image)
            decoder = self.text.stream_decoder()
            for item in self.generate_steps(ids, pixels, max_new_tokens=max_new_tokens, **kwargs):
                if isinstance(item, GenerateOutput):
                    stream.output = item
                    break
                token = int(item[0])
                if token in stop:
                    continue
                piece = decoder.push(token)
                if piece:
                    yield piece
            tail = decoder.flush() if hasattr(decoder, "flush") else ""
            if tail:
                yield tail

        return Stream(pieces)
