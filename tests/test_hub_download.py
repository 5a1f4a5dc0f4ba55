"""Hub downloads against a local stand-in for the Hub (tests/hub_server.py): download, cache re-use,
offline mode, and every failure as one line that names the model and what to do."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from hub_server import HubServer, folder_files

from attanchor_export.cli import main
from attanchor_export.errors import CheckpointError
from attanchor_export.load import hub as hub_module
from attanchor_export.load.checkpoint import load_checkpoint, locate
from attanchor_export.load.hub import select_files
from attanchor_export.load.tiny_random import make_tiny_llava

ALIAS, REPO = "tinyllava-1b", "bczhou/tiny-llava-v1-hf"
COPY, PICKLED, GATED = "acme/tiny-llava-copy", "acme/pickled-only", "acme/gated-llava"
NEEDED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "processor_config.json", "chat_template.jinja", "attanchor_config.json"}
# What a real repo holds besides: pickled duplicates, docs, other formats in folders.
DECOYS = {"pytorch_model.bin": b"\x80\x04 not a real pickle", "README.md": b"# tiny", "onnx/model.onnx": b"onnx"}
TOKEN = "hf_secret123"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    files = folder_files(make_tiny_llava(tmp_path_factory.mktemp("tiny") / "model"))
    assert NEEDED <= set(files), sorted(files)
    return files


def publish(server: HubServer, files: dict) -> dict:
    """The repos the tests use; returns their commits."""
    v1 = dict(files, **{"generation_config.json": files["generation_config.json"].replace(b"{", b'{"v1": 1,', 1)})
    return {
        "main": server.add(REPO, {**files, **DECOYS}),
        "v1": server.add(REPO, v1, revision="v1"),
        "copy": server.add(COPY, files),
        "pickled": server.add(PICKLED, {"config.json": files["config.json"], **DECOYS}),
        "gated": server.add(GATED, files, gated=True),
    }


def point_hub_at(monkeypatch, endpoint: str, cache) -> None:
    """What HF_ENDPOINT / HF_HUB_CACHE do at import, for this process (huggingface_hub reads them once)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache.parent / "token"))  # never a developer's own token
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(cache.parent / "agents.json"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf" / "hub"


@pytest.fixture
def server(tiny_files, monkeypatch, cache):
    with HubServer() as hub:
        hub.commits = publish(hub, tiny_files)
        point_hub_at(monkeypatch, hub.url, cache)
        yield hub


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "huggingface-cli" not in lines[0] and "Traceback" not in result.output
    return lines[0]


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_cli_downloads_and_exports(tiny_files, tmp_path):
    # The "done when", as a user runs it: HF_ENDPOINT in the environment, a fresh HF_HOME.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"))
    command = [sys.executable, "-c", "from attanchor_export.cli import main; main()"]
    with HubServer() as hub:
        commits = publish(hub, tiny_files)
        env["HF_ENDPOINT"] = hub.url
        run = subprocess.run([*command, ALIAS, "-o", tmp_path / "out"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr
        assert f"Fetching {len(NEEDED)} files" in run.stderr  # huggingface_hub's own progress bar
        assert sorted(hub.downloaded(REPO)) == sorted(NEEDED)  # no .bin, README or subfolder
    source = json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]
    assert (source["alias"], source["resolved"], source["commit"]) == (ALIAS, REPO, commits["main"])
    snapshot = tmp_path / "hf" / "hub" / "models--bczhou--tiny-llava-v1-hf" / "snapshots" / commits["main"]
    assert {p.name for p in snapshot.iterdir()} == NEEDED

    # Server gone: the cache the CLI filled serves offline (the CLI's --offline wiring: tests below).
    assert locate(ALIAS, offline=True, cache_dir=tmp_path / "hf" / "hub").folder == snapshot.resolve()


def test_only_what_export_needs_is_fetched_and_recorded(server, cache):
    located = locate(ALIAS)
    assert (located.source, located.alias, located.commit) == (REPO, ALIAS, server.commits["main"])
    assert located.folder == cache.resolve() / "models--bczhou--tiny-llava-v1-hf" / "snapshots" / located.commit
    assert {p.name for p in located.folder.iterdir()} == NEEDED
    assert sorted(server.downloaded(REPO)) == sorted(NEEDED)
    assert (cache / "models--bczhou--tiny-llava-v1-hf" / "refs" / "main").read_text() == located.commit


def test_another_id_loads_with_its_commit(server):
    loaded = load_checkpoint(COPY)
    assert (loaded.source, loaded.alias, loaded.commit) == (COPY, None, server.commits["copy"])
    assert loaded.processor_folder == loaded.folder and not loaded.model.training


def test_cache_is_reused_when_the_server_is_gone(server, monkeypatch, caplog):
    first = locate(ALIAS)
    server.stop()
    assert locate(ALIAS).folder == first.folder  # online attempt refused -> cached snapshot, with a warning
    assert "cannot reach" in caplog.text and "using the cached bczhou/tiny-llava-v1-hf" in caplog.text

    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    assert load_checkpoint(ALIAS, offline=True).commit == first.commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert locate(ALIAS).folder == first.folder
    assert attempts == []  # offline touches no network at all


@pytest.mark.parametrize("how", ["--offline", "HF_HUB_OFFLINE=1"])
def test_offline_and_not_cached_fails_at_once(server, monkeypatch, tmp_path, how):
    if how.startswith("HF_"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    line = one_error_line(cli(ALIAS, "-o", tmp_path / "o", *([how] if how.startswith("--") else [])))
    assert time.monotonic() - start < 5 and server.requests == []
    assert f"{REPO} is not in the local Hugging Face cache" in line and f"`hf download {REPO}`" in line
    assert not (tmp_path / "o").exists()


def test_unknown_repository_is_one_line(server, tmp_path):
    line = one_error_line(cli("nobody/no-such-model", "-o", tmp_path / "o"))
    assert "nobody/no-such-model is not a repository on the Hub" in line and "hf auth login" in line


def test_gated_repository_says_how_to_log_in_and_never_prints_the_token(server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = cli(GATED, "-o", tmp_path / "o")
    line = one_error_line(result)
    assert f"{GATED} is gated" in line and "`hf auth login`" in line and "HF_TOKEN" in line
    assert f"Bearer {TOKEN}" in server.authorizations  # the token was used...
    assert TOKEN not in result.output  # ...and never shown
    assert server.downloaded(GATED) == []


def test_unreachable_endpoint_fails_fast(tiny_files, monkeypatch, cache, tmp_path):
    point_hub_at(monkeypatch, closed_port(), cache)
    start = time.monotonic()
    line = one_error_line(cli(ALIAS, "-o", tmp_path / "o"))
    assert time.monotonic() - start < 20
    assert line.startswith("error: cannot reach http://127.0.0.1:") and f"to download {REPO}" in line
    assert "not in the local Hugging Face cache" in line and "HF_ENDPOINT" in line


def test_endpoint_that_never_answers_times_out(monkeypatch, cache):
    # Accepts connections (the kernel's backlog) and never replies: only a timeout ends the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        point_hub_at(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}", cache)
        monkeypatch.setattr(hub_module, "TIMEOUT", 1.0)
        start = time.monotonic()
        with pytest.raises(CheckpointError, match="no answer within 1 s"):
            locate(ALIAS)
        assert time.monotonic() - start < 10  # one attempt, no retry loop


def test_pickled_only_repository_needs_allow_pickle(server, tmp_path):
    line = one_error_line(cli(PICKLED, "-o", tmp_path / "o"))
    assert f"{PICKLED} has weights only as pickles (pytorch_model.bin)" in line and "--allow-pickle" in line
    assert server.downloaded(PICKLED) == []
    folder = locate(PICKLED, allow_pickle=True).folder
    assert {p.name for p in folder.iterdir()} == {"config.json", "pytorch_model.bin"}


def test_revision_pins_a_tag_or_a_commit(server, tmp_path):
    tag = locate(ALIAS, "v1")
    assert tag.commit == server.commits["v1"] and tag.revision == "v1"
    assert b'"v1": 1' in (tag.folder / "generation_config.json").read_bytes()
    pinned = locate(ALIAS, server.commits["main"])
    assert pinned.commit == server.commits["main"]
    server.stop()
    assert locate(ALIAS, "v1", offline=True).commit == server.commits["v1"]  # the tag was recorded
    with pytest.raises(CheckpointError, match="at revision v2 is not in the local Hugging Face cache"):
        locate(ALIAS, "v2", offline=True)


def test_unknown_revision_is_one_line(server, tmp_path):
    line = one_error_line(cli(ALIAS, "-o", tmp_path / "o", "--revision", "v9"))
    assert f"{REPO} has no revision 'v9'" in line and "--revision" in line


def test_disk_full_is_one_line(server, monkeypatch, tmp_path):
    import huggingface_hub.file_download as file_download

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full)
    line = one_error_line(cli(ALIAS, "-o", tmp_path / "o"))
    assert "no space left" in line and REPO in line and "HF_HOME" in line and "rerun" in line


def test_dropped_connection_resumes_where_it_stopped(server, tiny_files, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)  # it resumes after the last whole chunk
    server.cut["model.safetensors"] = 1000  # the first GET sends 1000 bytes and hangs up
    folder = locate(ALIAS).folder
    [(name, start)] = server.ranges  # huggingface_hub asked for the rest only
    assert name == "model.safetensors" and 0 < start <= 1000
    assert (folder / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]


def test_select_files():
    files = ["config.json", "tokenizer.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin", "README.md",
             "modeling_x.py", "original/consolidated.pth", "onnx/model.safetensors"]
    chosen = select_files("a/b", files)
    assert sorted(chosen) == ["config.json", "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert "modeling_x.py" in select_files("a/b", files, trust_remote_code=True)
    assert select_files("a/b", ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]) == [
        "adapter_config.json", "adapter_model.safetensors"]  # a peft adapter repo
    with pytest.raises(CheckpointError, match="only as pickles"):
        select_files("a/b", ["adapter_config.json", "adapter_model.bin"])
    with pytest.raises(CheckpointError, match="has only model.ckpt"):
        select_files("a/b", ["config.json", "model.ckpt"], allow_pickle=True)
    with pytest.raises(CheckpointError, match="has no weight files"):
        select_files("a/b", ["config.json"])
