"""Triton top-K selection over codes, exact and parallel over (row, KV head, segment of tokens).

Scores take only ``M`` distinct values per head (one per centroid), so the K-th largest score comes from the
histogram of the candidates' codes and the LUT alone, without touching the codes: a radix select on the scores'
order-preserving integer keys, 4 bits per round, weighted by the histogram (one program per head), which also
classes every centroid as above, equal to or below that threshold for the head (one byte each, the KV group's
bytes side by side in one word). Then three passes over segments of the codes, each fully parallel and reading
one word per token: count each head's ties per segment; count the tokens the KV group unites per segment (a tie
is taken while fewer than the head's remaining budget of ties precede it, so ties go to the lowest token indices);
write the chosen indices compacted and ascending at each segment's offset. For groups of up to 4 heads the words
are counted with bit operations (one 16-bit counter per head in a 64-bit lane) and unpacked to a [group, block]
tile only in the block where a head's budget runs out. The result equals
:func:`a2ats_hf.kernels.reference.select_topk` exactly.
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
def _centroid_chunk(lut_ptr, hist_ptr, pid, kv, m0, m, BLOCK_M: tl.constexpr):
    """Centroids [m0, m0 + BLOCK_M) of one head: their columns, validity, candidate counts and score keys."""
    cols = m0 + tl.arange(0, BLOCK_M)
    ok = cols < m
    count = tl.load(hist_ptr + kv.to(tl.int64) * m + cols, mask=ok, other=0)
    key = _order_key(tl.load(lut_ptr + pid.to(tl.int64) * m + cols, mask=ok, other=0.0))
    return cols, ok, count, key


@triton.jit
def _mark(bitmap_ptr, flags, m0, words, BLOCK_M: tl.constexpr):
    """Set the bits of centroids [m0, m0 + BLOCK_M) whose ``flags`` hold in a bitmap of ``words`` int32."""
    packed = tl.sum(tl.reshape(flags.to(tl.int32), (BLOCK_M // 32, 32)) << tl.arange(0, 32)[None, :], axis=1)
    w = m0 // 32 + tl.arange(0, BLOCK_M // 32)
    tl.atomic_or(bitmap_ptr + w, packed, mask=(w < words) & (packed != 0))


@triton.jit
def _threshold_kernel(lut_ptr, hist_ptr, k_ptr, need_ptr, tie_ptr, above_ptr, ties_any_ptr, m, words,
                      HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per (row, head): the k-th largest score and how many tokens scoring exactly it to take. Each centroid is
    marked for the KV group in two bitmaps of ``words`` int32 per pair (above the threshold for some head; equal
    to it for some head), small enough to stay in L1 while every token looks its code up, and in byte
    ``head % GROUP`` of its [G_PAD]-byte tie entry (1: equal to this head's threshold), read only for ties."""
    pid = tl.program_id(0)
    row = pid // HEADS
    kv = row * (HEADS // GROUP) + (pid % HEADS) // GROUP
    k = tl.load(k_ptr + row).to(tl.int32)
    digit = tl.arange(0, 16).to(tl.uint32)
    thr = tl.zeros([1], dtype=tl.uint32)
    for r in range(8):  # 4 bits per round, from the top: keep the largest prefix with >= k candidates at or above
        trial = thr | (digit << (28 - 4 * r))  # [16]
        above = tl.zeros([16], dtype=tl.int32)
        for m0 in range(0, m, BLOCK_M):
            cols, ok, count, key = _centroid_chunk(lut_ptr, hist_ptr, pid, kv, m0, m, BLOCK_M)
            above += tl.sum(tl.where(key[None, :] >= trial[:, None], count[None, :], 0), axis=1)
        best = tl.sum((above >= k).to(tl.int32), axis=0) - 1  # `above` falls with the digit
        thr = thr | (best.to(tl.uint32) << (28 - 4 * r))
    greater = tl.zeros([1], dtype=tl.int32)
    for m0 in range(0, m, BLOCK_M):
        cols, ok, count, key = _centroid_chunk(lut_ptr, hist_ptr, pid, kv, m0, m, BLOCK_M)
        greater += tl.sum(tl.where(key > thr, count, 0), axis=0)
        tie = ok & (key == thr)
        tl.store(tie_ptr + (kv.to(tl.int64) * m + cols) * G_PAD + (pid % HEADS) % GROUP, tie.to(tl.uint8), mask=ok)
        _mark(above_ptr + kv * words, ok & (key > thr), m0, words, BLOCK_M)
        _mark(ties_any_ptr + kv * words, tie, m0, words, BLOCK_M)
    tl.store(need_ptr + pid + tl.arange(0, 1), k - greater)


@triton.jit
def _lookback(status_ptr, seg, local, W: tl.constexpr, WINDOW: tl.constexpr):
    """Exclusive prefix over segments of ``local`` [W] by decoupled look-back: publish this segment's own value
    (flag 1); read the WINDOW segments before it at once and, when those from the last inclusive one (flag 2) on
    are all published, add them and stop there or move a window back; publish the inclusive value. Each status
    word holds a flag in its top two bits and a value below 2**30, so one word read is consistent."""
    w = tl.arange(0, W)
    tl.atomic_xchg(status_ptr + seg * W + w, local | (1 << 30))
    prefix = tl.zeros([W], dtype=tl.int32)
    r = tl.arange(0, WINDOW)
    end = seg  # segments [.., end) are still to add
    while end > 0:
        before = end - WINDOW + r
        word = tl.load(status_ptr + before[:, None] * W + w[None, :], mask=before[:, None] >= 0,
                       other=-2147483648, volatile=True)  # before the first segment: inclusive 0
        flag = (word >> 30) & 3
        lo = tl.min(flag, axis=1)
        ready = (lo == tl.max(flag, axis=1)) & (lo > 0)  # all W words of that segment published alike
        last = tl.max(tl.where(ready & (lo == 2), r, -1), axis=0)  # the last inclusive segment in the window
        used = r >= last
        go = tl.min((ready | ~used).to(tl.int32), axis=0) > 0
        prefix += tl.where(go, tl.sum(tl.where(used[:, None], word & 0x3FFFFFFF, 0), axis=0), 0)
        end = tl.where(go, tl.where(last >= 0, 0, end - WINDOW), end)
    tl.atomic_xchg(status_ptr + seg * W + w, (prefix + local) | -2147483648)
    return prefix


@triton.jit
def _marks(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, tokens, n, k, g, g_ok,
           G_PAD: tl.constexpr, TILE: tl.constexpr):
    """The tokens' marks from the two bitmaps: above the threshold for some head ([S] bool), and their heads'
    ties, read from the tie entries only for tokens some head ties on: as one word per token (bytes 0/1) or, with
    TILE, as a [G_PAD, S] int32 tile."""
    t_ok = tokens < n
    code = tl.load(codes_row + tokens, mask=t_ok, other=0).to(tl.int32)
    live = (tl.load(cand_row + tokens, mask=t_ok, other=0) != 0) & t_ok & ((tokens * 0 + k) > 0)
    bit = code & 31
    above = ((tl.load(above_ptr + (code >> 5), mask=live, other=0) >> bit) & 1) != 0
    tied = ((tl.load(ties_any_ptr + (code >> 5), mask=live, other=0) >> bit) & 1) != 0
    if G_PAD <= 4:  # the group's tie bytes as one word per token
        ties = tl.load(tie_rows + code, mask=tied, other=0).to(tl.int32)
        if TILE:
            ties = (ties[None, :] >> (8 * g[:, None])) & 1
    elif G_PAD == 8:
        word = tl.load(tie_rows + code, mask=tied, other=0).to(tl.int64)
        ties = ((word[None, :] >> (8 * g[:, None]).to(tl.int64)) & 1).to(tl.int32)
    else:
        ties = tl.load(tie_rows + code[None, :] * G_PAD + g[:, None], mask=g_ok[:, None] & tied[None, :], other=0)
        ties = ties.to(tl.int32)
    return above, ties


@triton.jit
def _ranked(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, out_row, first, n, k, g, g_ok, seen, need, slot,
            G_PAD: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr, WRITE: tl.constexpr):
    """:func:`_block` chunk by chunk over [group, chunk] tiles of ties, ranked by a scan."""
    count = tl.sum(tl.zeros([1], dtype=tl.int32), axis=0)
    for c in range(SUB // CHUNK):
        tokens = first + c * CHUNK + tl.arange(0, CHUNK)
        above, tie = _marks(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, tokens, n, k, g, g_ok, G_PAD, True)
        take = (tie != 0) & ((tl.cumsum(tie, axis=1) - tie + seen[:, None]) < need[:, None])
        union = (above | (tl.max(take.to(tl.int32), axis=0) != 0)).to(tl.int32)
        if WRITE:
            tl.store(out_row + slot + count + tl.cumsum(union, axis=0) - union, tokens, mask=union != 0)
        count += tl.sum(union, axis=0)
        seen += tl.sum(tie, axis=1)
    return count, seen


@triton.jit
def _block(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, out_row, first, n, k, g, g_ok, seen, need, slot,
           G_PAD: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr, WRITE: tl.constexpr):
    """Tokens [first, first + SUB): how many the KV group takes and each head's ties seen after them; with WRITE,
    their indices go to ``out_row`` from ``slot`` on. A tie is taken while fewer than the head's remaining budget
    of ties precede it, so ties go to the lowest token indices. For groups of up to 4 heads, the block is done
    with bit operations on one word per token (one 16-bit tie counter per head in a 64-bit lane); only a block
    where some head's budget runs out, or a larger group, is ranked chunk by chunk (:func:`_ranked`)."""
    if G_PAD <= 4:
        tokens = first + tl.arange(0, SUB)
        above, word = _marks(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, tokens, n, k, g, g_ok, G_PAD,
                             False)
        wide = word.to(tl.int64)
        lanes = (wide & 1) | (((wide >> 8) & 1) << 16) | (((wide >> 16) & 1) << 32) | (((wide >> 24) & 1) << 48)
        here = ((tl.sum(lanes, axis=0) >> (16 * g).to(tl.int64)) & 0xFFFF).to(tl.int32)
        if tl.max(((seen < need) & (seen + here > need)).to(tl.int32), axis=0) == 0:
            taken = tl.sum(tl.where(g_ok & (seen < need), 1 << (8 * g), 0), axis=0)  # heads whose ties are all in
            union = (above | ((word & taken) != 0)).to(tl.int32)
            if WRITE:
                tl.store(out_row + slot + tl.cumsum(union, axis=0) - union, tokens, mask=union != 0)
            count = tl.sum(union, axis=0)
            seen_after = seen + here
        else:
            count, seen_after = _ranked(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, out_row, first, n, k,
                                        g, g_ok, seen, need, slot, G_PAD, SUB, CHUNK, WRITE)
    else:
        count, seen_after = _ranked(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, out_row, first, n, k, g,
                                    g_ok, seen, need, slot, G_PAD, SUB, CHUNK, WRITE)
    return count, seen_after


@triton.jit(do_not_specialize=["n", "stride_mb", "out_width", "segments"])  # they change every decode step
def _select_kernel(
    tie_ptr, above_ptr, ties_any_ptr, codes_ptr, cand_ptr, k_ptr, need_ptr, state_ptr, out_ptr,
    n, m, words, stride_cb, stride_ch, stride_mb, out_width, segments, pairs,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per (pair, segment of SUB tokens); the codes come from memory once and from cache after. Count
    each head's ties; look back for the ties before the segment; count the KV group's union; look back for where
    the segment's indices start; write them. The last segment writes the count and zeroes the tail."""
    pair = tl.program_id(0) // segments  # programs start in this order: look-back never waits on one not started
    seg = tl.program_id(0) % segments
    row = pair // HKV
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    k = tl.load(k_ptr + row).to(tl.int32)
    need = tl.load(need_ptr + pair * G + g, mask=g_ok, other=0)
    codes_row = codes_ptr + row.to(tl.int64) * stride_cb + (pair % HKV).to(tl.int64) * stride_ch
    cand_row = cand_ptr + row.to(tl.int64) * stride_mb
    above_ptr += pair * words
    ties_any_ptr += pair * words
    tie_rows = tie_ptr + pair.to(tl.int64) * m * (1 if G_PAD <= 8 else G_PAD)
    out_row = out_ptr + pair.to(tl.int64) * out_width
    first = seg * SUB

    # The segment's ties per head: taking none of them (need 0) leaves only the count.
    zero = tl.zeros([G_PAD], dtype=tl.int32)
    here = _block(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, out_row, first, n, k, g, g_ok, zero, zero,
                  0, G_PAD, SUB, CHUNK, False)[1]
    seen = _lookback(state_ptr + pairs + pair * segments * G_PAD, seg, here, G_PAD, 32)
    total = _block(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, out_row, first, n, k, g, g_ok, seen, need,
                   0, G_PAD, SUB, CHUNK, False)[0]
    start = tl.sum(_lookback(state_ptr + pairs * (1 + segments * G_PAD) + pair * segments, seg,
                             tl.zeros([1], dtype=tl.int32) + total, 1, 32), axis=0)
    _block(codes_row, cand_row, above_ptr, ties_any_ptr, tie_rows, out_row, first, n, k, g, g_ok, seen, need, start,
           G_PAD, SUB, CHUNK, True)
    if seg == segments - 1:
        tl.store(state_ptr + pair + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32) + start + total)
        for tail in range(start + total, out_width, CHUNK):  # entries past the count are 0
            slots = tail + tl.arange(0, CHUNK)
            tl.store(out_row + slots, tl.zeros([CHUNK], dtype=tl.int32), mask=slots < out_width)


def select_topk(
    lut: torch.Tensor,
    codes: torch.Tensor,
    candidates: torch.Tensor,
    k: torch.Tensor,
    budget: str = "query_head",
    histogram: torch.Tensor | None = None,
    k_max: int | None = None,
    block_n: int = 4096,
    num_warps: int = 4,
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
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    cand = candidates if candidates.stride(-1) == 1 else candidates.contiguous()  # bool, read as such
    heads = lut.shape[1]
    g_pad = triton.next_power_of_2(group)
    if g_pad > 4:  # larger groups are ranked over tiles throughout
        block_n = min(block_n, 2048 // g_pad)
    segments = triton.cdiv(n, block_n)
    pairs, words = b * hkv, triton.cdiv(m, 32)
    # counts; look-back status words: ties per (pair, segment, head), union per (pair, segment); the two bitmaps
    state = torch.zeros(pairs * (1 + segments * (g_pad + 1) + 2 * words), dtype=torch.int32, device=codes.device)
    above, ties_any = state[pairs * (1 + segments * (g_pad + 1)):].view(2, pairs, words)
    need = torch.empty(b, heads, dtype=torch.int32, device=codes.device)
    ties = torch.empty(pairs, m, g_pad, dtype=torch.uint8, device=codes.device)  # padding bytes: never read
    _threshold_kernel[(b * heads,)](
        lut, histogram.to(torch.int32).contiguous(), k.contiguous(), need, ties, above, ties_any, m, words,
        HEADS=heads, GROUP=group, G_PAD=g_pad, BLOCK_M=min(max(triton.next_power_of_2(m), 32), 2048), num_warps=8,
    )
    indices = torch.empty(b, hkv, width, dtype=torch.int32, device=codes.device)
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(g_pad)  # one word per centroid
    _select_kernel[(pairs * segments,)](
        ties.view(word).view(pairs, m) if word else ties, above, ties_any, codes, cand, k, need, state, indices,
        n, m, words, codes.stride(0), codes.stride(1), cand.stride(0), width, segments, pairs,
        HKV=hkv, G=group, G_PAD=g_pad, SUB=block_n, CHUNK=min(block_n, 2048 // g_pad), num_warps=num_warps,
    )
    return indices, state[:pairs].view(b, hkv)
