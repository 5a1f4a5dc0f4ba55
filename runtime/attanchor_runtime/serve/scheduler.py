"""The batching scheduler: one thread owns the Pipeline; requests that wait together share one generate.

A request becomes a Job (prompt ids, pixels, its settings) and waits in one queue. The worker takes the
oldest job and every waiting job with the same `Settings` (threshold and sampling: they are per batch in
the runtime), up to max_batch, after giving the first one `batch_window` to find company; `max_tokens` may
differ per job. It runs the runtime's front end once for the batch (ragged rows are left-padded by the
runtime), then its decode loop, handing each row's text to its job as it is decoded. A row ends on EOS,
on one of its stop strings, at its own max_tokens, when its client is gone (`cancel`) or past its
deadline; once every row has ended the loop is closed, so no step runs for nobody.

Everything a job hears comes through its `emit` callback from the worker thread, as ("piece", text),
then ("done", {finish_reason, anchors, usage}) or ("error", APIError). Continuous batching (joining a
running batch) would need the runtime's loop to take new rows mid-flight: not done.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import NumericsError, UserError
from ..pipeline import GenerateOutput
from .errors import APIError

log = logging.getLogger("attanchor.serve")


@dataclass(frozen=True)
class Settings:
    """What must be equal for two requests to share a batch (the runtime takes them per generate call)."""

    threshold: float
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    alone: int = 0  # nonzero: never batched (a seeded sample must not depend on its batch mates)
    seed: int | None = None
    ignore_eos: bool = False  # rows run to max_tokens: EOS is an ordinary token (the decode loop's too)

    @classmethod
    def of(cls, threshold: float, temperature: float, top_p: float, seed: int | None, ticket: int,
           ignore_eos: bool = False) -> Settings:
        if temperature == 0:  # greedy: top_p and seed change nothing
            return cls(threshold, ignore_eos=ignore_eos)
        return cls(threshold, temperature, top_p, ticket if seed is not None else 0, seed, ignore_eos)

    def sampling(self) -> dict:
        """decode_steps' keywords: sampling, and no EOS ids where EOS is ignored."""
        eos = {"eos_token_id": []} if self.ignore_eos else {}
        if self.temperature == 0:
            return eos
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, **eos}


@dataclass(eq=False)
class Job:
    ids: np.ndarray  # int64 prompt row, one image placeholder
    pixels: np.ndarray  # float32 [1, 3, H, W]
    settings: Settings
    max_tokens: int
    stop: tuple[str, ...]
    emit: Callable[[tuple], None]  # called from the worker thread
    deadline: float  # time.monotonic()
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: the worker drops the row at its next step (or skips the job if waiting)."""
        self.cancelled.set()


class StopText:
    """OpenAI `stop` strings on streamed text: emits what can no longer start a stop string, holds the rest."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached; the text is cut before it)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Row:
    """One job's progress inside a running batch."""

    def __init__(self, job: Job, pipe, prompt_tokens: int, anchors: list[dict]):
        self.job, self.prompt_tokens, self.anchors = job, prompt_tokens, anchors
        self.decoder = pipe.text.stream_decoder()
        self.stop = StopText(job.stop)
        self.tokens = 0
        self.open = True

    def send(self, text: str) -> None:
        if text:
            self.job.emit(("piece", text))

    def finish(self, reason: str, flush: bool = True) -> None:
        """End the row: what the decoder and the stop matcher still hold is sent first (unless a stop
        string ended it: nothing after the stop string is sent)."""
        if flush:
            text, stopped = self.stop.push(self.decoder.flush())
            self.send(text if stopped else text + self.stop.flush())
        self.close(("done", {"finish_reason": reason, "anchors": self.anchors,
                             "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                                       "total_tokens": self.prompt_tokens + self.tokens}}))

    def fail(self, error: APIError) -> None:
        self.close(("error", error))

    def close(self, event: tuple | None = None) -> None:
        if self.open:
            self.open = False
            if event is not None:
                self.job.emit(event)


class Scheduler:
    def __init__(self, pipe, max_batch: int = 8, max_queue: int = 64, batch_window_s: float = 0.01):
        self.pipe, self.max_batch, self.max_queue, self.batch_window_s = pipe, max_batch, max_queue, batch_window_s
        self.stop_ids = frozenset(pipe.eos_token_ids)
        self.side = math.isqrt(pipe.manifest.dims.image_tokens)
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        # what /health reports: generate calls run, rows in them, the largest batch, rows running now
        self.batches = self.rows = self.largest_batch = self.running = 0
        self.cancelled = 0  # jobs dropped because their client had gone
        self.thread = threading.Thread(target=self._run, name="attanchor-scheduler", daemon=True)
        self.thread.start()

    # -- the event loop's side ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"{len(self.waiting)} requests are already waiting (--max-queue "
                                    f"{self.max_queue}); retry later", code="queue_full")
            self.waiting.append(job)
            self.cond.notify()

    def shutdown(self, timeout: float | None = None) -> None:
        """Fail what still waits (503), let the running batch end at its next step, join the thread."""
        with self.cond:
            self.stopping = True
            left = list(self.waiting)
            self.waiting.clear()
            self.cond.notify()
        for job in left:
            job.emit(("error", APIError(503, "the server shut down before this request ran", code="shutting_down")))
        self.thread.join(timeout)

    # -- the worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.emit(("error", APIError(500, "internal error while generating; see the server log",
                                                code="internal_error")))

    def _next_batch(self) -> list[Job] | None:
        with self.cond:
            while True:
                while not self.waiting and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return None
                first = self.waiting[0]
                mates = [j for j in self.waiting if j.settings == first.settings]
                wait = first.arrived + self.batch_window_s - time.monotonic()
                if len(mates) >= self.max_batch or wait <= 0:
                    break
                self.cond.wait(wait)
            batch = mates[: self.max_batch]
            for job in batch:
                self.waiting.remove(job)
        now = time.monotonic()
        live = []
        for job in batch:
            if job.cancelled.is_set():
                self.cancelled += 1
                continue
            if now > job.deadline:
                job.emit(("error", _timeout()))
                continue
            live.append(job)
        return live

    def _anchors(self, job: Job, pairs) -> list[dict]:
        from ..visualize import token_label

        side = self.side
        return [{"token": token_label(self.pipe, int(job.ids[t])), "row": m // side, "col": m % side}
                for t, m in pairs]

    def _run_batch(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        pipe, settings = self.pipe, jobs[0].settings
        try:
            front = pipe.front_end([j.ids for j in jobs], np.concatenate([j.pixels for j in jobs]), settings.threshold,
                                   max_new_tokens=min(j.max_tokens for j in jobs))
        except UserError as exc:
            return self._alone_or_fail(jobs, exc)
        rows = [Row(job, pipe, int(front.attention_mask[b].sum()), self._anchors(job, front.anchors[b]))
                for b, job in enumerate(jobs)]
        for row in rows:
            if row.prompt_tokens + row.job.max_tokens > pipe.max_positions:
                row.fail(APIError(400, f"the prompt takes {row.prompt_tokens} positions (text, image tokens and "
                                       f"anchors); with max_tokens {row.job.max_tokens} that exceeds the model's "
                                       f"context of {pipe.max_positions}", code="context_length_exceeded",
                                  param="max_tokens"))
        if not any(r.open for r in rows):
            return
        steps = pipe.decode_steps(front, max(r.job.max_tokens for r in rows if r.open), **settings.sampling())
        self.batches += 1
        self.running = sum(r.open for r in rows)
        self.rows += self.running
        self.largest_batch = max(self.largest_batch, self.running)
        try:
            for new in steps:
                if isinstance(new, GenerateOutput):
                    break
                self._step(rows, new)
                self.running = sum(r.open for r in rows)
                if not self.running or self.stopping:
                    break
        except UserError as exc:  # e.g. the padded batch is over the context while each row alone fits
            if all(r.tokens == 0 for r in rows):
                return self._alone_or_fail([r.job for r in rows if r.open], exc)
            for r in rows:
                r.fail(APIError(400, str(exc)))
        finally:
            steps.close()  # stops the decode loop if rows ended early
            self.running = 0
        for r in rows:
            if r.open:
                if self.stopping:
                    r.fail(APIError(503, "the server shut down during this request", code="shutting_down"))
                else:
                    r.finish("length")

    def _step(self, rows: list[Row], new: np.ndarray) -> None:
        now = time.monotonic()
        for b, row in enumerate(rows):
            if not row.open:
                continue
            job = row.job
            if job.cancelled.is_set():
                self.cancelled += 1
                row.close()
                continue
            if now > job.deadline:
                row.fail(_timeout())
                continue
            token = int(new[b])
            row.tokens += 1
            if token in self.stop_ids and not job.settings.ignore_eos:
                row.finish("stop")
                continue
            text, stopped = row.stop.push(row.decoder.push(token))
            row.send(text)
            if stopped:
                row.finish("stop", flush=False)
            elif row.tokens >= job.max_tokens:
                row.finish("length")

    def _alone_or_fail(self, jobs: list[Job], exc: UserError) -> None:
        """A batch the runtime refused: each job alone, so one bad request fails only itself."""
        if len(jobs) > 1:
            for job in jobs:
                self._run_batch([job])
            return
        status = 500 if isinstance(exc, NumericsError) else 400  # NaN logits are not the client's doing
        for job in jobs:
            job.emit(("error", APIError(status, str(exc))))


def _timeout() -> APIError:
    return APIError(504, "the request ran past the server's time limit (--timeout)", code="timeout")
