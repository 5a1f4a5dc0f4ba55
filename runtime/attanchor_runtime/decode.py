"""The decode loop, written once: a prefill, then one cached step per new token, on any Backend.

    backend = OrtBackend(manifest)                    # or TrtBackend, or any object of the Decoder protocol
    step = family.first_step(mask, position_ids)      # mask and positions of the prompt (family-provided)
    for call in decoder_calls(backend, step, inputs_embeds, next_embeds):
        ...                                           # call.logits, call.cache, call.step, call.seconds

`decoder_calls` feeds the decoder and nothing else; what to feed next is the caller's (`next_embeds`).
`generate` is the token loop on top of it (greedy or sampled choice, stop tokens, teacher forcing,
kept logits) that the Pipeline, the accuracy gate and the benchmarks run; parity and the TensorRT build
gate feed their own embeddings through `decoder_calls`.

A Step is a decoder call's attention mask [B, past + S] and position ids; `advance()` gives the next
call's (one new token per row). How positions advance is the family's: 1-D sequential for LLaVA
(`SequentialStep`), 3-D M-RoPE for Qwen2.5-VL (attanchor_runtime.families).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class Step(Protocol):
    attention_mask: np.ndarray  # [B, past + S]: 1 = real, 0 = left padding
    position_ids: np.ndarray  # the positions of the S tokens this call feeds

    def advance(self) -> Step: ...


@dataclass(frozen=True)
class SequentialStep:
    """1-D positions: each new token is at the row's last position + 1 (LLaVA and every plain RoPE decoder)."""

    attention_mask: np.ndarray  # [B, past + S]
    position_ids: np.ndarray  # [B, S]

    @classmethod
    def after_prefill(cls, attention_mask: np.ndarray, position_ids: np.ndarray) -> SequentialStep:
        return cls(np.asarray(attention_mask, np.int64), np.asarray(position_ids, np.int64))

    def advance(self) -> SequentialStep:
        ones = np.ones((self.attention_mask.shape[0], 1), self.attention_mask.dtype)
        # max, not [:, -1]: every row's last real token is the last column (left padding), but a padded
        # row's last column may hold any position id; the max is the last real one.
        last = self.position_ids.max(axis=1, keepdims=True)
        return SequentialStep(np.concatenate([self.attention_mask, ones], axis=1), (last + 1).astype(np.int64))


class Decoder(Protocol):
    """The decoder half of a Backend: a KV cache per batch and one decoder call at a time."""

    def empty_cache(self, batch: int) -> Any:
        """A cache holding no position, for `batch` rows."""

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               cache: Any) -> tuple[np.ndarray, Any]:
        """One call: logits [B, S | 1, V] and the cache with the S new positions appended."""

    def copy_cache(self, cache: Any) -> Any:
        """A cache another run can continue from while this one goes on (the gate reuses a prefill)."""


class Backend(Decoder, Protocol):
    """What runs an artifact's three graphs: onnxruntime (ort_backend), TensorRT (trt_backend), the PyTorch
    source model (attanchor_export.source_model.TorchBackend). Feeds and outputs are keyed by the names
    in manifest.graphs."""

    name: str

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The vision graph: its inputs (pixel_values, ...) -> image_features."""

    def embed(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The embedding graph: ids, mask, image features, threshold -> its outputs by name."""

    def close(self) -> None: ...


@dataclass
class Call:
    index: int  # 0: the prefill
    logits: np.ndarray  # [B, S | 1, V] as the decoder returned them
    cache: Any  # the backend's cache after this call
    step: Step  # the mask and positions this call was fed
    seconds: float  # inside the backend's decode


def decoder_calls(decoder: Decoder, step: Step, inputs_embeds: np.ndarray,
                  next_embeds: Callable[[Call], np.ndarray | None], start: Call | None = None) -> Iterator[Call]:
    """Prefill `inputs_embeds` at `step`, then one cached step per `next_embeds(call)` ([B, 1, H]) until it
    returns None. `start`: a prefill Call made earlier on the same inputs (with a cache of its own,
    Decoder.copy_cache), continued from instead of prefilling again."""
    clock = time.perf_counter
    if start is None:
        t0 = clock()
        logits, cache = decoder.decode(inputs_embeds, step.attention_mask, step.position_ids,
                                       decoder.empty_cache(len(inputs_embeds)))
        call = Call(0, logits, cache, step, clock() - t0)
    else:
        call = start
    while True:
        yield call
        embeds = next_embeds(call)
        if embeds is None:
            return
        step = call.step.advance()
        t0 = clock()
        logits, cache = decoder.decode(embeds, step.attention_mask, step.position_ids, call.cache)
        call = Call(call.index + 1, logits, cache, step, clock() - t0)


def argmax(logits: np.ndarray) -> np.ndarray:
    """Greedy choice: the first maximum, as torch.argmax does."""
    return logits.argmax(axis=-1).astype(np.int64)


@dataclass
class Generated:
    tokens: np.ndarray  # int64 [B, n]: the chosen tokens (the model's own, also under teacher forcing)
    lengths: np.ndarray  # int64 [B]: tokens per row up to and including its stop token
    logits: list[np.ndarray] = field(default_factory=list)  # per call [B, S | 1, V], when kept
    call_seconds: list[float] = field(default_factory=list)  # inside the backend, per call (0: prefill)
    prefill: Call | None = None  # the prefill call with a cache of its own, when kept


def generate(decoder: Decoder, step: Step, inputs_embeds: np.ndarray, embed: Callable[[np.ndarray], np.ndarray],
             max_new_tokens: int, choose: Callable[[np.ndarray], np.ndarray] = argmax,
             stop_ids: Sequence[int] = (), pad_id: int = 0, forced: np.ndarray | None = None,
             keep_logits: bool = False, keep_prefill: bool = False, start: Call | None = None,
             check: Callable[[np.ndarray, int], None] | None = None) -> Iterator:
    """Yields each step's tokens (int64 [B]), then the Generated record.

    embed: token ids [B] -> [B, 1, H] (the runtime's table lookup). choose: last-position logits [B, V]
    -> ids [B]. A row that produced a stop id is finished: its later tokens are `pad_id`; the loop ends
    when every row is. forced: feed these tokens [B, >= max_new_tokens - 1] instead of the chosen ones
    (teacher forcing). check(logits, i): raises on bad logits (the Pipeline's NaN guard). keep_prefill:
    the prefill Call with a copy of its cache, for `start` of a later run on the same inputs."""
    batch = len(inputs_embeds)
    stop = np.asarray(sorted(set(stop_ids)), np.int64)
    tokens = np.full((batch, max_new_tokens), pad_id, np.int64)
    lengths = np.zeros(batch, np.int64)
    done = np.zeros(batch, bool)
    out = Generated(tokens, lengths)

    def next_embeds(call: Call):
        if done.all() or call.index == max_new_tokens - 1:
            return None
        fed = forced[:, call.index] if forced is not None else tokens[:, call.index]
        return embed(fed)

    for call in decoder_calls(decoder, step, inputs_embeds, next_embeds, start):
        i = call.index
        if i == 0 and keep_prefill:
            out.prefill = Call(0, call.logits, decoder.copy_cache(call.cache), call.step, call.seconds)
        last = call.logits[:, -1, :]
        if check is not None:
            check(last, i)
        if keep_logits:
            out.logits.append(call.logits)
        out.call_seconds.append(call.seconds)
        new = np.where(done, pad_id, choose(last))
        tokens[:, i] = new
        lengths += ~done
        done |= np.isin(new, stop)
        yield new
    out.tokens = tokens[:, : int(lengths.max())]
    yield out


__all__ = ["Backend", "Call", "Decoder", "Generated", "SequentialStep", "Step", "argmax", "decoder_calls",
           "generate"]
