"""What differs between the transformers versions pyproject.toml allows, in one place.

transformers 5.2x renamed the decoders' `past_key_values` argument to `cache` (the old name warns and
goes away in 5.40); earlier versions know only `past_key_values`. Callers pass the KV cache through
`cache_kwargs` and keep using their own DynamicCache object afterwards (it is updated in place), so
neither the argument nor the output field's old name is ever touched on a version that has the new one.
"""

from __future__ import annotations

import functools
import inspect

from attanchor_export.errors import StreamingUnavailable


@functools.cache
def _cache_arg(cls: type) -> str:
    # inspect follows the deprecate_kwarg wrapper (functools.wraps) to the real signature.
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """{"cache": cache} or {"past_key_values": cache}, whichever `module.forward` takes."""
    return {_cache_arg(type(module)): cache}


__all__ = ["cache_kwargs"]


def checkpoint_renamer(model):
    """checkpoint key -> parameter name of `model` (None for a key the model does not have), by the
    renaming rules transformers applies when it loads (e.g. llava-hf's language_model.model.* ->
    model.language_model.*). Raises errors.StreamingUnavailable for a key that needs more than a
    rename (tensors merged or split on load): only a full load reproduces those."""
    state = model.state_dict()  # meta tensors: only the names are used
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):  # another transformers layout: exact names only
        return lambda key: key if key in state else None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str | None:
        name, converted = rename_source_key(key, renamings, converters, prefix, state)
        if converted is not None:
            raise StreamingUnavailable(f"checkpoint tensor {key} is converted on load, not just renamed")
        return name if name in state else None

    return rename


__all__ += ["checkpoint_renamer"]
