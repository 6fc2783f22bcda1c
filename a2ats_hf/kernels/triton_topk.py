"""Triton top-K selection over codes: one program per (row, KV head), the codes read once.

Scores take only ``M`` distinct values per head (one per centroid), so the K-th largest score comes from the
histogram of the candidates' codes and the LUT alone: a 32-step bisection on the scores' order-preserving
integer keys, weighted by the histogram, without touching the codes. One scan of the codes then keeps every
candidate scoring above that threshold and, among those equal to it, the lowest token indices until K, unites
the selections of the KV group's query heads and writes the chosen indices compacted and ascending. The result
equals :func:`a2ats_hf.kernels.reference.select_topk` exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import code_histogram


@triton.jit
def _order_key(values):
    """float32 -> uint32 whose unsigned order is the floats' order."""
    bits = values.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, ~bits, bits | -2147483648)
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _select_kernel(
    lut_ptr, codes_ptr, cand_ptr, hist_ptr, k_ptr, out_ptr, count_ptr,
    n, m, stride_cb, stride_ch, stride_mb, out_width,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // HKV
    kvh = pid % HKV
    k = tl.load(k_ptr + row).to(tl.int32)
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    lut_rows = lut_ptr + (pid * G + g).to(tl.int64) * m  # [G_PAD]: this KV head's query heads (or its summed head)
    hist_row = hist_ptr + pid.to(tl.int64) * m

    # threshold[g]: the largest key T with #{candidates with key >= T} >= k, i.e. the k-th largest score.
    threshold = tl.zeros([G_PAD], dtype=tl.uint32)
    for i in range(32):
        trial = threshold | (tl.full([G_PAD], 1, dtype=tl.uint32) << (31 - i))
        above = tl.zeros([G_PAD], dtype=tl.int32)
        for m0 in range(0, m, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            c_ok = cols < m
            count = tl.load(hist_row + cols, mask=c_ok, other=0)
            vals = tl.load(lut_rows[:, None] + cols[None, :], mask=g_ok[:, None] & c_ok[None, :], other=0.0)
            above += tl.sum(tl.where(_order_key(vals) >= trial[:, None], count[None, :], 0), axis=1)
        threshold = tl.where(above >= k, trial, threshold)
    greater = tl.zeros([G_PAD], dtype=tl.int32)
    for m0 in range(0, m, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        c_ok = cols < m
        count = tl.load(hist_row + cols, mask=c_ok, other=0)
        vals = tl.load(lut_rows[:, None] + cols[None, :], mask=g_ok[:, None] & c_ok[None, :], other=0.0)
        greater += tl.sum(tl.where(_order_key(vals) > threshold[:, None], count[None, :], 0), axis=1)
    need = k - greater  # how many of the tokens scoring exactly the threshold each head still takes
    active = g_ok & ((g * 0 + k) > 0)

    ties_seen = tl.zeros([G_PAD], dtype=tl.int32)
    total = tl.zeros([1], dtype=tl.int32)
    codes_row = codes_ptr + row.to(tl.int64) * stride_cb + kvh.to(tl.int64) * stride_ch
    out_row = out_ptr + pid.to(tl.int64) * out_width
    for n0 in range(0, n, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        t_ok = tokens < n
        code = tl.load(codes_row + tokens, mask=t_ok, other=0).to(tl.int32)
        cand = (tl.load(cand_ptr + row.to(tl.int64) * stride_mb + tokens, mask=t_ok, other=0) != 0) & t_ok
        live = active[:, None] & cand[None, :]
        key = _order_key(tl.load(lut_rows[:, None] + code[None, :], mask=live, other=0.0))
        tie = (live & (key == threshold[:, None])).to(tl.int32)
        rank = tl.cumsum(tie, axis=1) - tie + ties_seen[:, None]
        chosen = live & ((key > threshold[:, None]) | ((tie != 0) & (rank < need[:, None])))
        ties_seen += tl.sum(tie, axis=1)
        union = tl.max(chosen.to(tl.int32), axis=0)  # [BLOCK_N]
        slot = tl.cumsum(union, axis=0) - union + tl.sum(total, axis=0)
        tl.store(out_row + slot, tokens, mask=union != 0)
        total += tl.sum(union, axis=0)
    tl.store(count_ptr + pid + tl.arange(0, 1), total)


def select_topk(
    lut: torch.Tensor,
    codes: torch.Tensor,
    candidates: torch.Tensor,
    k: torch.Tensor,
    budget: str = "query_head",
    histogram: torch.Tensor | None = None,
    k_max: int | None = None,
    block_n: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the torch reference, with int32 indices [B, Hkv, W] (W = an upper bound on the counts,
    entries past each count are 0) and int32 counts [B, Hkv].

    ``codes`` may be a view [B, Hkv, N] of a longer buffer; ``histogram`` [B, Hkv, M] int32 counts each KV head's
    candidate codes (:func:`code_histogram`), computed here when not given (a cache keeps it up to date instead);
    ``k_max`` bounds ``k`` from the host, read from ``k`` (a device sync) when not given.
    """
    b, hkv, n = codes.shape
    if budget == "kv_head":
        lut = lut.view(b, hkv, -1, lut.shape[-1]).sum(2)
    elif budget != "query_head":
        raise ValueError(f"budget must be 'query_head' or 'kv_head', got {budget!r}")
    lut = lut.float().contiguous()
    m = lut.shape[-1]
    group = lut.shape[1] // hkv
    if histogram is None:
        histogram = code_histogram(codes, candidates, m)
    if k_max is None:
        k_max = int(k.max()) if k.numel() else 0
    width = max(1, min(group * k_max, n))
    indices = torch.zeros(b, hkv, width, dtype=torch.int32, device=codes.device)
    counts = torch.empty(b, hkv, dtype=torch.int32, device=codes.device)
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    cand = candidates.to(torch.uint8)
    _select_kernel[(b * hkv,)](
        lut, codes, cand, histogram.to(torch.int32).contiguous(), k.contiguous(), indices, counts,
        n, m, codes.stride(0), codes.stride(1), cand.stride(0), width,
        HKV=hkv, G=group, G_PAD=triton.next_power_of_2(group), BLOCK_M=min(triton.next_power_of_2(m), 1024),
        BLOCK_N=block_n,
    )
    return indices, counts

