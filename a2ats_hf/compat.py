"""What differs between the transformers versions a2ats-hf supports, for callers of a model."""

from __future__ import annotations

import inspect

from torch import nn
from transformers.cache_utils import Cache


def cache_argument(model: nn.Module, cache: Cache) -> dict[str, Cache]:
    """``{name: cache}`` to pass to ``model(...)`` or ``model.generate(...)`` under the name the model takes:
    transformers renamed ``past_key_values`` to ``cache`` (the old name warns, then goes: from forward in 5.40)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
