"""`Family`, the defaults every architecture family starts from, and what finds a model's attention modules."""

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


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention modules in layer order (modules with a ``layer_idx`` and a ``config``), whatever
    the family calls them."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")
             and type(m).__name__.endswith("Attention")]
    return sorted(found, key=lambda m: m.layer_idx)
