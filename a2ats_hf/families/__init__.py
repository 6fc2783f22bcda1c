"""Architecture families: what A2ATS needs to know about a model beyond what transformers hands its attention.

Keys and queries reach the "a2ats" attention (and calibration) after the model's own projections, norms and RoPE,
whatever their layout (separate or fused projections, q/k norms), and RoPE is undone with the model's own rotary
module. What still differs between families is small: which layers attend globally (sliding-window layers keep
an exact cache of their own), extra arguments of the rotary module, and where the key projection's weight lives.
A family is one :class:`Family` (or subclass) in one small module, registered in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from .base import Family, attention_modules
from .gemma3 import GEMMA3
from .llama import LLAMA
from .phi3 import PHI3

__all__ = ["FAMILIES", "Family", "attention_modules", "family_of"]

FAMILIES: tuple[Family, ...] = (LLAMA, PHI3, GEMMA3)


def family_of(config: Any) -> Family:
    """The family serving ``config.model_type``; NotImplementedError naming the supported ones otherwise."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            family.check(config)
            return family
    supported = ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
    raise NotImplementedError(f"A2ATS does not support model_type={config.model_type!r} yet; supported: {supported}.")


__all__ = ["FAMILIES", "Family", "family_of"]
