"""Model families at run time, chosen by the manifest's family.name (base.py says what one provides).

    family = family_of(manifest)     # -> a RuntimeFamily: preprocessing, prompts, positions

Each module below registers one family; adding a family is adding its module and its import here.
"""

from . import (
    llava,  # noqa: F401  (registers "llava")
    qwen2_5_vl,  # noqa: F401  (registers "qwen2_5_vl")
)
from .base import RuntimeFamily, family_names, family_of, register

__all__ = ["RuntimeFamily", "family_names", "family_of", "register"]
