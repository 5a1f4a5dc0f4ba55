"""Model families on the exporter side, chosen by config.architectures[0] (base.py says what one provides).

    family = family_for(config)      # -> a ModelFamily: dims, graph specs, vision trace, PyTorch pieces

Each module below registers one family; adding a family is adding its module and its import here (and
its runtime side, attanchor_runtime.families). docs/ARCHITECTURE.md has the checklist.
"""

from . import (
    llava,  # noqa: F401  (registers LlavaForConditionalGeneration)
    qwen2_5_vl,  # noqa: F401  (registers Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)
)
from .base import ModelFamily, SpecialTokens, architecture_of, family_for, register, supported_architectures

__all__ = ["ModelFamily", "SpecialTokens", "architecture_of", "family_for", "register", "supported_architectures"]
