"""Triton kernels for the row cache (:mod:`a2ats_hf.rowcache`): a selection split into the rows the slots hold and
the rows they lack, and the misses brought into the slots picked longest ago. One launch each, one program per
(row, KV head), where the torch references (:func:`a2ats_hf.kernels.reference.split_rows`,
:func:`~a2ats_hf.kernels.reference.fill_rows`) take ~25 launches, a sort and a top-K; every offloaded layer runs
both each step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import AGE_CAP

BLOCK = 1024  # selected rows or slots a program handles at a time


@triton.jit
def _split_kernel(slot_ptr, stamp_ptr, sought_ptr, found_ptr, idx_ptr, counts_ptr, hit_ptr, hit_counts_ptr,
                  miss_ptr, miss_counts_ptr, now_ptr, now, K, s_slot_b, s_slot_h, s_stamp_b, s_stamp_h, s_idx_b,
                  s_idx_h, s_tally_b, s_tally_h,
                  H: tl.constexpr, BLOCK: tl.constexpr, NOW_ON_DEVICE: tl.constexpr):
    """Program (row, KV head): the selection's held rows compacted into the hit slots (stamped ``now``), the others
    into the misses, both in the selection's order, zeros past them."""
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    now = tl.load(now_ptr).to(tl.int64) if NOW_ON_DEVICE else tl.full([], 0, tl.int64) + now
    count = tl.load(counts_ptr + pid).to(tl.int32)
    slot_row = slot_ptr + b * s_slot_b + h * s_slot_h
    stamp_row = stamp_ptr + b * s_stamp_b + h * s_stamp_h
    out = b * s_idx_b + h * s_idx_h
    hits = count * 0
    misses = count * 0
    for start in range(0, K, BLOCK):
        col = start + tl.arange(0, BLOCK)
        valid = col < count
        idx = tl.load(idx_ptr + out + col, mask=valid, other=0)
        held = tl.load(slot_row + idx, mask=valid, other=-1)
        hit = valid & (held >= 0)
        miss = valid & (held < 0)
        hit_at = hits + tl.cumsum(hit.to(tl.int32), 0) - 1
        miss_at = misses + tl.cumsum(miss.to(tl.int32), 0) - 1
        tl.store(hit_ptr + out + hit_at, held, mask=hit)
        tl.store(miss_ptr + out + miss_at, idx, mask=miss)
        tl.store(stamp_row + held, tl.zeros([BLOCK], tl.int64) + now, mask=hit)
        hits += tl.sum(hit.to(tl.int32), 0)
        misses += tl.sum(miss.to(tl.int32), 0)
    for start in range(0, K, BLOCK):
        col = start + tl.arange(0, BLOCK)
        tl.store(hit_ptr + out + col, tl.zeros([BLOCK], tl.int32), mask=(col >= hits) & (col < K))
        tl.store(miss_ptr + out + col, tl.zeros([BLOCK], tl.int32).to(miss_ptr.dtype.element_ty),
                 mask=(col >= misses) & (col < K))
    tl.store(hit_counts_ptr + pid, hits.to(hit_counts_ptr.dtype.element_ty))
    tl.store(miss_counts_ptr + pid, misses.to(miss_counts_ptr.dtype.element_ty))
    tally = b * s_tally_b + h * s_tally_h
    tl.store(sought_ptr + tally, tl.load(sought_ptr + tally) + count)
    tl.store(found_ptr + tally, tl.load(found_ptr + tally) + hits)


def split_rows(
    slot: torch.Tensor, stamp: torch.Tensor, sought: torch.Tensor, found: torch.Tensor, indices: torch.Tensor,
    counts: torch.Tensor, now: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`a2ats_hf.kernels.reference.split_rows`."""
    b, h, k = indices.shape
    indices, counts = indices.contiguous(), counts.contiguous()
    hit_slots = torch.empty(b, h, k, dtype=torch.int32, device=indices.device)
    miss_indices = torch.empty_like(indices)
    hit_counts, miss_counts = torch.empty_like(counts), torch.empty_like(counts)
    on_device = isinstance(now, torch.Tensor)
    _split_kernel[(b * h,)](
        slot, stamp, sought, found, indices, counts, hit_slots, hit_counts, miss_indices, miss_counts,
        now if on_device else counts, 0 if on_device else now, k, slot.stride(0), slot.stride(1), stamp.stride(0),
        stamp.stride(1), indices.stride(0), indices.stride(1), sought.stride(0), sought.stride(1),
        H=h, BLOCK=min(BLOCK, triton.next_power_of_2(k)), NOW_ON_DEVICE=on_device,
    )
    return hit_slots, hit_counts, miss_indices, miss_counts


@triton.jit
def _fill_kernel(keys_ptr, values_ptr, token_ptr, stamp_ptr, slot_ptr, miss_ptr, miss_counts_ptr, in_ptr,
                 victims_ptr, hit_ptr, hit_counts_ptr, now_ptr, now, S, F, s_kv_b, s_kv_h, s_kv_s, s_tok_b, s_tok_h,
                 s_stamp_b, s_stamp_h, s_slot_b, s_slot_h, s_miss_b, s_miss_h, s_in_b, s_in_h, s_in_f, s_in_2,
                 s_hit_b, s_hit_h,
                 H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr,
                 AGE_CAP: tl.constexpr, NOW_ON_DEVICE: tl.constexpr, BY_TOKEN: tl.constexpr, APPEND: tl.constexpr):
    """Program (row, KV head): as many of the oldest slots as misses come (at most F; ages capped at AGE_CAP, ties
    by slot number), found from a histogram of the ages and listed in slot order, then the misses written into
    them, their K/V read from ``in_ptr`` at the miss's position, or (BY_TOKEN) at its token; (APPEND) the slots
    listed after the hits."""
    pid = tl.program_id(0)
    b, h = (pid // H).to(tl.int64), (pid % H).to(tl.int64)  # offsets past 2**31: a large batch's pinned block
    now = tl.load(now_ptr).to(tl.int64) if NOW_ON_DEVICE else tl.full([], 0, tl.int64) + now
    need = tl.minimum(tl.load(miss_counts_ptr + pid).to(tl.int32), F)
    stamp_row = stamp_ptr + b * s_stamp_b + h * s_stamp_h
    # the largest age T with at least `need` slots as old or older, from a histogram of the ages (one pass)
    bins = tl.arange(0, 2 * (AGE_CAP + 1))
    counts = tl.zeros([2 * (AGE_CAP + 1)], tl.int32)
    for start in range(0, S, BLOCK):
        col = start + tl.arange(0, BLOCK)
        age = tl.minimum(tl.maximum(now - tl.load(stamp_row + col, mask=col < S, other=0), 0), AGE_CAP)
        counts += tl.histogram(tl.where(col < S, age, 2 * AGE_CAP + 1).to(tl.int32),
                               2 * (AGE_CAP + 1))  # (columns past S in the last bin, not counted)
    counts = tl.where(bins <= AGE_CAP, counts, 0)
    as_old = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts  # slots of age >= each bin's
    lo = tl.max(tl.where((as_old >= need) & (bins <= AGE_CAP), bins, 0), 0)
    above = tl.sum(tl.where(bins > lo, counts, 0), 0)  # older than T: all taken; then those of age T in slot order
    ties_needed = need - above
    taken = tl.full([], 0, tl.int32)
    ties = tl.full([], 0, tl.int32)
    victims_row = victims_ptr + pid * F
    for start in range(0, S, BLOCK):
        col = start + tl.arange(0, BLOCK)
        age = tl.minimum(tl.maximum(now - tl.load(stamp_row + col, mask=col < S, other=0), 0), AGE_CAP)
        tie = (age == lo) & (col < S)
        tie_rank = ties + tl.cumsum(tie.to(tl.int32), 0) - 1
        take = ((age > lo) & (col < S)) | (tie & (tie_rank < ties_needed))
        at = taken + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(victims_row + at, col, mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(tie.to(tl.int32), 0)
    tl.debug_barrier()  # the victims, written above by other threads of the program, are read below
    token_row = token_ptr + b * s_tok_b + h * s_tok_h
    slot_row = slot_ptr + b * s_slot_b + h * s_slot_h
    hits = tl.load(hit_counts_ptr + pid).to(tl.int32) if APPEND else need * 0
    d = tl.arange(0, D_PAD)
    start = need * 0
    while start < need:
        j = start + tl.arange(0, BLOCK_F)
        coming = j < need
        victim = tl.load(victims_row + j, mask=coming, other=0)
        new = tl.load(miss_ptr + b * s_miss_b + h * s_miss_h + j, mask=coming, other=0)
        old = tl.load(token_row + victim, mask=coming, other=-1)
        tl.store(slot_row + old, tl.full([BLOCK_F], -1, tl.int32), mask=coming & (old >= 0))
        tl.store(slot_row + new, victim.to(tl.int32), mask=coming)
        tl.store(token_row + victim, new.to(tl.int32), mask=coming)
        tl.store(stamp_row + victim, tl.zeros([BLOCK_F], tl.int64) + now, mask=coming)
        if APPEND:
            tl.store(hit_ptr + b * s_hit_b + h * s_hit_h + hits + j, victim, mask=coming)
        rows = coming[:, None] & (d[None, :] < D)
        at = new.to(tl.int64) if BY_TOKEN else j.to(tl.int64)
        source = in_ptr + b * s_in_b + h * s_in_h + at[:, None] * s_in_f + d[None, :]
        target = b * s_kv_b + h * s_kv_h + victim[:, None].to(tl.int64) * s_kv_s + d[None, :]
        tl.store(keys_ptr + target, tl.load(source, mask=rows).to(keys_ptr.dtype.element_ty), mask=rows)
        tl.store(values_ptr + target, tl.load(source + s_in_2, mask=rows).to(values_ptr.dtype.element_ty), mask=rows)
        start += BLOCK_F
    if APPEND:
        tl.store(hit_counts_ptr + pid, (hits + need).to(hit_counts_ptr.dtype.element_ty))


def fill_rows(
    keys: torch.Tensor, values: torch.Tensor, token: torch.Tensor, stamp: torch.Tensor, slot: torch.Tensor,
    miss_indices: torch.Tensor, miss_counts: torch.Tensor, source: torch.Tensor, now: int | torch.Tensor,
    by_token: bool = False, hits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Same contract as :func:`a2ats_hf.kernels.reference.fill_rows`. ``source`` may be pinned CPU memory: the
    kernel reads the rows that come over PCIe, in place."""
    b, h, s, d = keys.shape
    f = miss_indices.shape[-1] if by_token else source.shape[2]
    assert keys.stride() == values.stride() and keys.stride(-1) == 1 and source.stride(-1) == 1
    victims = torch.empty(b * h, max(f, 1), dtype=torch.int32, device=keys.device)
    miss_counts = miss_counts.contiguous()
    hit_slots, hit_counts = hits if hits is not None else (victims, miss_counts)  # (not read without hits)
    assert hit_counts.is_contiguous()
    on_device = isinstance(now, torch.Tensor)
    _fill_kernel[(b * h,)](
        keys, values, token, stamp, slot, miss_indices, miss_counts, source, victims, hit_slots, hit_counts,
        now if on_device else miss_counts, 0 if on_device else now, s, f, keys.stride(0), keys.stride(1),
        keys.stride(2), token.stride(0), token.stride(1), stamp.stride(0), stamp.stride(1), slot.stride(0),
        slot.stride(1), miss_indices.stride(0), miss_indices.stride(1), *source.stride()[:4],
        hit_slots.stride(0), hit_slots.stride(1),
        H=h, D=d, D_PAD=triton.next_power_of_2(d), BLOCK=min(BLOCK, triton.next_power_of_2(s)),
        BLOCK_F=min(64, triton.next_power_of_2(max(f, 1))), AGE_CAP=AGE_CAP, NOW_ON_DEVICE=on_device,
        BY_TOKEN=by_token, APPEND=hits is not None,
    )
