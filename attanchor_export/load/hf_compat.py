"""What differs between the transformers versions pyproject.toml allows, in one place.

transformers 5.2x renamed the decoders' `past_key_values` argument to `cache` (the old name warns and
goes away in 5.40); earlier versions know only `past_key_values`. Callers pass the KV cache through
`cache_kwargs` and keep using their own DynamicCache object afterwards (it is updated in place), so
neither the argument nor the output field's old name is ever touched on a version that has the new one.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_arg(cls: type) -> str:
    # inspect follows the deprecate_kwarg wrapper (functools.wraps) to the real signature.
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """{"cache": cache} or {"past_key_values": cache}, whichever `module.forward` takes."""
    return {_cache_arg(type(module)): cache}


__all__ = ["cache_kwargs"]
