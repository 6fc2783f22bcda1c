"""Triton kernels for the device side of a decode step: attention with its log-sum-exp over the sinks + window
(and, where the K/V stays on the GPU, over the selected far rows too, split over programs as flash-decoding does),
the log-sum-exp combination of partial attentions (the splits, or the GPU's part with the CPU's), and the exact scores
of re-ranking's candidate rows. Each is one
launch where the torch reference takes about nine small operations, and each equals
:mod:`a2ats_hf.kernels.reference` to float rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import FarRows
from .triton_launch import pdl, wait_previous


@triton.jit
def _attend_block(q, k, v, seen, best, total, acc):
    """One block of keys and values [BLOCK_L, D] into the running online softmax (max, sum, output) of the query
    heads q [G_PAD, D] (G_PAD >= 16: tensor-core tiles). Both products are tensor-core dots in float32's accuracy
    (three TF32 products each, ``tf32x3``): plain TF32 rounds to ~1e-3, which 16+ query heads per KV head show."""
    logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="tf32x3")  # [G_PAD, BLOCK_L]
    logits = tl.where(seen[None, :], logits, float("-inf"))
    new_best = tl.maximum(best, tl.max(logits, axis=1))
    shift = tl.where(new_best == float("-inf"), 0.0, new_best)
    keep = tl.exp(best - shift)
    p = tl.exp(logits - shift[:, None])
    acc = acc * keep[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32x3")
    return new_best, total * keep + tl.sum(p, axis=1), acc


@triton.jit
def _attention_lse_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, fk_ptr, fv_ptr, idx_ptr, count_ptr, out_ptr, lse_ptr,
    length, per_split, scaling,
    sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_h, sm_l,
    sfk_b, sfk_h, sfk_l, sfv_b, sfv_h, sfv_l, si_b, si_h, n_rows,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr, FAR: tl.constexpr, PDL: tl.constexpr,
):
    """Program (row, KV head, split): its G query heads over the split's share of the L local keys followed by
    the pair's far rows (positions [split * per_split, (split + 1) * per_split) of that sequence), online
    softmax in float32; writes the split's output and log-sum-exp."""
    wait_previous(PDL)
    pid, split = tl.program_id(0), tl.program_id(1)
    b, h = (pid // HKV).to(tl.int64), (pid % HKV).to(tl.int64)  # offsets past 2**31: a large batch's store
    g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    g_ok, d_ok = g < G, d < D
    heads = h * G + g
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32) * scaling
    best = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    lo = split * per_split
    hi = lo + per_split
    local_hi = tl.minimum(hi, length)
    for l0 in range(lo, local_hi, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        ok = cols < local_hi
        seen = tl.load(valid_ptr + b * sm_b + h * sm_h + cols * sm_l, mask=ok, other=0) != 0
        tile = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_l + d[None, :], mask=tile, other=0.0)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_l + d[None, :], mask=tile, other=0.0)
        best, total, acc = _attend_block(q, k, v, seen, best, total, acc)
    if FAR:
        far_hi = tl.minimum(hi - length, tl.load(count_ptr + pid))
        for j0 in range(tl.maximum(lo - length, 0), far_hi, BLOCK_L):
            j = j0 + tl.arange(0, BLOCK_L)
            ok = j < far_hi
            rows = tl.load(idx_ptr + b * si_b + h * si_h + j, mask=ok, other=0).to(tl.int64)
            tile = ok[:, None] & d_ok[None, :]
            k = tl.load(fk_ptr + b * sfk_b + h * sfk_h + rows[:, None] * sfk_l + d[None, :], mask=tile, other=0.0)
            v = tl.load(fv_ptr + b * sfv_b + h * sfv_h + rows[:, None] * sfv_l + d[None, :], mask=tile, other=0.0)
            best, total, acc = _attend_block(q, k, v, ok, best, total, acc)
    seen_any = total > 0
    out = acc / tl.where(seen_any, total, 1.0)[:, None]
    lse = tl.where(seen_any, best + tl.log(tl.where(seen_any, total, 1.0)), float("-inf"))
    row = split * n_rows + b * HKV * G + heads  # in the [splits, B * Hq] parts
    tl.store(out_ptr + row[:, None] * D + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + row, lse, mask=g_ok)


BLOCK_KEYS = 32  # keys per tensor-core tile
PROGRAMS_PER_UNIT = 8  # programs in flight per multiprocessor: each waits on its gathered rows most of the time
MIN_SPLIT_KEYS = 128  # keys a program attends at least (fewer: the combine costs more than the split saves)
WARPS = 4


def _split_count(pairs: int, positions: int, device: torch.device) -> int:
    """How many programs share one (row, KV head)'s keys: enough to keep ``PROGRAMS_PER_UNIT`` in flight per
    multiprocessor, at least ``MIN_SPLIT_KEYS`` keys each."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(PROGRAMS_PER_UNIT * units, pairs), triton.cdiv(positions, MIN_SPLIT_KEYS)))


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float,
    far: FarRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`a2ats_hf.kernels.reference.attention_with_lse`: query [B, Hq, D]; keys/values
    [B, Hkv, L, D] (any strides but the last); valid [B, Hkv, L] bool (an expanded view is fine). With ``far``,
    the far rows are attended too (:func:`a2ats_hf.kernels.reference.local_and_far_attention`). Returns out
    [B, Hq, D] and lse [B, Hq], float32."""
    b, hq, d = query.shape
    hkv, length = keys.shape[1], keys.shape[2]
    group = hq // hkv
    query, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys, values))
    g_pad, d_pad = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(d))
    block = BLOCK_KEYS
    if far is None:
        far_keys = far_values = keys
        indices = counts = valid  # not read
        width = 0
    else:
        far_keys, far_values = far.store.keys, far.store.values
        indices, counts = far.indices, far.counts.to(torch.int32).contiguous()
        width = indices.shape[-1]
    splits = _split_count(b * hkv, length + width, query.device)
    per_split = triton.cdiv(triton.cdiv(length + width, splits), block) * block
    parts = torch.empty(splits, b, hq, d, dtype=torch.float32, device=query.device)
    parts_lse = torch.empty(splits, b, hq, dtype=torch.float32, device=query.device)
    _attention_lse_kernel[(b * hkv, splits)](
        query, keys, values, valid, far_keys, far_values, indices, counts, parts, parts_lse,
        length, per_split, float(scaling),
        query.stride(0), query.stride(1), *keys.stride()[:3], *values.stride()[:3], *valid.stride(),
        *far_keys.stride()[:3], *far_values.stride()[:3], *indices.stride()[:2], b * hq,
        HKV=hkv, G=group, G_PAD=g_pad, D=d, D_PAD=d_pad, BLOCK_L=block, FAR=far is not None, num_warps=WARPS,
        **pdl(query.device),
    )
    if splits == 1:
        return parts[0], parts_lse[0]
    return combine(parts, parts_lse)


@triton.jit
def _combine_kernel(parts_ptr, parts_lse_ptr, extra_ptr, extra_lse_ptr, out_ptr, lse_ptr, rows, splits,
                    D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, EXTRA: tl.constexpr):
    """Program (row, head): the parts' outputs weighted by their share of the combined softmax mass."""
    row = tl.program_id(0)
    s, d = tl.arange(0, S_PAD), tl.arange(0, D_PAD)
    s_ok, d_ok = s < splits, d < D
    lse = tl.load(parts_lse_ptr + s * rows + row, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    if EXTRA:
        extra_lse = tl.load(extra_lse_ptr + row)
        top = tl.maximum(top, extra_lse)
    shift = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - shift)
    parts = tl.load(parts_ptr + (s[:, None] * rows + row) * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0)
    acc = tl.sum(parts.to(tl.float32) * w[:, None], axis=0)
    norm = tl.sum(w, axis=0)
    if EXTRA:
        we = tl.exp(extra_lse - shift)
        acc += tl.load(extra_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32) * we
        norm += we
    tl.store(out_ptr + row * D + d, acc / tl.where(norm > 0, norm, 1.0), mask=d_ok)
    tl.store(lse_ptr + row, tl.where(norm > 0, shift + tl.log(tl.where(norm > 0, norm, 1.0)), float("-inf")))


def combine(
    parts: torch.Tensor, parts_lse: torch.Tensor, extra: torch.Tensor | None = None,
    extra_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attentions over disjoint key sets, ``parts`` [S, B, H, D] with ``parts_lse`` [S, B, H] (and one more,
    ``extra`` [B, H, D] with ``extra_lse``), combined into one: out [B, H, D], lse [B, H] (float32)."""
    splits, d = parts.shape[0], parts.shape[-1]
    parts, parts_lse = parts.float().contiguous(), parts_lse.float().contiguous()
    out = torch.empty(parts.shape[1:], dtype=torch.float32, device=parts.device)
    lse = torch.empty(parts_lse.shape[1:], dtype=torch.float32, device=parts.device)
    if extra is not None:
        extra, extra_lse = extra.float().contiguous(), extra_lse.float().contiguous()
    _combine_kernel[(lse.numel(),)](
        parts, parts_lse, parts if extra is None else extra, parts_lse if extra is None else extra_lse, out, lse,
        lse.numel(), splits, D=d, D_PAD=triton.next_power_of_2(d), S_PAD=triton.next_power_of_2(splits),
        EXTRA=extra is not None,
    )
    return out, lse


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Same contract as :func:`a2ats_hf.kernels.reference.merge_attention` (out [B, H, D], lse [B, H])."""
    return combine(out_a[None], lse_a[None], out_b, lse_b)[0]


@triton.jit
def _gather_chosen_kernel(idx_ptr, count_ptr, chosen_ptr, chosen_count_ptr, out_ptr, kept_ptr, c, k,
                          BLOCK: tl.constexpr):
    """Program (row-KV head pair, block of K): the chosen positions' candidate rows, 0 past the kept count."""
    pair, block = tl.program_id(0), tl.program_id(1)
    kept = tl.minimum(tl.load(chosen_count_ptr + pair), tl.load(count_ptr + pair))
    j = block * BLOCK + tl.arange(0, BLOCK)
    take = j < kept
    position = tl.load(chosen_ptr + pair.to(tl.int64) * k + j, mask=take, other=0)
    row = tl.load(idx_ptr + pair.to(tl.int64) * c + position, mask=take, other=0)
    tl.store(out_ptr + pair.to(tl.int64) * k + j, row, mask=j < k)
    if block == 0:
        tl.store(kept_ptr + pair, kept)


GATHER_BLOCK = 1024  # chosen positions per program of gather_chosen


def gather_chosen(
    indices: torch.Tensor, counts: torch.Tensor, chosen: torch.Tensor, chosen_counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`a2ats_hf.kernels.reference.gather_chosen`, in one launch."""
    b, hkv, k = chosen.shape
    indices, chosen = indices.contiguous(), chosen.contiguous()
    out = torch.empty(b, hkv, k, dtype=indices.dtype, device=indices.device)
    kept = torch.empty(b, hkv, dtype=torch.int32, device=indices.device)
    _gather_chosen_kernel[(b * hkv, triton.cdiv(k, GATHER_BLOCK))](
        indices, counts.to(torch.int32).contiguous(), chosen, chosen_counts.to(torch.int32).contiguous(), out, kept,
        indices.shape[-1], k, BLOCK=GATHER_BLOCK,
    )
    return out, kept
