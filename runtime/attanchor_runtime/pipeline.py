"""Pipeline: artifact folder -> text. Vision, anchors, prefill, then the decode loop (decode.generate).

    pipe = Pipeline.load("out/tiny")                       # backend "ort" (cpu|cuda) or "trt"
    out = pipe.generate(input_ids=ids, pixel_values=pix, max_new_tokens=32)
    front = pipe.front_end(ids, pix)                       # vision + embedding + anchors only
    for step in pipe.decode_steps(front, 32): ...          # the decode loop on it (what generate runs next)
    pipe.chat("What is in the image?", image="cat.jpg")    # -> str
    stream = pipe.stream("What is in the image?", "cat.jpg")
    for piece in stream: print(piece, end="")              # then stream.output: the GenerateOutput

What differs between model families (preprocessing, prompts, positions, the checks of what a caller
passes) comes from the artifact's family adapter (attanchor_runtime.families); the backend is any
decode.Backend. A prompt that cannot fit the context or the memory budget (prompt_cost) is refused
before the vision graph runs; anchors that would overflow the context are cut to the best per row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from attanchor_graphs.specification import anchor_pairs

from . import prompt_cost
from .batch import PreparedBatch
from .decode import Generated, generate
from .errors import NumericsError, RuntimeInputError
from .families import family_of
from .manifest import Manifest
from .ort_backend import OrtBackend
from .sampling import Sampler
from .text import TextProcessor
from .trt_backend import TrtBackend


@dataclass
class GenerateOutput:
    tokens: np.ndarray  # int64 [B, new]: generated ids only; rows that stopped early are padded
    anchors: list[list[tuple[int, int]]]  # per row: (index in that row's input_ids, image index)
    lengths: np.ndarray  # int64 [B]: generated tokens per row, EOS included
    # seconds: vision, embedding, prefill, decode_steps (per step, inside the decoder)
    timings: dict = field(default_factory=dict)
    # K when the prompt's anchors were cut to the K best per row so prompt + anchors + new tokens fit
    # the context (an artifact without a budget K only); None when every anchor was kept.
    anchor_cap: int | None = None


@dataclass
class FrontEnd:
    """Everything before the decoder for one batch: what the prefill is fed and what it came from."""

    batch: PreparedBatch  # the caller's input_ids as the embedding graph received them
    image_features: np.ndarray  # float32 [B, M, D]: the vision graph's output
    inputs_embeds: np.ndarray  # [B, L, H]: text, image features and anchors, left padded
    attention_mask: np.ndarray  # int64 [B, L]
    position_ids: np.ndarray  # int64: the family's positions ([B, L] for LLaVA)
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
    def __init__(self, manifest: Manifest, backend, text: TextProcessor | None = None, image_preprocessor=None):
        self.manifest, self.backend = manifest, backend
        self.family = family_of(manifest)
        text_cfg = manifest.text
        self.image_token_id = text_cfg.image_token_id
        self.pad_token_id = text_cfg.pad_or_zero
        self.eos_token_ids = list(text_cfg.eos_token_ids)
        self.max_positions = manifest.dims.max_position_embeddings
        self.default_threshold = manifest.anchor.threshold
        self.mode = manifest.anchor.mode
        # Decode steps embed new tokens straight from the table file: no graph, no copy of the table.
        self.embed_table = manifest.embed_table_memmap()
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
            impl = OrtBackend(manifest, device=device, threads=threads)
        elif backend == "trt":
            impl = TrtBackend(manifest)
        else:
            raise RuntimeInputError(f"unknown backend {backend!r}: choose ort or trt")
        pipe = cls(manifest, impl)
        pipe.memory_budget = memory_budget
        return pipe

    # -- text and images, loaded on first use so generate() alone needs neither ---------------------
    @property
    def text(self) -> TextProcessor:
        if self._text is None:
            t = self.manifest.text
            self._text = TextProcessor.from_folder(
                self.manifest.folder, chat_template=t.chat_template, image_token=t.image_token,
                image_token_id=t.image_token_id, bos_token_id=t.bos_token_id,
                eos_token_id=list(t.eos_token_ids) or None, pad_token_id=t.pad_token_id,
            )
        return self._text

    @property
    def images(self):
        """The family's image preprocessor: image(s) -> the vision graph's pixel input."""
        if self._images is None:
            self._images = self.family.image_processor()
        return self._images

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids [B] -> their embeddings [B, 1, H], as every decode step embeds its new tokens."""
        return np.asarray(self.embed_table[np.asarray(token_ids, np.int64)], np.float32)[:, None, :]

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, input_ids, pixel_values, max_new_tokens: int = 32, threshold: float | None = None,
                 attention_mask=None, **sampling) -> GenerateOutput:
        *_, output = self.generate_steps(input_ids, pixel_values, max_new_tokens, threshold, attention_mask,
                                         **sampling)
        return output  # the last item generate_steps yields is the GenerateOutput

    def generate_steps(self, input_ids, pixel_values, max_new_tokens: int = 32, threshold: float | None = None,
                       attention_mask=None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
                       stop_token_ids: Sequence[int] = (), front: FrontEnd | None = None,
                       memory_budget: float | None = None, **image_inputs) -> Iterator:
        """Yields each step's new tokens (int64 [B]) and finally the GenerateOutput.
        front: `front_end`'s result for these inputs, computed beforehand (a benchmark times it apart).
        memory_budget: GiB this call may use (default: the pipeline's, see Pipeline.load); a prompt whose
        estimated cost (prompt_cost) is over it is refused before it runs.
        image_inputs: vision inputs beside pixel_values that a family's processor returns (front_end)."""
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if front is None:
            front = self.front_end(input_ids, pixel_values, threshold, attention_mask, max_new_tokens=max_new_tokens,
                                   memory_budget=memory_budget, **image_inputs)
        yield from self.decode_steps(front, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed, eos_token_id=eos_token_id, stop_token_ids=stop_token_ids)

    def decode_steps(self, front: FrontEnd, max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     eos_token_id=None, stop_token_ids: Sequence[int] = ()) -> Iterator:
        """The decode loop (decode.generate) over a `front_end` result: as `generate_steps`, for a caller
        that needs the anchors before the answer ends (a server sends them with its stream and may stop
        early: closing the iterator stops the loop)."""
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = self.eos_token_ids if eos_token_id is None else list(np.atleast_1d(eos_token_id))
        sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
        seq_len = front.inputs_embeds.shape[1]
        if seq_len + max_new_tokens > self.max_positions:
            raise RuntimeInputError(
                f"prompt ({seq_len} positions with image tokens and anchors) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's context of {self.max_positions}"
            )
        step = self.family.first_step(front.attention_mask, front.position_ids)
        run = generate(self.backend, step, front.inputs_embeds, self.embed, max_new_tokens, choose=sampler,
                       stop_ids=[*eos, *stop_token_ids], pad_id=self.pad_token_id, check=self._check_logits)
        for item in run:  # each step's tokens as soon as they are chosen; the last item is the record
            if isinstance(item, Generated):
                done = item
            else:
                yield item
        timings = {**front.timings, "prefill": done.call_seconds[0], "decode_steps": done.call_seconds[1:]}
        yield GenerateOutput(done.tokens, front.anchors, done.lengths, timings, front.anchor_cap)

    def _check_logits(self, logits: np.ndarray, step: int) -> None:
        if not np.isfinite(logits).all():
            raise NumericsError(self._numerics_message(step))

    def _numerics_message(self, step: int) -> str:
        precision = self.manifest.precision
        where = (f"{self.manifest.graph_file('decoder', self.backend.name)} produced NaN/Inf logits at step {step} "
                 f"({precision.label})")
        if not precision.quantized:  # fp32 has no lower precision to blame: the weights or inputs are at fault
            return (f"{where}: the artifact's weights or this input hold NaN/Inf; "
                    f"run attanchor-export check {self.manifest.folder}")
        return f"{where}: use an fp32 artifact or another precision"

    def front_end(self, input_ids, pixel_values, threshold: float | None = None, attention_mask=None,
                  image_features: np.ndarray | None = None, max_new_tokens: int = 0,
                  memory_budget: float | None = None, **image_inputs) -> FrontEnd:
        """Vision, embedding and anchors for a batch: the decoder's prefill inputs (see FrontEnd).

        input_ids and attention_mask as for `generate`; threshold None = the manifest's default;
        image_features: the vision graph's output for these pixels, when computed beforehand;
        max_new_tokens: positions to leave free in the context. A prompt that cannot fit, or whose estimated
        memory (prompt_cost) is over the budget, is refused before anything runs; anchors that would not
        fit are cut to the best K per row (FrontEnd.anchor_cap). image_inputs: vision inputs beside
        pixel_values, for families whose processor returns more (Qwen2.5-VL: image_grid_thw); a LLaVA
        artifact takes none."""
        batch = self.family.prepare_batch(input_ids, attention_mask)  # token ids checked against the table
        B, width = batch.input_ids.shape
        vision_feeds = self.family.vision_feeds(pixel_values, B, **image_inputs)
        M, K = self.family.image_positions(vision_feeds), self.manifest.anchor.max_anchors
        positions = width - 1 + M + (K or 0)  # before anchors; with K, the static length
        if positions + max_new_tokens > self.max_positions:
            raise RuntimeInputError(
                f"prompt ({width} tokens, {M} image tokens{f', {K} anchor slots' if K else ''}) + max_new_tokens "
                f"({max_new_tokens}) exceeds the model's context of {self.max_positions}: shorten the prompt"
            )
        self._check_memory(B, positions, max_new_tokens, memory_budget)
        threshold = self.default_threshold if threshold is None else float(threshold)
        if not np.isfinite(threshold):
            raise RuntimeInputError(f"threshold must be a finite number, got {threshold}")
        clock = time.perf_counter
        t0 = clock()
        features = self.backend.vision(vision_feeds) if image_features is None else image_features
        t1 = clock()
        embedded = self.backend.embed(self.family.embedding_feeds(batch, features, threshold, vision_feeds))
        t2 = clock()
        names = self.manifest.graphs.embedding.output_names
        cap = None
        if not K and embedded[names[0]].shape[1] + max_new_tokens > self.max_positions:
            cap = self.max_positions - max_new_tokens - positions  # >= 0: the prompt alone fits
            embedded = self.family.capped_embedding(batch, features, threshold, cap, vision_feeds, self.embed_table)
        embeds, mask, position_ids, gather = (embedded[n] for n in names)
        if embeds.shape[1] > positions:
            self._check_memory(B, embeds.shape[1], max_new_tokens, memory_budget)
        anchors = self._anchors(gather, mask, batch)
        return FrontEnd(batch, features, embeds, mask, position_ids, gather, anchors,
                        {"vision": t1 - t0, "embedding": t2 - t1}, cap)

    def _check_memory(self, batch: int, positions: int, new_tokens: int, budget_gib: float | None) -> None:
        _check_budget(budget_gib)
        budget_gib = self.memory_budget if budget_gib is None else budget_gib
        if budget_gib is None:  # what is free, plus what this process already holds beyond the loaded weights
            budget = prompt_cost.available_bytes() + max(0, _rss_bytes() - self._rss_at_load)
        else:
            budget = int(budget_gib * (1 << 30))
        notes = self.manifest.graphs.decoder.notes
        # A prefill returns one position's logits from a last-logits-only graph, or from one with a
        # logits_to_keep input on a backend that feeds it (decode_last).
        last_only = notes.last_logits_only or (notes.logits_to_keep is not None and hasattr(self.backend, "decode_last"))
        need = prompt_cost.prompt_bytes(self.manifest.dims, batch, positions, new_tokens, all_logits=not last_only)
        if need > budget:
            raise RuntimeInputError(
                f"this call would need about {prompt_cost.gib(need)} ({batch} row(s) x {positions} positions + "
                f"{new_tokens} new tokens: KV cache, attention, logits), over the memory budget of "
                f"{prompt_cost.gib(budget)}: shorten the prompt, lower max_new_tokens or the batch, or raise the "
                "budget (memory_budget=GiB, --memory-budget)"
            )

    def _anchors(self, gather_index, out_mask, batch: PreparedBatch) -> list[list[tuple[int, int]]]:
        width = batch.input_ids.shape[1]
        pairs = anchor_pairs(gather_index, out_mask, width, self.mode)
        return [[(int(batch.source_index[b][t]), int(m)) for t, m in row] for b, row in enumerate(pairs)]

    # -- chat -----------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> np.ndarray:
        """The chat prompt for one question about one image: one input_ids row, as `chat` builds it."""
        return self.family.prompt_ids(self.text, question)

    def chat_ids(self, messages: list[dict]) -> np.ndarray:
        """A whole conversation (system prompt, earlier turns, one image) as one input_ids row: what a chat
        server feeds generate. Message text is encoded as text (see TextProcessor.chat_ids)."""
        return self.family.chat_ids(self.text, messages)

    def chat_inputs(self, prompt: str, image) -> tuple[list[np.ndarray], np.ndarray]:
        """(input_ids rows, pixel values) for one question about one image, as `chat` feeds generate."""
        return [self.prompt_ids(prompt)], self.images(image)

    def chat(self, prompt: str, image, max_new_tokens: int = 128, **kwargs) -> str:
        return "".join(self.stream(prompt, image, max_new_tokens=max_new_tokens, **kwargs))

    def stream(self, prompt: str, image, max_new_tokens: int = 128, **kwargs) -> Stream:
        """Answer `prompt` about `image` piece by piece: a Stream of str, then `.output` (see Stream).

        kwargs as for `generate_steps` (threshold, sampling, stop_token_ids); stop tokens are not shown."""
        stop = set(self.eos_token_ids) | set(kwargs.get("stop_token_ids", ()))

        def pieces(stream: Stream) -> Iterator[str]:
            ids, pixels = self.chat_inputs(prompt, image)
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
            tail = decoder.flush()
            if tail:
                yield tail

        return Stream(pieces)
