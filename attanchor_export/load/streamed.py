"""Load a checkpoint without holding its decoder: the decoder layers and lm_head stay on the meta device.

The export's memory used to be the whole model in fp32 (and then some). Here only the small parts
(vision tower, projector, token embeddings, final norm) are materialised in fp32; every parameter of
the decoder layers and the lm_head stays a shapeless meta tensor whose values live in the safetensors
shards (memory-mapped, read one tensor at a time by `WeightStore`). Two consumers read them:

- tracing (trace/torch_onnx.py): the decoder is traced on the meta device, and each graph initializer
  becomes a lazy tensor that reads its checkpoint tensor when the external data file is written;
- PyTorch runs (parity reference, gate reference, threshold calibration): `LayerStreamer` hooks load
  one decoder layer's weights (as fp32) right before the layer runs and drop them right after, so a
  full-depth fp32 forward holds one layer at a time. Same modules, same math as the loaded model.

Checkpoint keys are mapped to parameter names with transformers' own renaming rules (hf_compat), so a
Hub checkpoint saved under older names (llava-hf: language_model.model.layers...) streams too. Where a
checkpoint needs more than renaming (tensors merged or split on load), or has no safetensors, the
caller falls back to a full load (`StreamingUnavailable` says why).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from attanchor_export.errors import CheckpointError, StreamingUnavailable
from attanchor_export.load.hf_compat import checkpoint_renamer


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """CheckpointError naming `name` when the tensor holds NaN or Inf: a damaged checkpoint must not
    become an artifact that answers (wrongly) whenever the bad row is used."""
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return
    # aminmax propagates NaN and shows Inf, at a fraction of isfinite's cost (0.1-0.3 s/GiB against 7-16
    # here): the scan of a 7B checkpoint costs seconds, not minutes. isfinite only to name the first.
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    finite = torch.isfinite(tensor)
    bad = int((~finite).sum())
    first = [int(i) for i in (~finite).nonzero()[0]]
    raise CheckpointError(f"the checkpoint is damaged: tensor {name} holds {bad} NaN/Inf value(s), the first at "
                          f"index {first}; nothing was exported")


_TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class WeightStore:
    """Checkpoint tensors by model parameter name, read one at a time from the safetensors shards.

    Read with plain file reads at the offsets the shard header gives, not through safetensors' memory
    map: every page of a mapped file that was touched counts in the process's resident set for as long
    as the map is open, so reading a 14 GB checkpoint through maps would show as 14 GB of RSS (and
    could be what pushes a 24 GB machine into reclaim). Read, each tensor's bytes exist once, briefly.
    """

    def __init__(self, where: dict[str, tuple[Path, int, int]], shapes: dict[str, tuple], dtypes: dict[str, str]):
        self._where = where  # parameter name -> (shard, start, end): the tensor's bytes in its shard
        self.shapes = shapes
        self.dtypes = dtypes  # as safetensors names them: F16, BF16, F32
        self._checked: set[str] = set()  # names already checked for NaN/Inf (on their first read)

    @classmethod
    def open(cls, folder: Path, rename) -> WeightStore:
        """Index every *.safetensors shard of `folder`; `rename(key) -> parameter name or None`."""
        where, shapes, dtypes = {}, {}, {}
        shards = sorted(Path(folder).glob("*.safetensors"))
        if not shards:
            raise StreamingUnavailable("the checkpoint has no safetensors weights")
        for shard in shards:
            start, header = _header(shard)
            for key, info in header.items():
                name = rename(key)
                if name is None:
                    continue
                if info["dtype"] not in _TORCH_DTYPES:
                    raise StreamingUnavailable(f"tensor {key} has dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                where[name] = (shard, start + begin, start + end)
                shapes[name] = tuple(info["shape"])
                dtypes[name] = info["dtype"]
        return cls(where, shapes, dtypes)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        sizes = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
        return sum(int(np.prod(self.shapes[n])) * sizes.get(self.dtypes[n], 4) for n in (names or self._where))

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor as `dtype` (nothing else is read); the first read of each is checked for NaN/Inf."""
        shard, begin, end = self._where[name]
        raw = bytearray(end - begin)
        with open(shard, "rb") as f:
            f.seek(begin)
            if f.readinto(raw) != len(raw):
                raise CheckpointError(f"{shard} is truncated: tensor {name} ends past the end of the file")
        stored = torch.frombuffer(raw, dtype=_TORCH_DTYPES[self.dtypes[name]]) if raw else \
            torch.empty(0, dtype=_TORCH_DTYPES[self.dtypes[name]])
        stored = stored.reshape(self.shapes[name])
        if name not in self._checked:
            check_finite(stored, name)
            self._checked.add(name)
        return stored.to(dtype)

    def numpy(self, name: str) -> np.ndarray:
        return self.tensor(name, torch.float32).numpy()


def _header(shard: Path) -> tuple[int, dict]:
    """(offset of the data section, {key: dtype, shape, data_offsets}) of a safetensors file."""
    try:
        with open(shard, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{shard} is not a readable safetensors file: {e}") from None
    header.pop("__metadata__", None)
    return 8 + size, header


def build_on_meta(model_class, config) -> torch.nn.Module:
    """The model with every parameter on the meta device and every buffer real (non-persistent buffers,
    e.g. the rotary inv_freq and CLIP's position ids, are computed at construction and not in the file)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(config, dtype=torch.float32)
    _retie(model)  # tied heads share the embedding's parameter, as from_pretrained leaves them
    model.eval()
    return model


def parameter_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in `model` (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


class StreamedModel:
    """A model whose meta parameters are read from a WeightStore: materialise some for good, stream others."""

    def __init__(self, model: torch.nn.Module, store: WeightStore):
        self.model, self.store = model, store
        self._key = {}  # id(meta parameter) -> its name in the store
        missing = []
        for pid, names in parameter_names(model).items():
            found = next((n for n in names if n in store), None)
            if found is None:
                missing.append(names[0])
            else:
                self._key[pid] = found
        if missing:
            raise CheckpointError(f"the checkpoint has no tensor for {len(missing)} parameters, e.g. {missing[0]}")
        self.streamer: LayerStreamer | None = None

    def key(self, parameter) -> str:
        return self._key[id(parameter)]

    def fill(self, module: torch.nn.Module, keep: set[int] = frozenset()) -> list:
        """Give the meta parameters of `module` (except those whose id is in `keep`) their fp32 values;
        returns (submodule, name, meta parameter) for each, to put back with `empty`."""
        swapped = []
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_meta and id(p) not in keep:
                    sub._parameters[name] = torch.nn.Parameter(self.store.tensor(self.key(p)), requires_grad=False)
                    swapped.append((sub, name, p))
        return swapped

    @staticmethod
    def empty(swapped: list) -> None:
        for sub, name, meta in swapped:
            sub._parameters[name] = meta

    def materialize(self, keep: set[int] = frozenset()) -> None:
        """Give every meta parameter its fp32 value for good, except those whose id is in `keep`."""
        for sub, name, meta in self.fill(self.model, keep):
            self._key[id(sub._parameters[name])] = self.key(meta)  # key() answers for the real one too
        _retie(self.model)

    def stream(self, modules: list[torch.nn.Module]) -> LayerStreamer:
        self.streamer = LayerStreamer(self, modules)
        return self.streamer

    @property
    def streamed_bytes(self) -> int:
        """Checkpoint bytes of the parameters that stay on disk (what a full load would have held)."""
        return self.store.nbytes({self.key(p) for p in self.model.parameters() if p.is_meta})


def load_streamed(model_class, config, folder: Path, streamed_modules) -> StreamedModel:
    """Build `model_class` on meta, index `folder`'s shards, materialise everything but the parameters
    only `streamed_modules(model)` use, and hook those modules to stream their weights."""

    model = build_on_meta(model_class, config)
    streamed = StreamedModel(model, WeightStore.open(folder, checkpoint_renamer(model)))
    modules = list(streamed_modules(model))
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    prefixes = tuple(names[id(m)] + "." for m in modules)
    outside = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(prefixes)}
    keep = {id(p) for m in modules for p in m.parameters()} - outside
    streamed.materialize(keep)
    streamed.stream(modules)
    return streamed


def _retie(model) -> None:
    # tie_weights() points lm_head at the (now real) embedding again, where the config ties them.
    if hasattr(model, "tie_weights"):
        model.tie_weights()


class LayerStreamer:
    """Forward hooks: a module's meta parameters get their fp32 values just before it runs and lose them
    right after, so one module's weights (a decoder layer, the lm_head) are in memory at a time."""

    def __init__(self, streamed: StreamedModel, modules: list[torch.nn.Module]):
        self.streamed = streamed
        self.enabled = True
        self._loaded: dict[int, list] = {}
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._load))
            self.handles.append(m.register_forward_hook(self._release))

    def _load(self, module, args):
        if self.enabled:
            self._loaded[id(module)] = self.streamed.fill(module)

    def _release(self, module, args, output):
        self.streamed.empty(self._loaded.pop(id(module), []))

    @contextmanager
    def paused(self):
        """No loading (while tracing: the tracer must see the meta parameters, not values)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled


@contextmanager
def on_meta(module: torch.nn.Module):
    """Every parameter and buffer of `module` on the meta device for the duration (tracing without
    values); yields {name: the original tensor} by every name, real or meta, restored afterwards."""
    originals = {n: t for n, t in module.named_parameters(remove_duplicate=False)}
    originals.update({n: t for n, t in module.named_buffers(remove_duplicate=False)})
    swapped = []
    metas: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in list(table.items()):
                if t is None or t.is_meta:
                    continue
                meta = metas.get(id(t))
                if meta is None:
                    meta = t.to("meta")
                    if isinstance(t, torch.nn.Parameter):
                        meta = torch.nn.Parameter(meta, requires_grad=False)
                    metas[id(t)] = meta
                table[name] = meta
                swapped.append((table, name, t))
    try:
        yield originals
    finally:
        for table, name, t in swapped:
            table[name] = t


__all__ = ["LayerStreamer", "StreamedModel", "WeightStore", "build_on_meta", "check_finite", "load_streamed",
           "on_meta"]
