"""Phi-3 / 3.5 / 4-mini: one fused qkv projection, longrope (its rotation switches with the sequence length) and,
on Phi-4-mini, partial rotary dimensions; both are handled by :mod:`a2ats_hf.rope`."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .base import Family


class Phi3(Family):
    def key_weight(self, attention: Any) -> torch.Tensor | None:
        """The key rows of the fused ``qkv_proj`` weight: [queries | keys | values]."""
        config = attention.config
        q_rows = config.num_attention_heads * attention.head_dim
        return attention.qkv_proj.weight[q_rows : q_rows + config.num_key_value_heads * attention.head_dim]

    def check_prompt(self, config: Any, length: int) -> None:
        switch = getattr(config, "original_max_position_embeddings", None)
        if switch and config.rope_parameters.get("rope_type") == "longrope" and length <= switch:
            warnings.warn(
                f"A prompt of {length} tokens on this longrope model: when generation first passes {switch} tokens, "
                "transformers drops the cache to recompute it with the long-context RoPE, and decoding goes on with "
                f"its own DynamicCache, without A2ATS. Prompts longer than {switch} tokens keep the A2ATSCache.",
                stacklevel=2,
            )


PHI3 = Phi3(name="Phi-3", model_types=("phi3",))
