"""Triton kernels for the device side of a decode step: attention with its log-sum-exp over the sinks + window, and
the log-sum-exp merge with the CPU's part. Each is one launch where the torch reference takes about nine small
operations (a kernel launch each on a GPU), and each equals :mod:`a2ats_hf.kernels.reference` to float rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_lse_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, lse_ptr, length, scaling,
    sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_h, sm_l,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program (row, KV head): its G query heads over the L keys, online softmax in float32."""
    pid = tl.program_id(0)
    b, h = pid // HKV, pid % HKV
    g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    g_ok, d_ok = g < G, d < D
    heads = h * G + g
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32) * scaling
    best = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for l0 in range(0, length, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        ok = cols < length
        seen = tl.load(valid_ptr + b * sm_b + h * sm_h + cols * sm_l, mask=ok, other=0) != 0
        tile = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_l + d[None, :], mask=tile, other=0.0)
        logits = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [G, BLOCK_L]
        logits = tl.where(seen[None, :], logits, float("-inf"))
        new_best = tl.maximum(best, tl.max(logits, axis=1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        keep = tl.exp(best - shift)
        p = tl.exp(logits - shift[:, None])
        v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_l + d[None, :], mask=tile, other=0.0)
        acc = acc * keep[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        total = total * keep + tl.sum(p, axis=1)
        best = new_best
    seen_any = total > 0
    out = acc / tl.where(seen_any, total, 1.0)[:, None]
    lse = tl.where(seen_any, best + tl.log(tl.where(seen_any, total, 1.0)), float("-inf"))
    tl.store(out_ptr + (b * HKV * G + heads[:, None]) * D + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * HKV * G + heads, lse, mask=g_ok)


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`a2ats_hf.kernels.reference.attention_with_lse`: query [B, Hq, D]; keys/values
    [B, Hkv, L, D] (any strides but the last); valid [B, Hkv, L] bool (an expanded view is fine). Returns out
    [B, Hq, D] and lse [B, Hq], float32."""
    b, hq, d = query.shape
    hkv, length = keys.shape[1], keys.shape[2]
    group = hq // hkv
    query, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys, values))
    out = torch.empty(b, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=query.device)
    g_pad, d_pad = triton.next_power_of_2(group), triton.next_power_of_2(d)
    block = max(1, min(32, 8192 // (g_pad * d_pad)))
    _attention_lse_kernel[(b * hkv,)](
        query, keys, values, valid, out, lse, length, float(scaling),
        query.stride(0), query.stride(1), *keys.stride()[:3], *values.stride()[:3], *valid.stride(),
        HKV=hkv, G=group, G_PAD=g_pad, D=d, D_PAD=d_pad, BLOCK_L=triton.next_power_of_2(block),
    )
    return out, lse


@triton.jit
def _merge_kernel(out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, D: tl.constexpr, D_PAD: tl.constexpr):
    """Program (row, head): both parts' outputs weighted by their share of the combined softmax mass."""
    row = tl.program_id(0)
    d = tl.arange(0, D_PAD)
    ok = d < D
    lse_a, lse_b = tl.load(lse_a_ptr + row), tl.load(lse_b_ptr + row)
    top = tl.maximum(lse_a, lse_b)
    shift = tl.where(top == float("-inf"), 0.0, top)
    wa, wb = tl.exp(lse_a - shift), tl.exp(lse_b - shift)
    norm = tl.where(wa + wb > 0, wa + wb, 1.0)
    a = tl.load(out_a_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(out_b_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + d, (a * wa + b * wb) / norm, mask=ok)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Same contract as :func:`a2ats_hf.kernels.reference.merge_attention` (out [B, H, D], lse [B, H])."""
    out_a, lse_a, out_b, lse_b = (t.float().contiguous() for t in (out_a, lse_a, out_b, lse_b))
    out = torch.empty_like(out_a)
    d = out_a.shape[-1]
    _merge_kernel[(lse_a.numel(),)](out_a, lse_a, out_b, lse_b, out, D=d, D_PAD=triton.next_power_of_2(d))
    return out
