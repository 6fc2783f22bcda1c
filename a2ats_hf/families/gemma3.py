"""Gemma 3 (text): sliding-window layers interleaved with global ones. Only the global layers use A2ATS; the
sliding layers keep transformers' exact sliding-window cache. Its rotary module takes the layer type."""

from __future__ import annotations

from typing import Any

from .base import Family


class Gemma3(Family):
    def rope_kwargs(self, config: Any) -> dict:
        return {"layer_type": "full_attention"}


GEMMA3 = Gemma3(name="Gemma 3", model_types=("gemma3_text",))
