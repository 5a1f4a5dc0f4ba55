"""`--adapter`: merge a peft LoRA adapter into the loaded checkpoint before anything is traced.

peft does the merge (PeftModel.from_pretrained(...).merge_and_unload()); this module finds the adapter,
checks it against the model first so a wrong one fails with one line instead of a size-mismatch
traceback or, worse, a silent partial merge, and returns what the manifest records about it.

Two layouts are accepted, told apart by the saved key names:
  model           saved against the whole LlavaForConditionalGeneration
                  (keys base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight)
  language_model  saved against the bare text model, e.g. LlamaModel = llava.model.language_model
                  (keys base_model.model.layers.0.self_attn.q_proj.lora_A.weight)
An adapter saved against a text-only *ForCausalLM (keys base_model.model.model.layers...) is refused:
its module names match neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from attanchor_runtime.manifest import AdapterRecord, sha256_of

from attanchor_export.errors import CheckpointError, one_line

CONFIG_FILE = "adapter_config.json"
SAFE_WEIGHTS, PICKLED_WEIGHTS = "adapter_model.safetensors", "adapter_model.bin"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model: the wrapped module
# Text-model fields whose disagreement means "trained on another base", checked when the base is at hand.
_TEXT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_adapter(source: str, offline: bool = False, allow_pickle: bool = False,
                    revision: str | None = None) -> tuple[Path, str | None]:
    """Adapter folder or Hub id -> (local folder, Hub commit or None). Hub ids come from the cache when
    offline (HF_HUB_OFFLINE=1 or offline=True), else are downloaded: only the adapter files."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"adapter {source} is a file: pass the folder holding {CONFIG_FILE}")
        return path.resolve(), None
    if not _HUB_ID.match(source):
        raise CheckpointError(f"adapter {source}: no such folder, and not a Hub id (owner/name)")
    # Kept to one call on purpose: model downloads live in hub.py, and the two are to be unified there.
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_FILE, SAFE_WEIGHTS] + ([PICKLED_WEIGHTS] if allow_pickle else [])
    local = offline or _offline()
    try:
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=patterns, local_files_only=local))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises a different type per HTTP/cache failure
        hint = f" (offline: not in the local Hugging Face cache; `hf download {source}` it first)" if local else ""
        raise CheckpointError(f"cannot fetch adapter {source}{hint}: {one_line(e)}") from None
    return folder, folder.name  # snapshots are stored under their commit hash


def adapter_files(folder: Path, name: str, allow_pickle: bool) -> tuple[Path, Path]:
    """(adapter_config.json, weights file); safetensors preferred, pickle only when allowed."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"adapter {name}: no {CONFIG_FILE} in {folder}, so not a peft adapter")
    if (folder / SAFE_WEIGHTS).is_file():
        return config, folder / SAFE_WEIGHTS
    if (folder / PICKLED_WEIGHTS).is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"adapter {name} has only a pickled {PICKLED_WEIGHTS}, which can run code when loaded: "
                f"convert it to safetensors or pass --allow-pickle"
            )
        return config, folder / PICKLED_WEIGHTS
    raise CheckpointError(f"adapter {name}: no {SAFE_WEIGHTS} in {folder}")


def adapter_hash(files: list[Path]) -> tuple[dict, str]:
    """Per-file sha256 and one combined digest, equal to `sha256sum FILES | sha256sum` (names sorted)."""
    digests = {p.name: sha256_of(p) for p in sorted(files, key=lambda p: p.name)}
    listing = "".join(f"{h}  {n}\n" for n, h in digests.items())
    return digests, hashlib.sha256(listing.encode()).hexdigest()


def _shapes(weights: Path) -> dict[str, tuple]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    state = torch.load(str(weights), map_location="cpu", weights_only=True)  # only reached with --allow-pickle
    return {k: tuple(v.shape) for k, v in state.items()}


def _lora_entries(shapes: dict) -> dict[str, dict]:
    """{module path: {"lora_A.weight": shape, ...}} from the saved keys (prefix stripped)."""
    modules: dict[str, dict] = {}
    for key, shape in shapes.items():
        if ".lora_" not in key:
            continue  # modules_to_save copies and the like: peft checks those itself
        path, _, part = key.removeprefix(_PREFIX).partition(".lora_")
        modules.setdefault(path, {})["lora_" + part] = shape
    return modules


def _text_summary(config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {f: getattr(text, f, None) for f in _TEXT_FIELDS}


def _check_base(name: str, config: dict, loaded) -> None:
    """Other base model: by class (peft's auto_mapping) and, when the recorded base is a folder here or a
    Hub id, by its config. A base recorded as a path that does not exist here proves nothing."""
    model, text = type(loaded.model).__name__, type(loaded.family.language_model(loaded.model)).__name__
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base_class not in (model, text):
        raise CheckpointError(
            f"adapter {name} was saved against {base_class}; this checkpoint is {model} (language model {text})"
        )
    base = config.get("base_model_name_or_path") or ""
    if base and (Path(base) / "config.json").is_file():
        from transformers import AutoConfig

        try:
            theirs = _text_summary(AutoConfig.from_pretrained(base, local_files_only=True))
        except Exception:  # noqa: BLE001 - an unreadable base config proves nothing; the shapes decide
            return
        mine = _text_summary(loaded.config)
        diff = [f"{f} {theirs[f]} vs {mine[f]}" for f in _TEXT_FIELDS if theirs[f] != mine[f]]
        if diff:
            raise CheckpointError(f"adapter {name} was trained on {base}, another base model ({', '.join(diff)})")
    elif base and _HUB_ID.match(base) and _HUB_ID.match(loaded.source) and base != loaded.source:
        raise CheckpointError(f"adapter {name} was trained on {base}, not on {loaded.source}")


def _pick_target(name: str, entries: dict, loaded, base_class: str | None):
    """The module the adapter was saved against: the whole model or its language model."""
    candidates = [("model", loaded.model), ("language_model", loaded.family.language_model(loaded.model))]
    scored = []
    for kind, module in candidates:
        names = dict(module.named_modules())
        missing = [p for p in entries if p not in names]
        if not missing:
            return kind, module, names
        scored.append((len(missing), kind, missing))
    _, _, missing = min(scored)
    saved = f" (saved against {base_class})" if base_class else ""
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise CheckpointError(f"adapter {name}{saved} targets modules this checkpoint lacks: {missing[0]}{more}")


def _check_shapes(name: str, entries: dict, modules: dict) -> None:
    """LoRA A is [r, in], B is [out, r] (embeddings: A [r, num], B [dim, r]); compare with the module."""
    for path, parts in entries.items():
        module = modules[path]
        if isinstance(module, torch.nn.Linear):
            want = {"lora_A.weight": (1, module.in_features), "lora_B.weight": (0, module.out_features)}
            kind = f"Linear {module.in_features}->{module.out_features}"
        elif isinstance(module, torch.nn.Embedding):
            want = {"lora_embedding_A": (1, module.num_embeddings), "lora_embedding_B": (0, module.embedding_dim)}
            kind = f"Embedding {module.num_embeddings}x{module.embedding_dim}"
        else:
            continue  # other layer types: peft's own load reports a mismatch
        for part, (axis, size) in want.items():
            shape = parts.get(part)
            if shape is not None and (len(shape) != 2 or shape[axis] != size):
                raise CheckpointError(
                    f"adapter {name} does not fit this checkpoint: {path} is {kind}, but the adapter's "
                    f"{part} is {'x'.join(map(str, shape))} (another base model or other dims)"
                )


@dataclass
class LocatedAdapter:
    """An adapter found on disk and hashed, not yet read into torch (cheap: done before the model loads)."""

    source: str  # as the user gave it: a folder or a Hub id
    folder: Path
    commit: str | None
    config_file: Path
    weights: Path
    files: dict  # file name -> sha256
    sha256: str  # sha256 of the `sha256sum` listing of those files


def locate_adapter(source: str, offline: bool = False, allow_pickle: bool = False,
                   expect: AdapterRecord | None = None) -> LocatedAdapter:
    """Find (download) and hash the adapter. expect: the manifest record of an earlier export (check DIR):
    the files must hash the same, and a pickled adapter it used is allowed again (same file, by hash);
    a Hub adapter is fetched at the commit it had then."""
    revision = None
    if expect is not None:
        allow_pickle = allow_pickle or PICKLED_WEIGHTS in expect.files
        revision = expect.commit if source == expect.source else None
    folder, commit = resolve_adapter(source, offline=offline, allow_pickle=allow_pickle, revision=revision)
    config_file, weights = adapter_files(folder, source, allow_pickle)
    files, digest = adapter_hash([config_file, weights])
    if expect is not None and expect.sha256 != digest:
        raise CheckpointError(
            f"adapter {source} is not the one the artifact was exported with (sha256 {digest[:12]}..., "
            f"manifest {expect.sha256[:12]}...): pass the original with --adapter"
        )
    return LocatedAdapter(source, folder, commit, config_file, weights, files, digest)


def apply_adapter(loaded, located: LocatedAdapter) -> AdapterRecord:
    """Merge the located LoRA adapter into loaded.model (in place); return the manifest record."""
    source, folder, config_file, weights = located.source, located.folder, located.config_file, located.weights
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"adapter {source}: cannot read {config_file}: {one_line(e)}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CheckpointError(f"adapter {source} is a {config.get('peft_type')} adapter; only LoRA is supported")
    entries = _lora_entries(_shapes(weights))
    if not entries:
        raise CheckpointError(f"adapter {source}: {weights.name} holds no LoRA weights")
    _check_base(source, config, loaded)
    kind, target, modules = _pick_target(source, entries, loaded,
                                         (config.get("auto_mapping") or {}).get("base_model_class"))
    _check_shapes(source, entries, modules)

    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            # peft calls transformers APIs that warn about their own deprecations: nothing for a user to fix.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            merged = PeftModel.from_pretrained(target, str(folder), is_trainable=False).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot apply adapter {source}: {one_line(e)}") from None
    if kind == "model":
        loaded.model = merged.eval()
    elif merged is not target:  # peft merges into the wrapped module itself; anything else is a surprise
        raise CheckpointError(f"adapter {source}: peft returned a new language model instead of merging in place")
    loaded.model.eval()
    return AdapterRecord(
        source=source, resolved=str(folder), commit=located.commit, applies_to=kind,
        base_model=config.get("base_model_name_or_path"), r=config.get("r"),
        lora_alpha=config.get("lora_alpha"), target_modules=config.get("target_modules"),
        modules=len(entries), files=located.files, sha256=located.sha256,
    )


__all__ = ["LocatedAdapter", "adapter_hash", "apply_adapter", "locate_adapter", "resolve_adapter"]
