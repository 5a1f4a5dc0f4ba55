"""The server's parts that need no model: remote image fetching and its address rules, image limits, stop
strings, which requests may share a batch, the OpenAI message conversion, and `serve run`'s arguments."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from attanchor_runtime.serve.errors import APIError
from attanchor_runtime.serve.images import decode_image, fetch_remote, is_public_address
from attanchor_runtime.serve.ray_app import parse_build_args
from attanchor_runtime.serve.scheduler import Settings, StopText
from attanchor_runtime.serve.schemas import ChatCompletionRequest, conversation
from serve_helpers import bomb_png, png_bytes

PNG = png_bytes(np.full((20, 30, 3), 200, np.uint8))


class _Images(http.server.BaseHTTPRequestHandler):
    """/img: a PNG; /big: 2 MB; /slow: answers after 5 s; /to/ADDRESS: a redirect to http://ADDRESS/img;
    /loop: redirects to itself."""

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", f"http://{self.path[4:]}:{port}/img")
            self.end_headers()
            return
        if self.path == "/loop":
            self.send_response(307)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        if self.path == "/slow":
            time.sleep(5)
        body = b"\0" * 2_000_000 if self.path == "/big" else PNG
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/big":  # the big one is chunked-style: no length up front, so the cap must count
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading at its cap
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fetch(url, allowed=lambda ip: ip == "127.0.0.1", max_bytes=1_000_000, timeout=2.0):
    """127.0.0.1 stands in for the public internet; every other address is 'private'."""
    return asyncio.run(fetch_remote(url, max_bytes, timeout, allowed))


def refused(url, code, **kwargs) -> str:
    with pytest.raises(APIError) as info:
        fetch(url, **kwargs)
    assert info.value.status == 400 and info.value.code == code, info.value.body()
    return info.value.message


def test_remote_images_public_addresses_only_with_every_redirect_checked(image_server):
    assert fetch(f"{image_server}/img") == PNG
    assert fetch(f"{image_server}/to/127.0.0.1") == PNG  # a redirect to an allowed address is followed
    assert "127.0.0.2" in refused(f"{image_server}/to/127.0.0.2", "image_source_not_allowed")  # to a private one: no
    assert "non-public" in refused(f"{image_server}/img", "image_source_not_allowed", allowed=is_public_address)
    assert "over" in refused(f"{image_server}/big", "image_too_large")
    assert "redirected more than" in refused(f"{image_server}/loop", "image_fetch_failed")
    started = time.monotonic()
    assert "timed out" in refused(f"{image_server}/slow", "image_fetch_failed", timeout=1.0)
    assert time.monotonic() - started < 4
    message = refused("http://no-such-host.invalid/x.png", "image_fetch_failed")
    assert "resolve" in message or "timed out" in message  # a closed network may not answer DNS at all


def test_public_address_rule():
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700:4700::1111")
    for private in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"):
        assert not is_public_address(private), private


def test_decode_image_limits_come_from_the_header():
    image = decode_image(PNG, max_pixels=600, max_aspect=2)
    assert image.mode == "RGB" and image.size == (30, 20)
    for data, pixels, aspect, code, says in [
        (PNG, 599, 2, "image_too_large", "600 pixels"),
        (PNG, 600, 1.4, "image_too_large", "1.4:1"),
        (bomb_png(), 10**12, 10, "image_too_large", "900000000 pixels"),  # Pillow's own bomb check
        (bomb_png(4000), 10**6, 10, "image_too_large", "4000x4000"),  # ours, before any decoding
        (PNG[:60], 10**6, 10, "invalid_image", "cannot decode"),
        (b"not an image", 10**6, 10, "invalid_image", "not a PNG or JPEG"),
    ]:
        with pytest.raises(APIError) as info:
            decode_image(data, pixels, aspect)
        assert info.value.code == code and says in info.value.message, info.value.message


def test_stop_strings_hold_back_only_what_could_start_one():
    stop = StopText(("\nQ:", "END"))
    assert stop.push("blue") == ("blue", False)
    assert stop.push(" E") == (" ", False)  # "E" may start "END"
    assert stop.push("x") == ("Ex", False)
    assert stop.push("\n") == ("", False)
    assert stop.push("Q: more") == ("", True)  # the stop string and all after it are dropped
    tail = StopText(("END",))
    assert tail.push("the EN") == ("the ", False) and tail.flush() == "EN"  # at the end, what was held is sent


def test_only_requests_with_equal_settings_share_a_batch():
    greedy = Settings.of(0.3, 0.0, 0.9, 7, ticket=1)
    assert greedy == Settings.of(0.3, 0.0, 1.0, None, ticket=2)  # greedy: top_p and seed change nothing
    assert greedy != Settings.of(0.4, 0.0, 1.0, None, ticket=3)  # another threshold
    sampled = Settings.of(0.3, 0.8, 0.9, None, ticket=4)
    assert sampled == Settings.of(0.3, 0.8, 0.9, None, ticket=5) and sampled.sampling()["do_sample"]
    assert Settings.of(0.3, 0.8, 0.9, 1, ticket=6) != Settings.of(0.3, 0.8, 0.9, 1, ticket=7)  # seeded: alone


def test_openai_messages_become_template_turns_with_the_image_first():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "what shape?"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "colour?"}]})
    turns, url = conversation(request.messages)
    assert url == "data:x"
    assert turns == [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
                     {"role": "user", "content": [{"type": "text", "text": "colour?"}]}]
    with pytest.raises(APIError, match="the last message must be the user's"):
        conversation(request.messages[:3])


def test_serve_run_arguments_become_options():
    folder, replicas, cpus, gpus, options = parse_build_args(
        {"artifact": "/m/tiny", "replicas": "3", "replica_gpus": "0.5", "max_batch": "4", "timeout_s": "9.5",
         "allow_remote_images": "true", "allow_files": "/data", "api_key": "s3cret-key"})
    assert (folder, replicas, cpus, gpus) == ("/m/tiny", 3, 1.0, 0.5)
    assert options.max_batch == 4 and options.timeout_s == 9.5 and options.allow_remote_images
    assert options.allow_files == Path("/data") and options.api_key == "s3cret-key"
    assert "s3cret" not in repr(options)  # a logged ServeOptions never shows the key
    with pytest.raises(ValueError, match="unknown option"):
        parse_build_args({"artifact": "x", "max_bach": "4"})
