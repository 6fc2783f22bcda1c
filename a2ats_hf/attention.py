"""The "a2ats" attention function: exact prefill, then retrieval-based decode over an `A2ATSCache`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import kernels
from .cache import A2ATSLayer
from .quantization import lookup_table


def key_validity(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[B, N] bool: which keys the last query may see (False for padding), from a 4D bool or additive mask."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, -length:]
    valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return valid.expand(batch, length)


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
    """Exact sdpa attention when no A2ATSCache is in use or for a prompt; A2ATS retrieval for one decode token."""
    layer: A2ATSLayer | None = getattr(key, "a2ats_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    cache = layer.cache
    rope = cache.bind(module)
    batch, _, length, _ = query.shape
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        start = layer.store.length - length
        position_ids = torch.arange(start, start + length, device=query.device)[None]
    layer.append_codes(key, position_ids, rope)
    scaling = module.scaling if scaling is None else scaling
    if length > 1 or layer.store.length == 1:  # a prompt: exact attention over it
        layer.set_first_tokens(key_validity(attention_mask, batch, layer.store.length, query.device))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer.write_sinks(layer.store.length - 1, layer.store.length)
    valid = key_validity(attention_mask, batch, layer.store.length, query.device)
    out = decode_attention(layer, query[:, :, 0], position_ids, valid, scaling)
    return out.to(query.dtype)[:, None], None


def far_candidates(layer: A2ATSLayer, valid: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: tokens eligible for retrieval (valid, outside each row's sinks and the window)."""
    n = layer.store.length
    cols = torch.arange(n, device=valid.device)
    real = cols[None] - layer.first_token[:, None]  # index among each row's real tokens
    return valid & (cols < n - layer.cache.window) & (real >= layer.cache.sink)


def decode_attention(
    layer: A2ATSLayer, query: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One decode token: exact attention over sinks + window on the device, top-K far tokens from the CPU store.

    query [B, Hq, D] post-RoPE; valid [B, N] key validity. Returns [B, Hq, D] (float32).
    """
    cache, n = layer.cache, layer.store.length
    far = far_candidates(layer, valid)

    sink_cols = layer.first_token[:, None] + torch.arange(cache.sink, device=query.device)
    sink_valid = (sink_cols < n - cache.window) & valid.gather(1, sink_cols.clamp(max=n - 1))
    local_keys = torch.cat([layer.sink_keys, layer.window_keys], dim=2)
    local_values = torch.cat([layer.sink_values, layer.window_values], dim=2)
    local_valid = torch.cat([sink_valid, valid[:, -layer.window_keys.shape[2] :]], dim=1)
    hkv = local_keys.shape[1]
    out, lse = kernels.attention_with_lse(query, local_keys, local_values, local_valid[:, None].expand(-1, hkv, -1), scaling)

    n_far = far.sum(-1)
    k = cache.budget_for(n_far)
    selected = 0
    if int(k.max()) > 0:
        rope = cache.rope
        wrope = rope.windowed_query(query[:, :, None], position_ids[:, -1:].expand(query.shape[0], 1), cache.codebooks.offset)
        group = query.shape[1] // hkv
        lut = lookup_table(wrope[:, :, 0], layer.centroids, group)
        indices, counts = kernels.select_topk(lut, layer.codes, far, k, cache.budget)
        far_out, far_lse = kernels.sparse_attention(query, layer.store, indices, counts, scaling)
        out = kernels.merge_attention(out, lse, far_out.to(out.device), far_lse.to(lse.device))
        selected = int(counts.sum())

    stats = cache.stats
    stats.steps += layer.layer_idx == 0
    stats.far_selected += selected
    stats.far_tokens += int(n_far.sum()) * hkv
    stats.attended += selected + int(local_valid.sum()) * hkv
    stats.past_tokens += int(valid.sum()) * hkv
    return out
