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

from .errors import NumericsError


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

    # Optional, where the decoder graph makes the greedy choice itself (`greedy_in_graph` true: the
    # onnxruntime form's `next_token` output): decode_next(inputs_embeds, attention_mask, position_ids,
    # cache) -> (next_token int64 [B], -1 where that row's logits held NaN/Inf; the cache). No logits
    # leave the graph: a greedy step hands back 8 bytes a row instead of the vocabulary's floats.
    # Optional too: decode_last(...) -> (logits [B, 1, V] of the last position only; the cache), for a
    # caller that reads nothing else (a graph with a logits_to_keep input skips the lm_head over the rest
    # of a prefill). A decoder graph that makes the greedy choice reads only the last position as well.


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
    logits: np.ndarray | None  # [B, S | 1, V] as the decoder returned them (None: the graph chose, next_token)
    cache: Any  # the backend's cache after this call
    step: Step  # the mask and positions this call was fed
    seconds: float  # inside the backend's decode
    next_token: np.ndarray | None = None  # int64 [B] when the graph chose greedily (-1: non-finite logits)


def decoder_calls(decoder: Decoder, step: Step, inputs_embeds: np.ndarray,
                  next_embeds: Callable[[Call], np.ndarray | None], start: Call | None = None,
                  greedy: bool = False, last_only: bool = False) -> Iterator[Call]:
    """Prefill `inputs_embeds` at `step`, then one cached step per `next_embeds(call)` ([B, 1, H]) until it
    returns None. `start`: a prefill Call made earlier on the same inputs (with a cache of its own,
    Decoder.copy_cache), continued from instead of prefilling again. greedy: the decoder's own greedy
    choice (decode_next) instead of logits; only for a decoder whose `greedy_in_graph` is true.
    last_only: the caller reads the last position's logits only (decode_last, where the decoder has it)."""
    clock = time.perf_counter
    decode = getattr(decoder, "decode_last", decoder.decode) if last_only else decoder.decode

    def run(index, embeds, step, cache):
        t0 = clock()
        if greedy:
            tokens, cache = decoder.decode_next(embeds, step.attention_mask, step.position_ids, cache)
            return Call(index, None, cache, step, clock() - t0, tokens)
        logits, cache = decode(embeds, step.attention_mask, step.position_ids, cache)
        return Call(index, logits, cache, step, clock() - t0)

    call = start if start is not None else run(0, inputs_embeds, step, decoder.empty_cache(len(inputs_embeds)))
    while True:
        yield call
        embeds = next_embeds(call)
        if embeds is None:
            return
        call = run(call.index + 1, embeds, call.step.advance(), call.cache)


def argmax(logits: np.ndarray) -> np.ndarray:
    """Greedy choice: the first maximum, as torch.argmax does."""
    return logits.argmax(axis=-1).astype(np.int64)


argmax.greedy = True  # a `choose` whose `greedy` is true may be replaced by the graph's own arg-max


def greedy_in_graph(decoder: Decoder, choose: Callable, keep_logits: bool) -> bool:
    """Whether `generate` lets the decoder graph choose (decode_next): a greedy `choose`, no logits kept,
    and a decoder that can."""
    return bool(getattr(choose, "greedy", False) and not keep_logits and getattr(decoder, "greedy_in_graph", False))


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
    -> ids [B]; a greedy one (`choose.greedy` true, as `argmax`) is left to the decoder graph when it can
    (greedy_in_graph: same tokens, no logits fetched). A row that produced a stop id is finished: its
    later tokens are `pad_id`; the loop ends when every row is. forced: feed these tokens
    [B, >= max_new_tokens - 1] instead of the chosen ones (teacher forcing). check(logits, i): raises on
    bad logits (the Pipeline's NaN guard); when the graph chose, it is given [B, 1], NaN in the rows whose
    logits were not finite (without a check those raise NumericsError). keep_prefill: the prefill Call
    with a copy of its cache, for `start` of a later run on the same inputs."""
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

    in_graph = greedy_in_graph(decoder, choose, keep_logits or keep_prefill)  # a kept prefill keeps its logits
    last_only = not (keep_logits or keep_prefill)  # nothing but each call's last position is read
    for call in decoder_calls(decoder, step, inputs_embeds, next_embeds, start, greedy=in_graph,
                              last_only=last_only):
        i = call.index
        if i == 0 and keep_prefill:
            out.prefill = Call(0, call.logits, decoder.copy_cache(call.cache), call.step, call.seconds,
                               call.next_token)
        if call.next_token is not None:  # the graph chose (and flagged rows whose logits were not finite)
            chosen = np.asarray(call.next_token, np.int64)
            if check is not None:
                check(np.where(chosen < 0, np.nan, 0.0)[:, None], i)
            elif (chosen < 0).any():
                raise NumericsError(f"the decoder produced NaN/Inf logits at step {i}")
        else:
            last = call.logits[:, -1, :]
            if check is not None:
                check(last, i)
            if keep_logits:
                out.logits.append(call.logits)
            chosen = choose(last)
        out.call_seconds.append(call.seconds)
        new = np.where(done, pad_id, chosen)
        tokens[:, i] = new
        lengths += ~done
        done |= np.isin(new, stop)
        yield new
    out.tokens = tokens[:, : int(lengths.max())]
    yield out


__all__ = ["Backend", "Call", "Decoder", "Generated", "SequentialStep", "Step", "argmax", "decoder_calls",
           "generate", "greedy_in_graph"]
