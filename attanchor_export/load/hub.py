"""Hub id -> local snapshot folder: download what export needs with huggingface_hub, or use the cache.

Only the files an export reads are fetched (config, safetensors weights, tokenizer / processor / chat
template files); pickled weights can run code when loaded, so they are fetched only when the user
allows them. Every failure becomes one CheckpointError line that names the model and what to do.
Downloads are huggingface_hub's own: its progress bars, its cache, its resuming (a dropped connection
continues where it stopped; a rerun keeps the files already downloaded).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from attanchor_export.errors import CheckpointError, one_line

log = logging.getLogger(__name__)

# huggingface_hub's API calls have no timeout of their own (a blackholed endpoint would hang for
# minutes), so the first call, the one that tells whether the Hub is there, gets this many seconds.
# HF_HUB_ETAG_TIMEOUT is the knob huggingface_hub documents for its metadata calls; reuse it.
TIMEOUT = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)

# Root-level files export reads besides the weights (tokenizers of every kind, processors, templates).
NEEDED = {
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
    "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "adapter_config.json",
    "attanchor_config.json",  # the checkpoint's own AttAnchor defaults (exporter.checkpoint_defaults)
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_offline(offline: bool = False) -> bool:
    """--offline, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE read now (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return offline or env.strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def select_files(repo_id: str, files, allow_pickle: bool = False, trust_remote_code: bool = False) -> list[str]:
    """The files of `repo_id` an export needs, from its file list. Raises when its only weights are pickles."""
    root = [f for f in files if "/" not in f]  # transformers loads from the repo root only
    wanted = [f for f in root if f in NEEDED or (trust_remote_code and f.endswith(".py"))]
    safetensors = [f for f in root if f.endswith((".safetensors", ".safetensors.index.json"))]
    if "model.safetensors" in root or "model.safetensors.index.json" in root:
        # what transformers reads; skips duplicates such as Mistral's consolidated.safetensors
        return wanted + [f for f in safetensors if f.startswith("model")]
    if safetensors:
        return wanted + safetensors
    pickles = [f for f in root if f.startswith(("pytorch_model", "adapter_model"))
               and f.endswith((".bin", ".bin.index.json"))]  # what transformers and peft read
    if not pickles:
        others = [f for f in root if f.endswith(PICKLE_SUFFIXES)]
        what = f"only {', '.join(others[:3])}" if others else "no weight files"
        raise CheckpointError(f"{repo_id} has {what}: expected *.safetensors (or pytorch_model*.bin)")
    if not allow_pickle:
        raise CheckpointError(
            f"{repo_id} has weights only as pickles ({', '.join(pickles[:2])}), which can run code when loaded: "
            "pass --allow-pickle if you trust the repository"
        )
    return wanted + pickles


def fetch(repo_id: str, revision: str | None = None, *, offline: bool = False, allow_pickle: bool = False,
          trust_remote_code: bool = False, cache_dir=None) -> Path:
    """The snapshot folder of repo_id at revision (default branch if None), downloaded if needed.

    Online, the Hub is asked which commit `revision` is (so a moved branch is followed) and the missing
    files are downloaded; if the Hub cannot be reached, the cached snapshot is used with a warning.
    Offline (`offline`, HF_HUB_OFFLINE=1), only the cache is read and nothing touches the network.
    """
    from huggingface_hub import HfApi, constants

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    options = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if is_offline(offline):
        return _cached(repo_id, revision, cache, **options)
    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision, timeout=TIMEOUT)
    except Exception as e:  # noqa: BLE001 - every kind is either mapped to one line or means "unreachable"
        reason = _unreachable(e, repo_id, revision)
        return _cached(repo_id, revision, cache, unreachable=f"cannot reach {api.endpoint} ({reason})", **options)
    files = select_files(repo_id, [s.rfilename for s in info.siblings or []], **options)
    folder = _download(repo_id, info.sha, files, cache)
    if revision != info.sha:  # record branch/tag -> commit as huggingface_hub does, so offline finds it
        _write_ref(cache / _repo_folder(repo_id) / "refs" / (revision or "main"), info.sha)
    return folder


def _download(repo_id: str, commit: str, files: list[str], cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        # a commit, not the branch: the files listed above are the files fetched, even if the branch moves
        return Path(snapshot_download(repo_id, revision=commit, cache_dir=cache, etag_timeout=TIMEOUT,
                                      allow_patterns=[_literal(f) for f in files]))
    except GatedRepoError:
        raise CheckpointError(_gated(repo_id)) from None
    except RepositoryNotFoundError:
        raise CheckpointError(_not_found(repo_id)) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise CheckpointError(_denied(repo_id)) from None
        raise CheckpointError(f"downloading {repo_id} failed (HTTP {status}): {_reason(e)}") from None
    except OSError as e:
        causes = list(_chain(e))
        codes = {c.errno for c in causes if isinstance(c, OSError)}
        if errno.ENOSPC in codes:
            raise CheckpointError(
                f"no space left on the device holding the Hugging Face cache ({cache}) while downloading {repo_id}: "
                "free space or point HF_HOME (or HF_HUB_CACHE) at a bigger disk, then rerun (finished files are kept)"
            ) from None
        if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
            raise CheckpointError(
                f"cannot write to the Hugging Face cache {cache}: point HF_HOME (or HF_HUB_CACHE) at a writable folder"
            ) from None
        raise CheckpointError(_interrupted(repo_id, causes[-1])) from None
    except Exception as e:  # noqa: BLE001 - httpx errors mid-download; no traceback reaches the user
        raise CheckpointError(_interrupted(repo_id, list(_chain(e))[-1])) from None


def _cached(repo_id, revision, cache: Path, unreachable: str | None = None, **options) -> Path:
    """The cached snapshot, or the one-line reason it cannot be used. Touches no network."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, IncompleteSnapshotError

    at = f" at revision {revision}" if revision else ""
    try:  # the listing cached by the download: ask only for the files it selected, as online
        files = [f.path for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache)]
        patterns = [_literal(f) for f in select_files(repo_id, files, **options)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        patterns = None  # a cache filled by other means: take the snapshot as it is
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                        allow_patterns=patterns))
    except IncompleteSnapshotError:
        raise CheckpointError(
            f"the cached snapshot of {repo_id}{at} in {cache} is incomplete (an interrupted download): "
            "rerun with network to finish it"
        ) from None
    except (FileNotFoundError, OSError, ValueError):
        get = f"`hf download {repo_id}{' --revision ' + revision if revision else ''}`"
        if unreachable:
            raise CheckpointError(
                f"{unreachable} to download {repo_id}{at}, and it is not in the local Hugging Face cache ({cache}): "
                f"check the network or HF_ENDPOINT, or run {get} where there is network and copy the cache, "
                "or pass a local folder"
            ) from None
        raise CheckpointError(
            f"{repo_id}{at} is not in the local Hugging Face cache ({cache}) and downloads are off "
            f"(--offline or HF_HUB_OFFLINE=1): run {get} where there is network and copy the cache, "
            "drop --offline, or pass a local folder"
        ) from None
    if unreachable:
        log.warning("%s; using the cached %s at commit %s", unreachable, repo_id, folder.name[:12])
    return folder


def _unreachable(error: Exception, repo_id: str, revision: str | None) -> str:
    """Raise the one-line CheckpointError for a Hub that answered no; return why it did not answer."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        raise CheckpointError(_gated(repo_id)) from None
    if isinstance(error, RepositoryNotFoundError):
        raise CheckpointError(_not_found(repo_id)) from None
    if isinstance(error, RevisionNotFoundError):
        raise CheckpointError(
            f"{repo_id} has no revision {revision!r}: pass an existing branch, tag or commit to --revision"
        ) from None
    if isinstance(error, DisabledRepoError):
        raise CheckpointError(f"{repo_id} has been disabled on the Hub: it cannot be downloaded") from None
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise CheckpointError(_denied(repo_id)) from None
        if status is not None and status < 500 and status != 429:
            raise CheckpointError(f"the Hub refused {repo_id} (HTTP {status}): {_reason(error)}") from None
        return f"HTTP {status}"  # the Hub is down or rate-limiting: the cache may still serve
    return _reason(error)


def _gated(repo_id: str) -> str:
    return (
        f"{repo_id} is gated: accept its conditions on its Hub page with your account, then run `hf auth login` "
        "or set HF_TOKEN to a token of that account"
    )


def _not_found(repo_id: str) -> str:
    return (
        f"{repo_id} is not a repository on the Hub (or it is private): check the id (owner/name), and for a "
        "private one run `hf auth login` or set HF_TOKEN"
    )


def _denied(repo_id: str) -> str:
    return f"access to {repo_id} was refused: run `hf auth login` or set HF_TOKEN to a token with read access to it"


def _reason(error: BaseException) -> str:
    """A short why, never the request headers (they hold the token)."""
    import httpx2

    if isinstance(error, httpx2.TimeoutException):
        return f"no answer within {TIMEOUT:.0f} s"
    text = one_line(error).split(" for url:")[0]  # HfHubHTTPError text: first sentence only
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:200]


def _interrupted(repo_id: str, cause: BaseException) -> str:
    return f"downloading {repo_id} was interrupted ({_reason(cause)}): check the network and rerun (finished files are kept)"


def _chain(error: BaseException | None):
    """error, its cause, the cause's cause... (huggingface_hub wraps network and disk errors)."""
    for _ in range(16):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


def _write_ref(ref: Path, commit: str) -> None:
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return  # a read-only cache that is up to date is fine
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)  # atomic: a concurrent reader never sees an empty ref
    except OSError as e:
        log.warning("could not record %s -> %s in the cache (%s): offline use needs the commit", ref.name, commit, e)


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")  # the cache layout huggingface_hub documents


def _literal(name: str) -> str:
    """A file name as an fnmatch pattern that matches only itself (allow_patterns are globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
