"""Resolve MODEL (alias, Hub id or local folder) and load it for export, offline only.

Hub ids are read from the local huggingface_hub cache and never downloaded: an export machine is
often air-gapped, and a missing model must fail at once with a one-line hint, not after minutes of
network retries. transformers is imported only after the cheap checks, so those errors are instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import Adapter, adapter_for
from .errors import CheckpointError, one_line

ALIASES = {
    "tinyllava-1b": "bczhou/tiny-llava-v1-hf",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "processor_config.json")


@dataclass
class Loaded:
    """A checkpoint ready for export: the eval-mode model and where everything came from."""

    model: torch.nn.Module
    config: Any
    adapter: Adapter
    source: str  # what the user asked for after alias expansion: a Hub id or an absolute folder
    folder: Path  # where the files are (the folder itself, or the Hub cache snapshot)
    revision: str | None = None  # the revision asked for (branch, tag or commit), if any
    commit: str | None = None  # the commit hash of a Hub snapshot; None for a plain folder
    alias: str | None = None  # e.g. "tinyllava-1b" when MODEL was an alias
    processor_folder: Path | None = None  # tokenizer / processor / chat template files, if present
    extra: dict = field(default_factory=dict)

    @property
    def dims(self):
        return self.adapter.dims


def resolve_model(name: str) -> tuple[str, str | None]:
    """MODEL -> (absolute folder or Hub id, the alias expanded or None). Touches no network."""
    name = str(name)
    if name in ALIASES:
        return ALIASES[name], name
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name} is a file, not a checkpoint folder")
        return str(path.resolve()), None
    if _HUB_ID.match(name):
        return name, None
    raise CheckpointError(
        f"no such folder {name}, and it is neither an alias ({', '.join(ALIASES)}) nor a Hub id (owner/name)"
    )


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir) -> Path:
    """The local cache snapshot of repo_id, or CheckpointError at once (local_files_only: no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        at = f" at revision {revision}" if revision else ""
        raise CheckpointError(
            f"{repo_id}{at} is not in the local Hugging Face cache and this tool never downloads: run "
            f"`huggingface-cli download {repo_id}` (or `hf download {repo_id}`) on a machine with network "
            f"and copy the cache, or pass a local folder"
        ) from None


def check_folder(folder: Path) -> None:
    """A checkpoint folder needs config.json and weights (*.safetensors preferred, pytorch_model*.bin)."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no config.json in {folder}: not a transformers checkpoint folder")
    if not (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))):
        raise CheckpointError(f"no weights in {folder} (expected *.safetensors or pytorch_model*.bin)")


def load_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise CheckpointError(
                f"{folder} needs custom code (config auto_map); it is not run unless you pass --trust-remote-code"
            ) from None
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {one_line(e)}") from None
    except (OSError, KeyError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {one_line(e)}") from None


def load_checkpoint(
    name: str,
    trust_remote_code: bool = False,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir=None,
    attn_implementation: str | None = None,
) -> Loaded:
    """Load MODEL (alias, Hub id from the local cache, or folder) in eval mode with its adapter.

    The architecture is checked from config.json before any weight is read, so an unsupported
    checkpoint fails in a second. trust_remote_code is passed to transformers only when asked.
    """
    source, alias = resolve_model(name)
    commit = None
    if Path(source).is_absolute():
        if revision is not None:  # silently loading whatever the folder holds would hide a mistake
            raise CheckpointError(f"a revision ({revision}) applies to Hub ids, not to the folder {source}")
        folder = Path(source)
    else:
        folder = _cached_snapshot(source, revision, cache_dir)
        commit = folder.name  # snapshots are stored under their commit hash
    check_folder(folder)
    config = load_config(folder, trust_remote_code)
    adapter = adapter_for(config)

    kwargs = dict(dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own progress; tqdm bars would interleave with it
    try:
        model = adapter.model_class().from_pretrained(folder, config=config, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load weights from {folder}: {one_line(e)}") from None
    model.eval()
    processor_folder = folder if any((folder / f).is_file() for f in _PROCESSOR_FILES) else None
    return Loaded(
        model=model,
        config=model.config,
        adapter=adapter_for(model.config),
        source=source,
        folder=folder,
        revision=revision,
        commit=commit,
        alias=alias,
        processor_folder=processor_folder,
    )
