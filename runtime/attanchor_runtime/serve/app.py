"""The ASGI app: OpenAI chat completions over one loaded Pipeline, the page, health and models.

    app = create_app(Pipeline.load(folder), ServeOptions(), name="artifact")   # run it with uvicorn

Starlette (FastAPI's own base) with pydantic for the request schema, not FastAPI itself: every refusal
here must be an OpenAI-style error body, and FastAPI's request parsing answers with its own 422 shape
and turns errors raised while reading the body into a generic 400, so the one structured request is
validated by pydantic directly; FastAPI's docs page loads from a CDN, and this server ships its page.
The same app is what each Ray Serve replica runs (ray_app.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import NumericsError, UserError
from .errors import APIError
from .images import decode_image, image_bytes
from .options import ServeOptions
from .scheduler import Job, Scheduler, Settings
from .schemas import ChatCompletionRequest, conversation

log = logging.getLogger("attanchor.serve")
TICKETS = itertools.count(1)  # tells seeded sampling requests apart (they run alone)
PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"


class BodyLimit:
    """413 for a body over the limit: at once from Content-Length, else while it is read (chunked)."""

    def __init__(self, app, limit: int, replica: str):
        self.app, self.limit, self.replica = app, limit, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):  # every answer says which replica gave it
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-attanchor-replica", self.replica)]}
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await error_response(self._too_large(int(declared)))(scope, receive, send_tagged)
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large(seen)
            return message

        await self.app(scope, receive_limited, send_tagged)

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"the request body is over {self.limit:,} bytes (--max-body-mb); got {size:,}+",
                        code="request_too_large")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """pydantic's first complaint as one line, and the field it names."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return (f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")), where or None


class Server:
    """What the routes share: the pipeline, the options, the scheduler (made when the app starts)."""

    def __init__(self, pipe, options: ServeOptions, name: str, replica: str):
        self.pipe, self.options, self.replica = pipe, options, replica
        self.model = options.model_name or name
        self.created = int(time.time())
        self.image_tokens = pipe.manifest.dims.image_tokens
        self.scheduler: Scheduler | None = None
        key = options.api_key
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None

    # -- checks ---------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()  # equal-length digests: constant-time compare
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._key_digest):
            raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "attanchor-export",
                # AttAnchor: what the page needs to draw anchors over the image as the model sees it
                "attanchor": {"threshold": self.pipe.default_threshold, "anchor_mode": self.pipe.mode,
                              "grid": math.isqrt(self.image_tokens),
                              "crop": "center" if self.pipe.images.do_center_crop else "stretch"}}

    # -- routes ---------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        s = self.scheduler
        counts = {k: getattr(s, k, 0) for k in ("batches", "rows", "largest_batch", "running", "cancelled")}
        return JSONResponse({"status": "ok", "model": self.model, "replica": self.replica,
                             "waiting": len(s.waiting) if s else 0, **counts})

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_info(self, request: Request) -> Response:
        self.authorize(request)
        if request.path_params["model"] != self.model:
            raise APIError(404, f"model {request.path_params['model']!r} does not exist; this server has "
                                f"{self.model!r}", code="model_not_found", param="model")
        return JSONResponse(self.model_card())

    async def page(self, request: Request) -> Response:
        html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
        return Response(html, media_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY})

    async def chat(self, request: Request) -> Response:
        self.authorize(request)
        req = await self._parse(request)
        job, events = await self._job(req)
        self.scheduler.submit(job)  # 429 when the queue is full
        first = await self._next(job, events, request)
        if first is None:  # the client left while the request waited
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(job, events, request, first, ident, created, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces, event = [], first
        while event[0] == "piece":
            pieces.append(event[1])
            event = await self._next(job, events, request)
            if event is None:
                return Response(status_code=499)
        if event[0] == "error":
            raise event[1]
        done = event[1]
        message = {"role": "assistant", "content": "".join(pieces), "anchors": done["anchors"]}
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": self.model,
                             "choices": [{"index": 0, "message": message, "finish_reason": done["finish_reason"],
                                          "logprobs": None}],
                             "usage": done["usage"]})

    # -- a request, from body to job ------------------------------------------------------------------
    async def _parse(self, request: Request) -> ChatCompletionRequest:
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise APIError(400, message, param=param) from None
        req.check()
        if req.model is not None and req.model != self.model:
            raise APIError(404, f"model {req.model!r} does not exist; this server has {self.model!r}",
                           code="model_not_found", param="model")
        return req

    async def _job(self, req: ChatCompletionRequest) -> tuple[Job, asyncio.Queue]:
        options, pipe = self.options, self.pipe
        turns, url = conversation(req.messages)
        data = await image_bytes(url, options)
        image = await run_in_threadpool(decode_image, data, options.max_image_pixels, options.max_image_aspect)
        try:
            ids = await run_in_threadpool(pipe.chat_ids, turns)
            pixels = await run_in_threadpool(pipe.images, image)
        except UserError as exc:
            raise APIError(400, str(exc)) from None
        max_tokens = req.max_completion_tokens or req.max_tokens or options.max_tokens_default
        least = len(ids) - 1 + self.image_tokens  # anchors only add positions
        if least + max_tokens > pipe.max_positions:
            raise APIError(400, f"the prompt takes at least {least} positions (text and image tokens); with "
                                f"max_tokens {max_tokens} that exceeds the model's context of {pipe.max_positions}",
                           code="context_length_exceeded", param="messages")
        threshold = pipe.default_threshold if req.threshold is None else float(req.threshold)
        temperature = 0.0 if req.temperature is None else req.temperature  # greedy unless asked, as Pipeline.chat
        settings = Settings.of(threshold, temperature, req.top_p or 1.0, req.seed, ticket=next(TICKETS),
                               ignore_eos=req.ignore_eos)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job.cancel()

        job = Job(ids, pixels, settings, max_tokens, req.stop_strings(), emit,
                  deadline=time.monotonic() + options.timeout_s)
        return job, events

    async def _next(self, job: Job, events: asyncio.Queue, request: Request) -> tuple | None:
        """The job's next event; None if the client disconnected (the job is cancelled); a timeout
        error past the deadline (a job still waiting in the queue is dropped when its turn comes)."""
        get = asyncio.ensure_future(events.get())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({get, gone}, timeout=max(0.0, job.deadline - time.monotonic()) + 1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        job.cancel()
        if gone in done:
            return None
        return ("error", APIError(504, "the request ran past the server's time limit (--timeout)", code="timeout"))

    async def _sse(self, job, events, request, first, ident, created, include_usage):
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        event, finished = first, False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while event is not None:
                kind, value = event
                if kind == "piece":
                    yield chunk({"content": value})
                elif kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    break
                else:
                    yield chunk({"anchors": value["anchors"]}, value["finish_reason"])
                    if include_usage:
                        body = {"id": ident, "object": "chat.completion.chunk", "created": created,
                                "model": self.model, "choices": [], "usage": value["usage"]}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                event = await self._next(job, events, request)
            finished = event is not None
            if finished:
                yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream: stop generating for it
                job.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(pipe, options: ServeOptions | None = None, name: str | None = None,
               replica: str | None = None) -> Starlette:
    """The server for one loaded Pipeline. `name`: the model id when options.model_name is unset (the
    artifact folder's name); `replica`: what the x-attanchor-replica header says (by default a random id
    per process: the header should not tell the world a host name)."""
    options = options or ServeOptions()
    name = name or pipe.manifest.folder.name
    replica = replica or uuid.uuid4().hex[:12]
    server = Server(pipe, options, name, replica)

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler = Scheduler(pipe, options.max_batch, options.max_queue, options.batch_window_ms / 1000)
        app.state.server = server
        try:
            yield
        finally:  # after uvicorn has let the requests in flight finish (or timed them out)
            await run_in_threadpool(server.scheduler.shutdown, 30.0)

    async def api_error(request, exc: APIError):
        return error_response(exc)

    async def http_error(request, exc: HTTPException):
        status = exc.status_code
        message = "no such route" if status == 404 else str(exc.detail)
        return error_response(APIError(status, message, code="not_found" if status == 404 else None))

    async def internal_error(request, exc: Exception):
        if isinstance(exc, NumericsError):
            return error_response(APIError(500, str(exc)))
        log.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, "internal error; see the server log", code="internal_error"))

    routes = [
        Route("/", server.page),
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/models/{model:path}", server.model_info),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(BodyLimit, limit=options.max_body_bytes, replica=replica)],
                     exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error})
