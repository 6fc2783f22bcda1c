"""The "a2ats" attention function: exact prefill, then retrieval-based decode over an `A2ATSCache` (one step of
which :mod:`a2ats_hf.step` holds)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import step
from .cache import stored_by
from .families import family_of
from .step import key_validity


def a2ats_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Exact sdpa attention when no A2ATSCache is in use or for a prompt (or a chunk of one, attending every
    earlier token); A2ATS retrieval for one decode token."""
    layer = stored_by(key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return cached_attention(layer, module, query, key, value, attention_mask, scaling, dropout, **kwargs)


@torch.compiler.disable
def cached_attention(layer, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None, dropout: float,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """The attention of an A2ATS layer: its codes and store's bookkeeping, then exact attention over a prompt or
    retrieval for a decode token. Never traced by torch.compile (it runs its own kernels and host-side logic
    between the compiled pieces; a captured step is :mod:`a2ats_hf.graphs`' job)."""
    layer.awaiting_attention = False
    rope = layer.cache.bind(module)
    if layer.first:
        layer.cache.pass_memo.clear()
    batch, _, length, _ = query.shape
    n = layer.store.length
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(n - length, n, device=query.device)[None]
    layer.append_codes(key, position_ids, rope)
    scaling = module.scaling if scaling is None else scaling
    if length == 1 and n > 1:
        masks = step.step_masks(layer, attention_mask)
        out = step.decode_attention(layer, query[:, :, 0], key, value, position_ids, masks, scaling)
        return out.to(query.dtype)[:, None], None
    if n > length:  # a later chunk: earlier tokens' K/V come back from the CPU for this layer only
        past_keys, past_values = layer.store.to_tensors(end=n - length)
        key = torch.cat([past_keys.to(key.device, non_blocking=True), key], dim=2)
        value = torch.cat([past_values.to(value.device, non_blocking=True), value], dim=2)
    valid = key_validity(attention_mask, batch, n, query.device)
    if layer.first:
        layer.cache.record_validity(valid)
    layer.set_first_tokens(valid, key, value)
    if layer.first and n == length:
        family_of(module.config).check_prompt(module.config, n)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
