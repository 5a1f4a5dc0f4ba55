"""Pipeline: artifact folder -> text. Vision, anchors, prefill, then the decode loop (decode.generate).

    pipe = Pipeline.load("out/tiny")                       # backend "ort" (cpu|cuda) or "trt"
    out = pipe.generate(input_ids=ids, pixel_values=pix, max_new_tokens=32)
    front = pipe.front_end(ids, pix)                       # vision + embedding + anchors only
    pipe.chat("What is in the image?", image="cat.jpg")    # -> str
    stream = pipe.stream("What is in the image?", "cat.jpg")
    for piece in stream: print(piece, end="")              # then stream.output: the GenerateOutput

What differs between model families (preprocessing, prompts, positions) comes from the artifact's
family adapter (attanchor_runtime.families); the backend is any decode.Backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from attanchor_graphs.specification import anchor_pairs

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

    @classmethod
    def load(cls, folder, backend: str = "ort", device: str = "cpu", threads: int | None = None,
             verify: str = "size") -> Pipeline:
        manifest = Manifest.load(folder, verify=verify)
        if backend == "ort":
            impl = OrtBackend(manifest, device=device, threads=threads)
        elif backend == "trt":
            impl = TrtBackend(manifest)
        else:
            raise RuntimeInputError(f"unknown backend {backend!r}: choose ort or trt")
        return cls(manifest, impl)

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
                       **image_inputs) -> Iterator:
        """Yields each step's new tokens (int64 [B]) and finally the GenerateOutput.
        front: `front_end`'s result for these inputs, computed beforehand (a benchmark times it apart).
        image_inputs: vision inputs beside pixel_values that a family's processor returns (front_end)."""
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = self.eos_token_ids if eos_token_id is None else list(np.atleast_1d(eos_token_id))
        sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
        if front is None:
            front = self.front_end(input_ids, pixel_values, threshold, attention_mask, **image_inputs)
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
        yield GenerateOutput(done.tokens, front.anchors, done.lengths, timings)

    def _check_logits(self, logits: np.ndarray, step: int) -> None:
        if not np.isfinite(logits).all():
            precision = self.manifest.precision
            raise NumericsError(
                f"{self.manifest.graph_file('decoder', self.backend.name)} produced NaN/Inf logits at step {step} "
                f"({precision.label}): use an fp32 artifact or another precision"
            )

    def front_end(self, input_ids, pixel_values, threshold: float | None = None, attention_mask=None,
                  image_features: np.ndarray | None = None, **image_inputs) -> FrontEnd:
        """Vision, embedding and anchors for a batch: the decoder's prefill inputs (see FrontEnd).

        input_ids and attention_mask as for `generate`; threshold None = the manifest's default;
        image_features: the vision graph's output for these pixels, when computed beforehand;
        image_inputs: vision inputs beside pixel_values, for families whose processor returns more
        (Qwen2.5-VL: image_grid_thw); a LLaVA artifact takes none."""
        batch = self.family.prepare_batch(input_ids, attention_mask)
        vision_feeds = self.family.vision_feeds(pixel_values, len(batch.input_ids), **image_inputs)
        threshold = self.default_threshold if threshold is None else float(threshold)
        if not np.isfinite(threshold):
            raise RuntimeInputError(f"threshold must be a finite number, got {threshold}")
        clock = time.perf_counter
        t0 = clock()
        features = self.backend.vision(vision_feeds) if image_features is None else image_features
        t1 = clock()
        embedded = self.backend.embed(self.family.embedding_feeds(batch, features, threshold, vision_feeds))
        t2 = clock()
        embeds, mask, positions, gather = (embedded[n] for n in self.manifest.graphs.embedding.output_names)
        anchors = self._anchors(gather, mask, batch)
        return FrontEnd(batch, features, embeds, mask, positions, gather, anchors,
                        {"vision": t1 - t0, "embedding": t2 - t1})

    def _anchors(self, gather_index, out_mask, batch: PreparedBatch) -> list[list[tuple[int, int]]]:
        width = batch.input_ids.shape[1]
        pairs = anchor_pairs(gather_index, out_mask, width, self.mode)
        return [[(int(batch.source_index[b][t]), int(m)) for t, m in row] for b, row in enumerate(pairs)]

    # -- chat -----------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> np.ndarray:
        """The chat prompt for one question about one image: one input_ids row, as `chat` builds it."""
        return self.family.prompt_ids(self.text, question)

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
