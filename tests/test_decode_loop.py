"""The one decode loop (attanchor_runtime.decode) on a toy decoder: what each call is fed, stop tokens,
teacher forcing, continuing from a kept prefill; and that every backend implements the protocol."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from attanchor_runtime.decode import Backend, SequentialStep, decoder_calls, generate
from attanchor_runtime.errors import NumericsError
from attanchor_runtime.sampling import Sampler

VOCAB, HIDDEN = 7, 3


class ToyDecoder:
    """Logits favour token (position + 1) % VOCAB; records every call's feeds; the cache counts positions."""

    def __init__(self):
        self.calls = []

    def empty_cache(self, batch):
        return np.zeros(batch, np.int64)

    def copy_cache(self, cache):
        return cache.copy()

    def decode(self, embeds, mask, positions, cache):
        self.calls.append((embeds.shape, mask.copy(), positions.copy(), cache.copy()))
        logits = np.zeros((len(embeds), embeds.shape[1], VOCAB), np.float32)
        last = positions[:, -1]
        logits[np.arange(len(embeds)), -1, (last + 1) % VOCAB] = 1.0
        return logits, cache + embeds.shape[1]


def _embed(ids):
    return np.repeat(np.asarray(ids, np.float32)[:, None, None], HIDDEN, axis=2)


def _prompt():
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.int64)  # row 0 left-padded
    positions = np.array([[1, 0, 1], [0, 1, 2]], np.int64)
    return np.zeros((2, 3, HIDDEN), np.float32), mask, positions


def test_each_call_is_fed_the_next_step():
    embeds, mask, positions = _prompt()
    decoder = ToyDecoder()
    steps = [np.ones((2, 1, HIDDEN), np.float32) * k for k in (1, 2)]
    calls = list(decoder_calls(decoder, SequentialStep.after_prefill(mask, positions), embeds,
                               lambda call: steps[call.index] if call.index < 2 else None))
    assert [c.index for c in calls] == [0, 1, 2] and len(decoder.calls) == 3
    (_, m1, p1, c1), (_, m2, p2, c2) = decoder.calls[1:]
    np.testing.assert_array_equal(m1, np.concatenate([mask, [[1], [1]]], axis=1))  # the mask grows by one 1
    np.testing.assert_array_equal(p1, [[2], [3]])  # the row's last real position + 1, padding or not
    np.testing.assert_array_equal(p2, [[3], [4]])
    np.testing.assert_array_equal(c2, [4, 4])  # each call continues the previous call's cache
    assert all(c.seconds >= 0 for c in calls) and calls[2].step.attention_mask.shape == (2, 5)


def test_generate_stops_rows_and_pads_them():
    embeds, mask, positions = _prompt()
    step = SequentialStep.after_prefill(mask, positions)
    # row 0 makes 2, 3, 4, ...; row 1 makes 3, 4, ...: stop at 4 ends row 1 first, then row 0.
    *tokens, out = generate(ToyDecoder(), step, embeds, _embed, 8, stop_ids=[4], pad_id=-1)
    np.testing.assert_array_equal(out.tokens, [[2, 3, 4], [3, 4, -1]])
    np.testing.assert_array_equal(out.lengths, [3, 2])
    assert len(tokens) == 3 and len(out.call_seconds) == 3


def test_teacher_forcing_and_a_kept_prefill():
    embeds, mask, positions = _prompt()
    step = SequentialStep.after_prefill(mask, positions)
    forced = np.full((2, 4), 6, np.int64)
    decoder = ToyDecoder()
    *_, first = generate(decoder, step, embeds, _embed, 4, forced=forced, keep_logits=True, keep_prefill=True)
    assert [c[0][0] for c in decoder.calls[1:]] == [2, 2, 2]  # fed the forced ids, chose its own
    np.testing.assert_array_equal(first.tokens, [[2, 3, 4, 5], [3, 4, 5, 6]])
    assert len(first.logits) == 4 and first.prefill.index == 0
    again = ToyDecoder()
    *_, continued = generate(again, step, embeds, _embed, 4, start=first.prefill)
    np.testing.assert_array_equal(continued.tokens, first.tokens)
    assert len(again.calls) == 3  # no second prefill


class GreedyToyDecoder(ToyDecoder):
    """The toy whose graph also chooses (decode_next, as a `next_token` output would): it picks
    (position + 2) % VOCAB, not what its logits favour, so a test sees which path chose; rows listed in
    `bad` at step `bad_step` say their logits were not finite (-1)."""

    greedy_in_graph = True

    def __init__(self, bad=(), bad_step=-1):
        super().__init__()
        self.bad, self.bad_step, self.chose = list(bad), bad_step, 0

    def decode_next(self, embeds, mask, positions, cache):
        _, cache = self.decode(embeds, mask, positions, cache)
        chosen = (positions[:, -1] + 2) % VOCAB
        if len(self.calls) - 1 == self.bad_step:
            chosen[self.bad] = -1
        self.chose += 1
        return chosen.astype(np.int64), cache


def test_a_greedy_choice_is_left_to_the_graph_that_can_make_it():
    """argmax and a greedy Sampler let the decoder choose (no logits fetched); sampling, kept logits or a
    kept prefill take the logits path; a decoder without the output is never asked."""
    embeds, mask, positions = _prompt()
    step = SequentialStep.after_prefill(mask, positions)
    for choose in (None, Sampler()):
        decoder = GreedyToyDecoder()
        *_, out = generate(decoder, step, embeds, _embed, 3, **({"choose": choose} if choose else {}))
        np.testing.assert_array_equal(out.tokens, [[3, 4, 5], [4, 5, 6]])  # the graph's choice
        assert decoder.chose == 3 and out.logits == []
    for kept in ({"keep_logits": True}, {"keep_prefill": True}, {"choose": Sampler(do_sample=True, top_k=1)}):
        decoder = GreedyToyDecoder()
        *_, out = generate(decoder, step, embeds, _embed, 3, **kept)
        np.testing.assert_array_equal(out.tokens, [[2, 3, 4], [3, 4, 5]])  # chosen from the logits
        assert decoder.chose == 0


class LastOnlyToyDecoder(ToyDecoder):
    """The toy with decode_last (as a graph with a logits_to_keep input has): it returns the last
    position's logits only, and counts how often it was asked."""

    def __init__(self):
        super().__init__()
        self.last_calls = 0

    def decode_last(self, embeds, mask, positions, cache):
        logits, cache = self.decode(embeds, mask, positions, cache)
        self.last_calls += 1
        return logits[:, -1:], cache


def test_a_caller_that_reads_the_last_position_only_asks_for_that_only():
    """Sampling without kept logits asks decode_last (a prefill's lm_head over the last position only);
    kept logits or a kept prefill need every position, so they go through decode; the tokens agree."""
    embeds, mask, positions = _prompt()
    step = SequentialStep.after_prefill(mask, positions)
    sampler = Sampler(do_sample=True, top_k=1)
    decoder = LastOnlyToyDecoder()
    *_, out = generate(decoder, step, embeds, _embed, 3, choose=sampler)
    assert decoder.last_calls == 3 and out.logits == []
    for kept in ({"keep_logits": True}, {"keep_prefill": True}):
        full = LastOnlyToyDecoder()
        *_, same = generate(full, step, embeds, _embed, 3, choose=sampler, **kept)
        assert full.last_calls == 0
        np.testing.assert_array_equal(same.tokens, out.tokens)
    calls = list(decoder_calls(LastOnlyToyDecoder(), step, embeds, lambda call: None, last_only=True))
    assert calls[0].logits.shape == (2, 1, VOCAB)
    calls = list(decoder_calls(ToyDecoder(), step, embeds, lambda call: None, last_only=True))
    assert calls[0].logits.shape == (2, 3, VOCAB)  # a decoder without decode_last gives what it has


def test_non_finite_logits_flagged_by_the_graph_still_raise():
    embeds, mask, positions = _prompt()
    step = SequentialStep.after_prefill(mask, positions)
    with pytest.raises(NumericsError, match="step 1"):
        list(generate(GreedyToyDecoder(bad=[1], bad_step=1), step, embeds, _embed, 3))
    seen = []

    def check(logits, i):  # the Pipeline's guard sees NaN in the flagged row only
        seen.append((i, np.isnan(logits).any(axis=-1).tolist()))

    list(generate(GreedyToyDecoder(bad=[0], bad_step=2), step, embeds, _embed, 3, check=check))
    assert seen == [(0, [False, False]), (1, [False, False]), (2, [True, False])]


def test_every_backend_implements_the_protocol():
    from attanchor_runtime.ort_backend import OrtBackend
    from attanchor_runtime.trt_backend import TrtBackend

    from attanchor_export.source_model import TorchBackend

    wanted = {name for name, _ in inspect.getmembers(Backend, inspect.isfunction) if not name.startswith("_")}
    assert wanted >= {"vision", "embed", "empty_cache", "decode", "copy_cache", "close"}
    for cls in (OrtBackend, TrtBackend, TorchBackend):
        assert wanted <= {n for n in dir(cls)}, (cls.__name__, wanted - set(dir(cls)))
        assert isinstance(cls.name, str)
