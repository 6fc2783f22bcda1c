"""Llama-style decoders: separate q/k/v projections, full RoPE or rope scaling (llama3, linear, dynamic, yarn).

Qwen3's q/k norms sit before RoPE and need nothing here: the keys the attention receives are already normed.
"""

from .base import Family

LLAMA = Family(name="Llama-style", model_types=("llama", "mistral", "qwen2", "qwen3"))
