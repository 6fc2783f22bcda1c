"""Architecture families: what A2ATS needs to know about a model beyond what transformers hands its attention.

Keys and queries reach the "a2ats" attention (and calibration) after the model's own projections, norms and RoPE,
whatever their layout (separate or fused projections, q/k norms), and RoPE is undone with the model's own rotary
module. What still differs between families is small: which layers attend globally (sliding-window layers keep
an exact cache of their own), extra arguments of the rotary module, and where the key projection's weight lives.
A family is one :class:`Family` (or subclass) in one small module, registered in :data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    """Defaults fit Llama-style decoders: a ``k_proj`` per attention, RoPE by the module's rotary class, every
    layer global unless ``config.layer_types`` marks it ``"sliding_attention"``."""

    name: str
    model_types: tuple[str, ...]

    def retrieval_layers(self, config: Any) -> list[int]:
        """Indices of the layers A2ATS serves: those attending every earlier token."""
        window = getattr(config, "sliding_window", None)
        if window is not None and window >= getattr(config, "max_position_embeddings", float("inf")):
            window = None  # a window as long as the context is no window
        types = getattr(config, "layer_types", None)
        if types is not None:
            return [i for i, kind in enumerate(types) if kind != "sliding_attention" or window is None]
        return [] if window is not None else list(range(config.num_hidden_layers))

    def sliding_window(self, config: Any) -> int | None:
        """The window of the layers A2ATS does not serve (None when it serves them all)."""
        return None if len(self.retrieval_layers(config)) == config.num_hidden_layers else config.sliding_window

    def rope_kwargs(self, config: Any) -> dict:
        """Extra keyword arguments of the rotary module's forward for the retrieval layers."""
        return {}

    def key_weight(self, attention: Any) -> torch.Tensor | None:
        """The key projection's weight (for the weights signature), None where it is not a plain tensor."""
        return getattr(getattr(attention, "k_proj", None), "weight", None)

    def check_prompt(self, config: Any, length: int) -> None:
        """Warn about what a prompt of ``length`` tokens will meet later in generation."""

    def check(self, config: Any) -> None:
        """Raise for configurations A2ATS cannot serve exactly."""
        if getattr(config, "attn_logit_softcapping", None):
            raise NotImplementedError(
                f"{config.model_type} with attn_logit_softcapping={config.attn_logit_softcapping}: A2ATS merges "
                "softmax partials by log-sum-exp, which logit soft-capping does not allow."
            )
        if not self.retrieval_layers(config):
            raise ValueError(
                f"Every layer of this {config.model_type} model attends a sliding window of {config.sliding_window} "
                "tokens, so its cache never grows past the window and A2ATS has nothing to retrieve; use "
                "transformers' DynamicCache."
            )


from .gemma3 import GEMMA3  # noqa: E402
from .llama import LLAMA  # noqa: E402
from .phi3 import PHI3  # noqa: E402

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
