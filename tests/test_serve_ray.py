"""The same API through Ray Serve: `attanchor-export serve DIR --ray --replicas 2` starts a local Ray head
(its files under a private RAY_TMPDIR), two replicas each holding its own Pipeline, and Ray Serve's proxy
on localhost. The client checks of test_serve.py pass through it, and 16 concurrent requests are answered
by both replicas (the x-attanchor-replica header says which).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import tempfile
import time

import httpx
import pytest
from serve_helpers import (
    KEY,
    ServeProcess,
    check_answers_match_pipeline,
    check_api_key,
    check_bad_inputs,
    check_concurrent,
    check_stream_concatenates,
    check_unknown_model,
)

MODEL = "tiny-vqa"


@pytest.fixture(scope="module")
def items():
    from attanchor_export.load.datasets import load_task

    return load_task("easy-vqa", limit=16)


@pytest.fixture(scope="module")
def pipe(tiny_vqa_fp32):
    from attanchor_runtime import Pipeline

    return Pipeline.load(tiny_vqa_fp32)


@pytest.fixture(scope="module")
def ray_server(tiny_vqa_fp32, tmp_path_factory):
    if importlib.util.find_spec("ray") is None:  # the server process imports it, not this one
        message = "needs the [ray] extra: pip install -e '.[ray]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = tmp_path_factory.mktemp("serve-ray") / "serve.log"
    started = time.monotonic()
    proc = ServeProcess(tiny_vqa_fp32, "--ray", "--replicas", "2", "--model-name", MODEL, "--max-body-mb", "1",
                        "--max-image-pixels", "1000000",
                        log=log, env={"ATTANCHOR_API_KEY": KEY, "RAY_TMPDIR": ray_tmp}, ready_s=300)
    proc.startup_s = time.monotonic() - started
    yield proc
    try:
        assert proc.stop() == 0, proc.log_text()
        assert KEY not in log.read_text()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_answers_equal_pipeline_chat_and_stream(ray_server, pipe, items, record_property):
    record_property("ray_startup_s", round(ray_server.startup_s, 1))
    check_answers_match_pipeline(ray_server.url, MODEL, pipe, items[:3])
    check_stream_concatenates(ray_server.url, MODEL, pipe, items[3])


def test_ray_spreads_concurrent_requests_over_both_replicas(ray_server, pipe, items, record_property):
    replicas = collections.Counter(check_concurrent(ray_server.url, MODEL, pipe, items))
    record_property("replicas", dict(replicas))
    print(f"16 concurrent requests answered by replica: {dict(replicas)}")
    assert len(replicas) == 2, replicas


def test_ray_refuses_bad_input_and_keeps_serving(ray_server, pipe, items):
    check_bad_inputs(ray_server.url, MODEL, items[0].image)
    check_api_key(ray_server.url, MODEL, items[0])
    check_unknown_model(ray_server.url, items[0].image)
    assert httpx.get(f"{ray_server.url}/health").json()["status"] == "ok"
    check_answers_match_pipeline(ray_server.url, MODEL, pipe, items[:1])
