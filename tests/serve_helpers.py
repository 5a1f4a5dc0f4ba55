"""What the server tests share: a `serve` process on a free port, images as data URLs, and the client checks
that must hold on one device and through Ray Serve alike (test_serve.py, test_serve_ray.py)."""

from __future__ import annotations

import base64
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`attanchor-export serve FOLDER ARGS` in a child process; `url` once /health answers 200."""

    def __init__(self, folder: Path, *args: str, log: Path, env: dict | None = None, ready_s: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "attanchor_export.cli", "serve", str(folder), "--port", str(self.port), *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"serve did not answer /health within {ready_s} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text()[-4000:]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, then the exit code (the process group is killed only if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def client(url: str, key: str | None = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=180)


def data_url(image: str | Path | bytes, kind: str = "png") -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side (900 Mpx at 30000) that is ~100 KB: zeros compress ~1000:1."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # bit depth 1, grayscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def user_message(question: str, image_url: str | None, image_first: bool = False) -> list[dict]:
    parts = [{"type": "text", "text": question}]
    if image_url is not None:
        image = {"type": "image_url", "image_url": {"url": image_url}}
        parts = [image, *parts] if image_first else [*parts, image]
    return [{"role": "user", "content": parts}]


def expected_answer(pipe, question: str, image) -> tuple[str, list[dict]]:
    """Pipeline.chat's answer and its anchors in the server's form (the reference the server must match)."""
    from attanchor_runtime.visualize import token_label

    stream = pipe.stream(question, image, max_new_tokens=256)
    text = "".join(stream)
    ids = pipe.prompt_ids(question)
    side = int(np.sqrt(pipe.manifest.dims.image_tokens))
    anchors = [{"token": token_label(pipe, int(ids[t])), "row": m // side, "col": m % side}
               for t, m in stream.output.anchors[0]]
    return text, anchors


# -- the checks both deployments must pass ---------------------------------------------------------------

def check_answers_match_pipeline(url: str, model: str, pipe, items, key: str | None = KEY) -> None:
    c = client(url, key)
    for i, item in enumerate(items):
        expected, anchors = expected_answer(pipe, item.question, item.image)
        reply = c.chat.completions.create(model=model, messages=user_message(item.question, data_url(item.image),
                                                                            image_first=i % 2 == 0))
        message = reply.choices[0].message
        assert message.content == expected, (item, message.content, expected)
        assert message.model_extra["anchors"] == anchors, item
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens == len(pipe.prompt_ids(item.question)) - 1 + \
            pipe.manifest.dims.image_tokens + len(anchors)
        assert reply.usage.completion_tokens >= 1 and reply.model == model


def check_stream_concatenates(url: str, model: str, pipe, item, key: str | None = KEY) -> None:
    expected, anchors = expected_answer(pipe, item.question, item.image)
    chunks = list(client(url, key).chat.completions.create(
        model=model, messages=user_message(item.question, data_url(item.image)), stream=True,
        stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected
    last = [ch for ch in chunks if ch.choices][-1]
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.model_extra["anchors"] == anchors
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def check_concurrent(url: str, model: str, pipe, items, key: str | None = KEY) -> list[str]:
    """len(items) requests at once; each answer equals Pipeline.chat's. Returns which replica answered each."""
    expected = [expected_answer(pipe, it.question, it.image)[0] for it in items]

    def ask(item):
        raw = client(url, key).chat.completions.with_raw_response.create(
            model=model, messages=user_message(item.question, data_url(item.image)))
        return raw.parse().choices[0].message.content, raw.headers["x-attanchor-replica"]

    with ThreadPoolExecutor(len(items)) as pool:
        answers = list(pool.map(ask, items))
    assert [a for a, _ in answers] == expected
    return [r for _, r in answers]


def check_api_key(url: str, model: str, item) -> None:
    import openai

    for key in (None, "wrong-key"):
        try:
            client(url, key).chat.completions.create(model=model, messages=user_message(item.question, data_url(item.image)))
        except openai.AuthenticationError as exc:
            assert exc.status_code == 401 and exc.body["code"] == "invalid_api_key"
        else:
            raise AssertionError(f"key {key!r} was accepted")
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # open, like the page
    assert httpx.get(f"{url}/").status_code == 200


def check_error(response: httpx.Response, status: int, code: str | None = None, says: str | None = None) -> None:
    """An OpenAI-style error body with the expected status (and code, and words in the message)."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    if says is not None:
        assert says in error["message"], error


def post(url: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{url}/v1/chat/completions", content=body, timeout=120,
                          headers={**headers, "Content-Type": "application/json"}, **kwargs)
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120, headers=headers, **kwargs)


def check_unknown_model(url: str, image: str) -> None:
    import openai

    try:
        client(url).chat.completions.create(model="gpt-4o", messages=user_message("what shape?", data_url(image)))
    except openai.NotFoundError as exc:
        assert exc.body["code"] == "model_not_found"
    else:
        raise AssertionError("an unknown model name was served")
    check_error(httpx.get(f"{url}/v1/models/gpt-4o", headers={"Authorization": f"Bearer {KEY}"}), 404,
                "model_not_found")


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def check_bad_inputs(url: str, model: str, image: str) -> None:
    """Each bad input gets its status and an OpenAI-style error body. The server must run with
    --max-image-pixels 1000000 --max-body-mb 1 and neither --allow-files nor --allow-remote-images."""
    good = data_url(image)
    png = Path(image).read_bytes()
    watcher = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=watcher.serve_forever, daemon=True).start()

    def body(question="what color is the shape?", url=good, **extra):
        return {"model": model, "messages": user_message(question, url), **extra}

    cases = [
        ("malformed JSON", post(url, b'{"model": '), 400, None, "not valid JSON"),
        ("not an object", post(url, b"[1, 2]"), 400, None, "JSON object"),
        ("missing messages", post(url, {"model": model}), 400, None, "messages"),
        ("empty messages", post(url, {"model": model, "messages": []}), 400, None, "messages"),
        ("unknown role", post(url, {"messages": [{"role": "tool", "content": "x"}]}), 400, None, "role"),
        ("non-image data URL", post(url, body(url="data:text/plain;base64,aGVsbG8=")), 400, "invalid_image_url", None),
        ("bad base64", post(url, body(url="data:image/png;base64,!!!not-base64")), 400, "invalid_image_url", "base64"),
        ("truncated PNG", post(url, body(url=data_url(png[: len(png) // 2]))), 400, "invalid_image", None),
        ("not an image", post(url, body(url=data_url(b"GIF89a" + b"\0" * 64))), 400, "invalid_image", None),
        ("over the pixel limit", post(url, body(url=data_url(png_bytes(np.zeros((1000, 1200, 3), np.uint8))))),
         400, "image_too_large", "1,200,000 pixels"),
        ("decompression bomb", post(url, body(url=data_url(bomb_png()))), 400, "image_too_large", "900000000 pixels"),
        ("100000x1 strip", post(url, body(url=data_url(png_bytes(np.zeros((1, 100000, 3), np.uint8))))),
         400, "image_too_large", "100000x1"),
        ("body over the limit", post(url, body(url=data_url(b"\0" * 1_200_000))), 413, "request_too_large", None),
        ("prompt over the context", post(url, body(question="red " * 9000)), 400, "context_length_exceeded", None),
        ("max_tokens over the context", post(url, body(max_tokens=9000)), 400, "context_length_exceeded", None),
        ("no image", post(url, {"messages": user_message("what shape?", None)}), 400, "image_count", "has 0"),
        ("two images", post(url, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": good}}, {"type": "image_url", "image_url": {"url": good}},
            {"type": "text", "text": "same?"}]}]}), 400, "image_count", "has 2"),
        ("image from the assistant", post(url, {"messages": [
            *user_message("what shape?", good),
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": good}}]},
            {"role": "user", "content": "and now?"}]}), 400, None, "only user messages"),
        ("n = 2", post(url, body(n=2)), 400, None, "n = 2"),
        ("temperature 5", post(url, body(temperature=5)), 400, None, "temperature"),
        ("unknown model", post(url, body(model="gpt-4o")), 404, "model_not_found", None),
        ("wrong key", post(url, body(), key="wrong"), 401, "invalid_api_key", None),
        ("file URL without --allow-files", post(url, body(url=f"file://{image}")), 400,
         "image_source_not_allowed", "--allow-files"),
        ("http URL without --allow-remote-images",
         post(url, body(url=f"http://127.0.0.1:{watcher.server_address[1]}/a.png")), 400,
         "image_source_not_allowed", "--allow-remote-images"),
    ]
    watcher.shutdown()
    for name, response, status, code, says in cases:
        try:
            check_error(response, status, code, says)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    assert _CountingHandler.hits == 0  # nothing was fetched
