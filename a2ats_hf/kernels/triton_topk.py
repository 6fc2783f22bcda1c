"""Triton top-K selection over codes, exact and parallel over (row, KV head, part of the tokens).

Scores take only ``M`` distinct values per head (one per centroid), so the K-th largest score comes from the
histogram of the candidates' codes and the LUT alone, without touching the codes: a radix select on the scores'
order-preserving integer keys, weighted by the histogram (2 bits per round in one program per head; a table of 8192
columns or more, as the distance scorer's, 8 bits per round, or 16-bit keys in one round below COUNT16_BYTES of
counters, each round counted by programs over 4096 columns), which also classes every centroid as above,
equal to or below that threshold for the head (one byte each, the KV group's bytes side by side in one word), and
ORs the classes over the KV group into 2 bits per centroid (above / tied for some head). Then one pass over parts
of the codes, a program a part: a token looks up its 2 bits (a table of 1 KB per 4096 centroids, so a warp's lookups
touch at most 8 cache lines where the class words could touch 32) and only a token tied for some head reads its
class word; the part counts each head's ties, finds those of the parts before it by decoupled look-back (each part
publishes its counts, then their sums with the earlier parts'; :func:`_prefix`), unites the KV group's choice (a
tie is taken while fewer than the head's remaining budget of ties precede it, so ties go to the lowest token
indices), finds the choices before it the same way and writes its chosen indices compacted and ascending there.
For groups of up to 4 heads the words are counted with bit operations (one 16-bit counter per head in a 64-bit
lane) and unpacked to a [group, block] tile only in the part where a head's budget runs out.
The result equals :func:`a2ats_hf.kernels.reference.select_topk` exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import Keep, check_key_bits, code_histogram
from .triton_launch import pdl, wait_previous

WIDE_TABLE = 8192  # columns from which a table's threshold is a split select (see _thresholds)
SPLIT_COLUMNS = 4096  # columns per program of a split select, read as one block
SPLIT_WARPS = 8  # warps per program of a split select
RADIX_BITS = 8  # bits of the score key a split select picks per round (but see COUNT16_BYTES)
COUNT16_BYTES = 2 << 20  # the most bytes of 16-bit digits' counters (256 KB a head) a select zeroes: below it a
# split select of 16-bit keys counts them in one round (8 rows: a round saved, v83), past it in two rounds of 8 bits
# (32 rows, the distance table of Llama-3.1-8B's query heads: 0.12 ms a step faster at 128K x 1 on an H100, v93)
PICK_CHUNK = tl.constexpr(4096)  # 16-bit digits' counters a pick reads at a time, down from the round's largest digit
COUNT_COPIES = 1  # sets of digit counters per split (1: the timed default; more spread equal digits' atomics)
KEY_SPAN = False  # True: a split select first finds each head's key span, counts keys shifted by it (_key_span)
LOOK_BACK = 128  # earlier parts a scan's look-back reads at once (:func:`_prefix`; 128K tokens: 256 parts a pair)


@triton.jit
def _order_key(values):
    """float32 -> uint32 whose unsigned order is the floats' order."""
    bits = values.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, ~bits, bits | -2147483648)
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _top_bits(key, KEY_BITS: tl.constexpr):
    """``key`` with only its top KEY_BITS bits (the rest 0: scores equal in those bits tie)."""
    if KEY_BITS < 32:
        key = key & ((1 << 32) - (1 << (32 - KEY_BITS)))
    return key


@triton.jit
def _entries(lut_row, hist_row, m0, n, BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, UNIT: tl.constexpr = False):
    """Entries [m0, m0 + BLOCK) of a head's table as (candidate counts, score keys), 0 past ``n``; a key keeps its
    top KEY_BITS bits (the rest 0: scores equal in those bits tie). UNIT: one candidate each (no histogram read)."""
    i = m0 + tl.arange(0, BLOCK)
    ok = i < n
    if UNIT:
        count = ok.to(tl.int32)
    else:
        count = tl.load(hist_row + i, mask=ok, other=0)
    return count, _top_bits(_order_key(tl.load(lut_row + i, mask=ok, other=0.0)), KEY_BITS)


@triton.jit
def _radix_select(count, key, k, KEY_BITS: tl.constexpr):
    """A threshold key with the top k candidates at or above it, of a table held in registers (``count``
    candidates at each ``key``; a narrow table has under WIDE_TABLE entries, so no round waits on memory): a radix
    select from the top, 2 bits per round (3 trial prefixes a round), giving the largest key with >= k candidates
    at or above it, unless a round finds exactly k at or above its prefix (float scores: about half-way), where it
    stops and gives the prefix: the same k candidates lie at or above either, so every tie at it is taken. Keys
    of KEY_BITS bits (:func:`_entries`) take KEY_BITS / 2 rounds."""
    thr = tl.zeros([1], dtype=tl.uint32)
    one = tl.full([1], 1, dtype=tl.uint32)
    at_least = k * 0 - 1  # candidates at or above the prefix, where a round has counted them
    r = 0
    while (r < KEY_BITS // 2) & (at_least != k):
        shift = 30 - 2 * r
        best = tl.zeros([1], dtype=tl.uint32)
        for digit in range(1, 4):  # candidates at or above the prefix + digit: `best` counts the digits that hold k
            above = tl.sum(tl.where(key >= (thr | (digit * one << shift)), count, 0), axis=0)
            best += (above >= k).to(tl.uint32)
            at_least = tl.where(above >= k, above, at_least)  # (fewer at each digit: the last that holds k)
        thr = thr | (best << shift)
        r += 1
    return thr


@triton.jit
def _class_block(count, key, first, end, class_ptr, summary_ptr, kv, head, thr, m, GROUP: tl.constexpr,
                 G_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """A block of a head's table, its entries ``(count, key)`` at columns [first, first + BLOCK) (``first`` a
    multiple of 16; those from ``end`` on left alone), classed against the threshold key ``thr`` (2: above, 1:
    equal, 0: below) in byte ``head % GROUP`` of their [G_PAD]-byte entries, and OR-ed into the KV group's 2-bit
    summary. Returns its candidates scoring above the threshold."""
    cols = first + tl.arange(0, BLOCK)
    ok = cols < end
    category = tl.where(ok, tl.where(key > thr, 2, tl.where(key == thr, 1, 0)), 0)
    entry = (kv.to(tl.int64) * m + cols) * G_PAD + head % GROUP
    tl.store(class_ptr + entry, category.to(tl.uint8), mask=ok)
    packed = tl.sum(tl.reshape(category << (2 * (cols % 16)), [BLOCK // 16, 16]), axis=1)
    words = first // 16 + tl.arange(0, BLOCK // 16)
    tl.atomic_or(summary_ptr + kv.to(tl.int64) * tl.cdiv(m, 16) + words, packed, mask=words * 16 < end,
                 sem="relaxed")
    return tl.sum(tl.where(key > thr, count, 0), axis=0)


@triton.jit
def _classify(lut_row, hist_row, class_ptr, summary_ptr, kv, head, thr, m, GROUP: tl.constexpr,
              G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, KEY_BITS: tl.constexpr):
    """A head's whole table classed against its threshold key ``thr`` (:func:`_class_block`), block by block.
    Returns the candidates scoring above the threshold."""
    greater = tl.zeros([1], dtype=tl.int32)
    for m0 in range(0, m, BLOCK_M):
        count, key = _entries(lut_row, hist_row, m0, m, BLOCK_M, KEY_BITS)
        greater += _class_block(count, key, m0, m, class_ptr, summary_ptr, kv, head, thr, m, GROUP, G_PAD, BLOCK_M)
    return greater


@triton.jit
def _threshold_kernel(lut_ptr, hist_ptr, k_ptr, need_ptr, class_ptr, summary_ptr, m, hist_stride,
                      HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, TABLE: tl.constexpr,
                      BLOCK_M: tl.constexpr, KEY_BITS: tl.constexpr, PDL: tl.constexpr):
    """Per (row, head) of a narrow table: the k-th largest score (a radix select over the whole table), each
    centroid's class for this head and the group's summary (:func:`_classify`), and how many tokens scoring exactly
    the threshold to take."""
    wait_previous(PDL)
    pid = tl.program_id(0)
    row = pid // HEADS
    kv = row * (HEADS // GROUP) + (pid % HEADS) // GROUP
    k = tl.load(k_ptr + row).to(tl.int32)
    lut_row, hist_row = lut_ptr + pid.to(tl.int64) * m, hist_ptr + kv.to(tl.int64) * hist_stride
    thr = _radix_select(*_entries(lut_row, hist_row, 0, m, TABLE, KEY_BITS), k, KEY_BITS)
    greater = _classify(lut_row, hist_row, class_ptr, summary_ptr, kv, pid % HEADS, thr, m, GROUP, G_PAD, BLOCK_M,
                        KEY_BITS)
    tl.store(need_ptr + pid + tl.arange(0, 1), k - greater)


@triton.jit
def _next_digit(counts, d, prefix, rest, BITS: tl.constexpr):
    """(prefix, rest) after a digit of a radix select: of the candidates under ``prefix`` counted by their next
    digit ``d`` (int64 ``counts``; bins from 1 << BITS on are empty), the largest digit with at least ``rest``
    candidates at or above it (0 where none has: every candidate is then taken) appended to ``prefix``, and the
    candidates above it taken out of ``rest``."""
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    digit = tl.max(tl.where((d < (1 << BITS)) & (at_or_above >= rest), d, 0), axis=0)
    return (prefix << BITS) | digit, rest - tl.sum(tl.where(d > digit, counts, 0), axis=0)


@triton.jit
def _pick_digit(bins_ptr, pid, sets, prefix, rest, S_PAD: tl.constexpr, BITS: tl.constexpr):
    """:func:`_next_digit` of a split select's round: the head's counts summed over its ``sets`` of counters."""
    s, d = tl.arange(0, S_PAD), tl.arange(0, 1 << BITS)
    counts = tl.load(bins_ptr + (pid.to(tl.int64) * sets + s[:, None]) * (1 << BITS) + d[None, :],
                     mask=(s < sets)[:, None], other=0)
    return _next_digit(tl.sum(counts, axis=0).to(tl.int64), d, prefix, rest, BITS)


@triton.jit
def _pick_from_top(counts_row, top, prefix, rest, BITS: tl.constexpr, CHUNK: tl.constexpr):
    """:func:`_next_digit` over ``counts_row``'s 1 << BITS counters (too many for registers), read CHUNK at a time
    down from ``top``, the largest digit counted (0 where none was), until a digit has at least ``rest``
    candidates at or above it (else digit 0: every candidate is then taken); the candidates above it taken out of
    ``rest``. Scores crowd near the top, so one chunk mostly does."""
    hi, above = top.to(tl.int64), tl.zeros([], dtype=tl.int64)
    digit, left = tl.full([], -1, tl.int64), rest
    while digit < 0:
        d = hi - (CHUNK - 1) + tl.arange(0, CHUNK)
        counts = tl.load(counts_row + d, mask=d >= 0, other=0).to(tl.int64)
        at_or_above = above + tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
        digit = tl.max(tl.where((d >= 0) & ((at_or_above >= rest) | (d == 0)), d, -1), axis=0)
        left = rest - above - tl.sum(tl.where(d > digit, counts, 0), axis=0)
        above += tl.sum(counts, axis=0)
        hi -= CHUNK
    return (prefix << BITS) | digit, left


@triton.jit
def _tops(bins_ptr, rows, sets, BITS: tl.constexpr, KEY_BITS: tl.constexpr):
    """Where a split select's largest digit of each (round, head) is kept: after every round's counters."""
    return bins_ptr + (KEY_BITS // BITS) * rows * sets * (1 << BITS)


@triton.jit
def _split_state(bins_ptr, state_ptr, k_ptr, pid, split, sets, rows, ROUND: tl.constexpr, HEADS: tl.constexpr,
                 S_PAD: tl.constexpr, BITS: tl.constexpr, KEY_BITS: tl.constexpr):
    """(prefix, rest) after the digits of rounds before ROUND: the last of them picked here from its counts (each
    program of a launch picks it alike; split 0 keeps it in ``state`` for the next launch); 16-bit digits' from
    the round's largest digit down (:func:`_pick_from_top`)."""
    if ROUND == 1:
        prefix, rest = tl.full([], 0, tl.int64), tl.load(k_ptr + pid // HEADS).to(tl.int64)
    else:
        prefix = tl.load(state_ptr + 2 * ((ROUND - 2) * rows + pid))
        rest = tl.load(state_ptr + 2 * ((ROUND - 2) * rows + pid) + 1)
    counts = bins_ptr + (ROUND - 1) * rows * sets * (1 << BITS)
    if BITS == 16:
        top = tl.load(_tops(bins_ptr, rows, sets, BITS, KEY_BITS) + (ROUND - 1) * rows + pid)
        prefix, rest = _pick_from_top(counts + pid.to(tl.int64) * (1 << BITS), top, prefix, rest, BITS, PICK_CHUNK)
    else:
        prefix, rest = _pick_digit(counts, pid, sets, prefix, rest, S_PAD, BITS)
    if split == 0:
        tl.store(state_ptr + 2 * ((ROUND - 1) * rows + pid), prefix)
        tl.store(state_ptr + 2 * ((ROUND - 1) * rows + pid) + 1, rest)
    return prefix, rest


@triton.jit
def _split_program(lut_ptr, hist_ptr, m, hist_stride, HEADS: tl.constexpr, GROUP: tl.constexpr,
                   COLUMNS: tl.constexpr):
    """(row-head, split, KV head, the head's table row, the KV head's histogram row, first and end column) of a
    split select's program over COLUMNS columns."""
    pid, split = tl.program_id(0), tl.program_id(1)
    kv = (pid // HEADS) * (HEADS // GROUP) + (pid % HEADS) // GROUP
    start = split * COLUMNS
    return (pid, split, kv, lut_ptr + pid.to(tl.int64) * m, hist_ptr + kv.to(tl.int64) * hist_stride, start,
            tl.minimum(start + COLUMNS, m))


@triton.jit
def _key_range_kernel(lut_ptr, hist_ptr, span_ptr, m, hist_stride, HEADS: tl.constexpr, GROUP: tl.constexpr,
                      COLUMNS: tl.constexpr, KEY_BITS: tl.constexpr, PDL: tl.constexpr):
    """Program (row-head, split of COLUMNS columns) of a wide table's select, before its rounds: the largest key
    of the split's candidates and the largest complement (2**32 - 1 - key), into the head's two zeroed ``span``
    words by an atomic maximum each."""
    wait_previous(PDL)
    pid, split, kv, lut_row, hist_row, start, end = _split_program(lut_ptr, hist_ptr, m, hist_stride, HEADS, GROUP,
                                                                   COLUMNS)
    count, key = _entries(lut_row, hist_row, start, end, COLUMNS, KEY_BITS)
    wide = key.to(tl.int64)
    tl.atomic_max(span_ptr + 2 * pid, tl.max(tl.where(count > 0, wide, 0), axis=0), sem="relaxed")
    tl.atomic_max(span_ptr + 2 * pid + 1, tl.max(tl.where(count > 0, 4294967295 - wide, 0), axis=0), sem="relaxed")


@triton.jit
def _key_span(span_ptr, pid, SPAN: tl.constexpr):
    """(lowest candidate key, left shift) of a head: its candidates' keys less the lowest, shifted left by the
    leading zero bits of their span (at most 31), fill 32 bits, so the rounds' first digit spreads them over its
    bins instead of the few that a score's sign and top exponent bits leave, which keeps the counts' atomic
    additions off one address (while they were ordered, acq_rel, this gained nothing measurable: v67). Without
    SPAN (no span launched), (0, 0): the keys as they are."""
    if not SPAN:
        return tl.full([], 0, tl.int64), tl.full([], 0, tl.int64)
    low = 4294967295 - tl.load(span_ptr + 2 * pid + 1)
    span = tl.maximum(tl.load(span_ptr + 2 * pid) - low, 0)
    bits = tl.arange(0, 32)
    return low, tl.minimum(tl.sum(((span >> (31 - bits)) == 0).to(tl.int32), axis=0), 31).to(tl.int64)


@triton.jit
def _digit_count_kernel(lut_ptr, hist_ptr, k_ptr, state_ptr, bins_ptr, span_ptr, m, hist_stride, sets, rows,
                        ROUND: tl.constexpr, HEADS: tl.constexpr, GROUP: tl.constexpr, S_PAD: tl.constexpr,
                        BITS: tl.constexpr, COLUMNS: tl.constexpr, COPIES: tl.constexpr, UNIT: tl.constexpr,
                        SPAN: tl.constexpr, KEY_BITS: tl.constexpr, PDL: tl.constexpr):
    """Program (row-head, split of COLUMNS columns) of a wide table's select, round ROUND: the split's columns
    read, and meanwhile the previous round's digit picked (:func:`_split_state`); then the candidates whose shifted
    key's (:func:`_key_span`) leading digits match the prefix counted by their next digit, into the split's own
    COPIES sets of counts (column c into set c % COPIES); 16-bit digits into one set
    shared by the splits, the largest digit counted kept by an atomic maximum. UNIT (re-ranking's scores: one
    candidate a column, up to the KV head's count of them, which ``hist_ptr`` holds instead of a histogram): a
    histogram of the digits in the program, stored whole into its first set (no zeroed counters)."""
    wait_previous(PDL)
    pid, split, kv, lut_row, hist_row, start, end = _split_program(lut_ptr, hist_ptr, m, hist_stride, HEADS, GROUP,
                                                                   COLUMNS)
    if UNIT:
        count, key = _entries(lut_row, hist_row, start, tl.minimum(tl.load(hist_row), end), COLUMNS, KEY_BITS, True)
    else:  # (issued before the pick's loads: they overlap)
        count, key = _entries(lut_row, hist_row, start, end, COLUMNS, KEY_BITS)
    shift: tl.constexpr = 32 - BITS * (ROUND + 1)
    if ROUND > 0:
        prefix = _split_state(bins_ptr, state_ptr, k_ptr, pid, split, sets, rows, ROUND, HEADS, S_PAD, BITS,
                              KEY_BITS)[0]
    low, left = _key_span(span_ptr, pid, SPAN)
    own = bins_ptr + (ROUND * rows + pid).to(tl.int64) * sets * (1 << BITS)
    if BITS < 16:
        own += split * COPIES * (1 << BITS)
    key = ((key.to(tl.int64) - low) << left) & 4294967295  # (garbage where no candidate: not taken)
    take = count > 0
    if ROUND > 0:
        take &= (key >> (shift + BITS)) == prefix
    digit = (key >> shift) & ((1 << BITS) - 1)
    if BITS == 16:
        top = tl.max(tl.where(take, digit, 0), axis=0).to(tl.int32)
        tl.atomic_max(_tops(bins_ptr, rows, sets, BITS, KEY_BITS) + ROUND * rows + pid, top, sem="relaxed")
    if UNIT:  # the digits' bins, then one for the columns not taken
        bins = tl.arange(0, 2 << BITS)
        counts = tl.histogram(tl.where(take, digit, (2 << BITS) - 1).to(tl.int32), 2 << BITS)
        tl.store(own + bins, counts, mask=bins < (1 << BITS))
    else:
        counter = own + digit
        if COPIES > 1:
            counter += ((start + tl.arange(0, COLUMNS)) % COPIES) * (1 << BITS)
        # relaxed, as every atomic here: only later launches read the counts (Triton's default, acq_rel, puts each
        # addition behind the last one's round trip: ~16 us a launch at 128K)
        tl.atomic_add(counter, count, mask=take, sem="relaxed")


@triton.jit
def _classify_kernel(lut_ptr, hist_ptr, k_ptr, state_ptr, bins_ptr, span_ptr, need_ptr, class_ptr, summary_ptr, m,
                     hist_stride, sets, rows, HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                     S_PAD: tl.constexpr, BITS: tl.constexpr, COLUMNS: tl.constexpr, SPAN: tl.constexpr,
                     KEY_BITS: tl.constexpr, PDL: tl.constexpr):
    """Program (row-head, split of COLUMNS columns) of a wide table: the split's columns read, and meanwhile the
    last digit picked, which completes the shifted threshold key's KEY_BITS top bits (its others are 0, as every
    shifted key's: :func:`_key_span` shifts the keys' span up to the top) and the ties left to take (written by
    split 0); then the columns classed against it shifted back (:func:`_class_block`)."""
    wait_previous(PDL)
    pid, split, kv, lut_row, hist_row, start, end = _split_program(lut_ptr, hist_ptr, m, hist_stride, HEADS, GROUP,
                                                                   COLUMNS)
    count, key = _entries(lut_row, hist_row, start, end, COLUMNS, KEY_BITS)
    thr, rest = _split_state(bins_ptr, state_ptr, k_ptr, pid, split, sets, rows, KEY_BITS // BITS, HEADS, S_PAD, BITS,
                             KEY_BITS)
    thr = thr << (32 - KEY_BITS)
    if split == 0:
        tl.store(need_ptr + pid, rest.to(tl.int32))
    low, left = _key_span(span_ptr, pid, SPAN)
    _class_block(count, key, start, end, class_ptr, summary_ptr, kv, pid % HEADS, ((thr >> left) + low).to(tl.uint32),
                 m, GROUP, G_PAD, COLUMNS)


def _split_shape(m: int, rows: int, key_bits: int = 32) -> tuple[int, int, int, int] | None:
    """(splits, sets of counters, rounds, bits a round) of a split select over ``rows`` heads' tables of ``m``
    columns keyed by ``key_bits`` bits; None for a narrow table (one program per head). 16-bit keys take one round
    of 16 bits where its counters (65,536 words a head) stay within COUNT16_BYTES (a launch fewer, and its digits
    spread the atomic additions that a score's few top digits crowd); 32-bit keys take 8 bits a round (two rounds
    of 16 cost more: the second's digits spread wide below its largest, so its pick reads many chunks)."""
    if m < WIDE_TABLE:
        return None
    splits = triton.cdiv(m, SPLIT_COLUMNS)
    if key_bits == 16 and 4 * rows << 16 <= COUNT16_BYTES:
        return splits, 1, 1, 16
    return splits, splits * COUNT_COPIES, key_bits // RADIX_BITS, RADIX_BITS


def _counters(m: int, rows: int, key_bits: int = 32) -> int:
    """The zeroed int32 words a split select needs: each head's key span (two int64), then the digit counters,
    then each round's largest digit a head (0 for a narrow table)."""
    shape = _split_shape(m, rows, key_bits)
    return 0 if shape is None else 4 * rows + shape[2] * rows * ((shape[1] << shape[3]) + 1)


def _thresholds(lut, histogram, k, need, classes, summary, counted, group, g_pad, key_bits=32):
    """Each (row, head)'s threshold key, its ties to take (``need``) and the centroids' classes and summary: one
    program per head over a narrow table; over a wide one (the distance scorer's buckets x centroids, which one
    program per head crossed in ~100 us) a split select: with KEY_SPAN, the head's key span (:func:`_key_span`)
    found first; then 16 or RADIX_BITS of the (shifted) key a round (:func:`_split_shape`), each round's candidates
    counted by programs over SPLIT_COLUMNS columns (into COUNT_COPIES sets of ``counted``'s zeroed counters each,
    or one set for 16 bits), then the classes by programs as many. Scores are keyed by their top ``key_bits``
    bits."""
    rows, m = lut.shape[0] * lut.shape[1], lut.shape[-1]
    common = dict(HEADS=lut.shape[1], GROUP=group, KEY_BITS=key_bits)
    shape = _split_shape(m, rows, key_bits)
    if shape is None:
        table = max(triton.next_power_of_2(m), 16)
        _threshold_kernel[(rows,)](lut, histogram, k, need, classes, summary, m, histogram.stride(1), G_PAD=g_pad,
                                   TABLE=table, BLOCK_M=min(table, 2048),
                                   num_warps=THRESHOLD_WARPS, **common, **pdl(lut.device))
        return
    splits, sets, rounds, bits = shape
    split = dict(S_PAD=triton.next_power_of_2(sets), BITS=bits, COLUMNS=SPLIT_COLUMNS, SPAN=KEY_SPAN,
                 num_warps=SPLIT_WARPS, **common, **pdl(lut.device))
    state = torch.empty(rounds, rows, 2, dtype=torch.int64, device=lut.device)
    span, counted = counted[: 4 * rows].view(torch.int64), counted[4 * rows :]  # (``counted`` starts 8-byte aligned)
    if KEY_SPAN:
        _key_range_kernel[(rows, splits)](lut, histogram, span, m, histogram.stride(1), COLUMNS=SPLIT_COLUMNS,
                                          num_warps=SPLIT_WARPS, **common, **pdl(lut.device))
    for r in range(rounds):
        _digit_count_kernel[(rows, splits)](lut, histogram, k, state, counted, span, m, histogram.stride(1), sets,
                                            rows, ROUND=r, COPIES=COUNT_COPIES if bits == RADIX_BITS else 1, UNIT=False,
                                            **split)
    _classify_kernel[(rows, splits)](lut, histogram, k, state, counted, span, need, classes, summary, m,
                                     histogram.stride(1), sets, rows, G_PAD=g_pad, **split)


@triton.jit
def _unit_select(key, inside, k, DIGIT_BITS: tl.constexpr, KEY_BITS: tl.constexpr):
    """(threshold key, ties to take at it) of the top k of the candidates ``key`` (their bits below the top
    KEY_BITS 0) where ``inside``, each counting once, held in registers: a radix select from the top, DIGIT_BITS
    bits a round (KEY_BITS / DIGIT_BITS rounds), each round's digits counted by one ``tl.histogram``. A round
    costs ~2 us whatever its digits (H100): 4-bit digits (32 bins) beat 2 (twice the rounds) and 8 (a ballot
    per bit of the bin, then 16 bins a lane)."""
    digits: tl.constexpr = 1 << DIGIT_BITS
    bins = tl.arange(0, 2 * digits)  # the digits, then a bin for the candidates not taken
    prefix, rest = tl.full([], 0, tl.int64), k.to(tl.int64)
    for r in tl.static_range(KEY_BITS // DIGIT_BITS):
        take = inside
        if r > 0:
            take = take & ((key >> (32 - DIGIT_BITS * r)).to(tl.int64) == prefix)
        digit = (key >> (32 - DIGIT_BITS * (r + 1))) & (digits - 1)
        counts = tl.histogram(tl.where(take, digit, digits).to(tl.int32), 2 * digits)
        prefix, rest = _next_digit(tl.where(bins < digits, counts, 0).to(tl.int64), bins, prefix, rest, DIGIT_BITS)
    return (prefix << (32 - KEY_BITS)).to(tl.uint32), rest


@triton.jit
def _keep_top_kernel(score_ptr, idx_ptr, count_ptr, k_ptr, out_ptr, kept_ptr, c, width, HKV: tl.constexpr,
                     G: tl.constexpr, TABLE: tl.constexpr, DIGIT_BITS: tl.constexpr, KEY_BITS: tl.constexpr,
                     PDL: tl.constexpr):
    """Program (row, KV head) of re-ranking's keep over at most TABLE candidates, in registers (those up to its
    count): each of the G score rows' top k (:func:`_unit_select`; ties to the lower position) united, then the
    kept candidates' rows written in order, 0 after them to ``width``. A group of one (the per-KV-head rule) counts
    its ties taken and its places in one scan: both running counts packed in an int32 (TABLE < 2**14)."""
    tl.static_assert(TABLE < 16384)
    wait_previous(PDL)
    pid = tl.program_id(0)
    count = tl.minimum(tl.load(count_ptr + pid), c)
    k = tl.minimum(tl.load(k_ptr + pid // HKV).to(tl.int32), c)
    j = tl.arange(0, TABLE)
    # every load issued at once: what lies past the count (not written) is loaded but not used
    inside = j < count
    row = tl.load(idx_ptr + pid.to(tl.int64) * c + j, mask=j < c, other=0)
    kept = tl.zeros([TABLE], dtype=tl.int1)
    for g in tl.static_range(G):
        key = _top_bits(_order_key(tl.load(score_ptr + (pid * G + g).to(tl.int64) * c + j, mask=j < c, other=0.0)),
                        KEY_BITS)
        thr, need = _unit_select(key, inside, k, DIGIT_BITS, KEY_BITS)
        above, tie = inside & (key > thr), inside & (key == thr)
        if G == 1:  # above and ties so far, in one scan; a kept candidate's place is both, the ties capped at need
            counted = tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 14), 0)
            tie = tie & ((counted >> 14) <= need)  # the lower positions first
            at = (counted & 16383) + tl.minimum(counted >> 14, need).to(tl.int32) - 1
        elif tl.sum(tie.to(tl.int32), axis=0) > need:  # more ties than places (equal scores)
            tie = tie & (tl.cumsum(tie.to(tl.int32), 0) <= need)  # the lower positions first
        kept = kept | above | tie
    if G > 1:
        at = tl.cumsum(kept.to(tl.int32), 0) - 1
    total = tl.sum(kept.to(tl.int32), 0)
    out_row = out_ptr + pid.to(tl.int64) * width
    tl.store(out_row + at, row, mask=kept & (at < width))
    tl.store(out_row + j, tl.zeros([TABLE], dtype=row.dtype), mask=(j >= total) & (j < width))
    tl.store(kept_ptr + pid + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32) + total)


@triton.jit
def _prefix(state_ptr, part, own, WORDS: tl.constexpr, LOOK: tl.constexpr, THREADS: tl.constexpr):
    """Decoupled look-back over a pair's parts: part ``part``'s ``own`` [WORDS] counts published (count << 2 | 1,
    or | 2 for part 0, whose counts are their own inclusive sum); the earlier parts' sums found (returned: the
    exclusive prefix) by reading the LOOK parts before at once, back to the nearest whose inclusive sum is
    published (| 2), again while a word between is unpublished (0); then this part's inclusive sum published. The
    words start 0, and programs take parts in the order they started (:func:`_ticket`): a part waits only on parts
    already running, whatever the grid's size. The window holds at least a word for each of the program's THREADS:
    a smaller one would hold a word in several threads, each reading it at its own moment while its part
    publishes, and the window's reductions could mix their copies (an inclusive sum added to the aggregates it
    holds: v94's crash)."""
    tl.static_assert(LOOK * WORDS >= THREADS)
    w, r = tl.arange(0, WORDS), tl.arange(0, LOOK)
    first = (part == 0).to(tl.int32)
    tl.atomic_xchg(state_ptr + part * WORDS + w, (own << 2) | (1 + first), sem="relaxed")
    total = tl.zeros([WORDS], dtype=tl.int32)
    done = tl.zeros([WORDS], dtype=tl.int32) + first
    end = part
    while tl.min(done, axis=0) == 0:
        q = end - 1 - r  # the nearest first; before part 0, inclusive sums of 0
        word = tl.load(state_ptr + q[:, None] * WORDS + w[None, :], mask=(q >= 0)[:, None], other=2, volatile=True)
        flag = word & 3
        stop = tl.min(tl.where(flag == 2, r[:, None], LOOK), axis=0)  # the nearest inclusive sum (LOOK: none)
        upto = r[:, None] <= stop[None, :]
        ready = (done != 0) | (tl.min(tl.where(upto, flag, 1), axis=0) > 0)
        if tl.min(ready.to(tl.int32), axis=0) > 0:
            total += tl.where(done != 0, 0, tl.sum(tl.where(upto, word >> 2, 0), axis=0))
            done = tl.where(stop < LOOK, 1, done)
            end -= LOOK
    if part > 0:
        tl.atomic_xchg(state_ptr + part * WORDS + w, ((total + own) << 2) | 2, sem="relaxed")
    return total


@triton.jit
def _ticket(ticket_ptr, parts):
    """(pair, part) of a program of a look-back scan, in the order the programs started (a zeroed counter's
    increments), so the parts a program waits on (:func:`_prefix`) have all started."""
    ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed")
    return ticket // parts, ticket % parts


def _windows(g_pad: int, warps: int) -> dict:
    """A scan's look-back windows (:func:`_prefix`): LOOK parts of ``g_pad`` tie words, LOOK_ONE of one word of
    choices; LOOK_BACK each, widened to a word per thread of a program of ``warps`` warps."""
    threads = 32 * warps
    return dict(LOOK=max(LOOK_BACK, threads // g_pad), LOOK_ONE=max(LOOK_BACK, threads), THREADS=threads)


@triton.jit
def _keep_scan_kernel(score_ptr, idx_ptr, count_ptr, k_ptr, state_ptr, digits_ptr, scan_ptr, out_ptr, kept_ptr, c,
                      width, parts, sets, rows, HEADS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                      S_PAD: tl.constexpr, BLOCK: tl.constexpr, ROUNDS: tl.constexpr, BITS: tl.constexpr,
                      KEY_BITS: tl.constexpr, LOOK: tl.constexpr, LOOK_ONE: tl.constexpr, THREADS: tl.constexpr,
                      PDL: tl.constexpr):
    """Program (row-KV head, part of BLOCK candidates, in ticket order: :func:`_ticket`) of a keep by scans, in one
    pass: the scores' KEY_BITS keys against each head's threshold, whose last digit (of BITS) it picks from the
    split select's counts (:func:`_split_state`); the ties of each head in earlier parts by look-back
    (:func:`_prefix`; a tie is kept while fewer than the head's ties to take precede it, so ties go to the lower
    positions), then the group's kept candidates before the part, by look-back too; their rows written at that
    offset into the zeroed ``out_ptr`` (so 0 past the total), and the last part writes the total."""
    wait_previous(PDL)
    pair, part = _ticket(scan_ptr, parts)
    ties_state = scan_ptr + 1 + pair.to(tl.int64) * parts * (G_PAD + 1)
    g = tl.arange(0, G_PAD)
    j = part * BLOCK + tl.arange(0, BLOCK)
    live = (g < G)[:, None] & (j < tl.minimum(tl.load(count_ptr + pair), c))[None, :]
    score = tl.load(score_ptr + (pair * G + g)[:, None].to(tl.int64) * c + j[None, :], mask=live, other=0.0)
    key = (_order_key(score) >> (32 - KEY_BITS)).to(tl.int64)
    thr, need = tl.zeros([G_PAD], dtype=tl.int64), tl.zeros([G_PAD], dtype=tl.int64)
    for h in tl.static_range(G):  # (the picks' loads overlap the scores')
        digit, rest = _split_state(digits_ptr, state_ptr, k_ptr, pair * G + h, part, sets, rows, ROUNDS, HEADS,
                                   S_PAD, BITS, KEY_BITS)
        thr, need = tl.where(g == h, digit, thr), tl.where(g == h, rest, need)
    above = live & (key > thr[:, None])
    tie = (live & (key == thr[:, None])).to(tl.int32)
    earlier = _prefix(ties_state, part, tl.sum(tie, axis=1), G_PAD, LOOK, THREADS)
    taken = (tie != 0) & ((tl.cumsum(tie, axis=1) - tie) < (need.to(tl.int32) - earlier)[:, None])
    kept = tl.max((above | taken).to(tl.int32), axis=0)
    own = tl.sum(kept, axis=0)
    before = tl.sum(_prefix(ties_state + parts * G_PAD, part, own + tl.zeros([1], dtype=tl.int32), 1, LOOK_ONE,
                            THREADS), axis=0)
    rows_kept = tl.load(idx_ptr + pair.to(tl.int64) * c + j, mask=kept != 0, other=0)
    tl.store(out_ptr + pair.to(tl.int64) * width + before + tl.cumsum(kept, axis=0) - kept, rows_kept, mask=kept != 0)
    if part == parts - 1:
        tl.store(kept_ptr + pair + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32) + before + own)


def _keep_words(b: int, hkv: int, group: int, c: int, width: int) -> tuple[int, int]:
    """The zeroed int32 words of a keep by scans (:func:`_keep_by_scans`) over ``group`` score rows a (row, KV
    head) of ``c`` candidates, kept ``width`` wide: the scan's ticket and each pair's look-back words, the kept
    rows (0 past each total)."""
    parts = triton.cdiv(c, KEEP_SCAN_BLOCK)
    return 1 + b * hkv * parts * (triton.next_power_of_2(group) + 1), b * hkv * width


def _keep_by_scans(indices: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, width: int,
                   key_bits: int, zeroed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`keep_top` past what one program holds: each score row's threshold by a split select over its
    candidates (RADIX_BITS of the key a round, each program of SPLIT_COLUMNS candidates storing its digits'
    histogram whole: no atomic additions, no zeroed counters), then one pass over parts of KEEP_SCAN_BLOCK
    candidates (:func:`_keep_scan_kernel`): key_bits / RADIX_BITS + 1 launches. (Before, the scoring counted each
    score's 16-bit key by an atomic addition into 256 KB a head, zeroed every step; where the scores crowd a few
    keys, as real keys' do, those queued: this is 30% faster there, at 128K and batch 1 on an H100, and within 4%
    on scores that do not crowd.) ``zeroed``: the keep's zeroed words (:func:`_keep_words`), where the select
    zeroed them with its own (a memset fewer)."""
    b, hkv, c = indices.shape
    heads, group = scores.shape[1], scores.shape[1] // hkv
    rows, sets, rounds = b * heads, triton.cdiv(c, SPLIT_COLUMNS), key_bits // RADIX_BITS
    g_pad, parts = triton.next_power_of_2(group), triton.cdiv(c, KEEP_SCAN_BLOCK)
    device, launch = indices.device, pdl(indices.device)
    digits = torch.empty(rounds * rows * sets << RADIX_BITS, dtype=torch.int32, device=device)
    words = _keep_words(b, hkv, group, c, width)
    if zeroed is None:
        zeroed = torch.zeros(sum(words), dtype=torch.int32, device=device)
    scan, out = zeroed.split(words)
    state = torch.empty(rounds, rows, 2, dtype=torch.int64, device=device)
    kept = torch.empty(b, hkv, dtype=torch.int32, device=device)
    common = dict(HEADS=heads, S_PAD=triton.next_power_of_2(sets), KEY_BITS=key_bits, **launch)
    for r in range(rounds):
        _digit_count_kernel[(rows, sets)](scores, counts, k, state, digits, state, c, 1, sets, rows, ROUND=r,
                                          GROUP=group, BITS=RADIX_BITS, COLUMNS=SPLIT_COLUMNS, COPIES=1, UNIT=True,
                                          SPAN=False, num_warps=SPLIT_WARPS, **common)
    warps = max(4, min(16, g_pad * KEEP_SCAN_BLOCK // 512))
    _keep_scan_kernel[(b * hkv * parts,)](
        scores, indices, counts, k, state, digits, scan, out, kept, c, width, parts, sets, rows, G=group,
        G_PAD=g_pad, BLOCK=KEEP_SCAN_BLOCK, ROUNDS=rounds, BITS=RADIX_BITS, **_windows(g_pad, warps),
        num_warps=warps, **common)
    return out.view(b, hkv, width).to(indices.dtype), kept


def _per_budget(scores: torch.Tensor, hkv: int, budget: str) -> torch.Tensor:
    """``scores`` [B, Hq or Hkv, M] as the budget rule ranks them: each query head's, or under "kv_head" the KV
    group's sums (a scorer may hand those already)."""
    if budget == "kv_head" and scores.shape[1] != hkv:
        return scores.view(scores.shape[0], hkv, -1, scores.shape[-1]).sum(2)
    if budget not in ("query_head", "kv_head"):
        raise ValueError(f"budget must be 'query_head' or 'kv_head', got {budget!r}")
    return scores


KEEP_TABLE = 8192  # candidates up to which re-ranking's keep runs in one program's registers (else by scans)
KEEP_WARPS = 16  # keep_top's most warps (16 candidates a thread up to there: no spills at KEEP_TABLE)
KEEP_DIGIT_BITS = 4  # bits a round of keep_top's select (2, 4 or 8; see _unit_select)
KEEP_SCAN_BLOCK = 1024  # candidates a program of a keep by scans reads


def _keep_width(rows_per_kv: int, k_max: int, c: int) -> int:
    """Places a keep writes a (row, KV head): its score rows' budgets united, at most the ``c`` candidates."""
    return max(1, min(rows_per_kv * min(k_max, c), c))


def keep_top(
    indices: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, k_max: int,
    budget: str = "query_head", key_bits: int = 32, zeroed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`a2ats_hf.kernels.reference.keep_top`: one launch over up to KEEP_TABLE candidates
    (a program per row and KV head); past it, a split select of each score row's threshold and one scan
    (:func:`_keep_by_scans`; ``zeroed``: its zeroed words, from :func:`select_topk`'s own)."""
    check_key_bits(key_bits)
    if KEEP_DIGIT_BITS not in (2, 4, 8):  # (a width not dividing the key's bits would skip its last digits)
        raise ValueError(f"triton_topk.KEEP_DIGIT_BITS must be 2, 4 or 8, got {KEEP_DIGIT_BITS!r}")
    b, hkv, c = indices.shape
    scores = _per_budget(scores, hkv, budget).float().contiguous()
    indices, counts, k = indices.contiguous(), counts.to(torch.int32).contiguous(), k.contiguous()
    width = _keep_width(scores.shape[1] // hkv, k_max, c)
    if c > KEEP_TABLE:
        return _keep_by_scans(indices, counts, scores, k, width, key_bits, zeroed)
    out = torch.empty(b, hkv, width, dtype=indices.dtype, device=indices.device)
    kept = torch.empty(b, hkv, dtype=torch.int32, device=indices.device)
    table = max(16, triton.next_power_of_2(c))
    _keep_top_kernel[(b * hkv,)](
        scores, indices, counts, k, out, kept, c, width, HKV=hkv, G=scores.shape[1] // hkv, TABLE=table,
        DIGIT_BITS=KEEP_DIGIT_BITS, KEY_BITS=key_bits, num_warps=min(KEEP_WARPS, max(4, table // 512)),
        **pdl(indices.device))
    return out, kept


@triton.jit
def _score_kernel(out_ptr, count_ptr, q_ptr, key_ptr, score_ptr, width, hkv, sq_b, sq_h, sk_b, sk_h, sk_l,
                  G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    """Program (pair, block of ROWS places) after the scans: exact ``q . k`` of the chosen tokens written there, by
    each of the pair's G queries into its G score rows (``width`` apart), their key rows gathered at once. (Scored
    inside the last scan, each program after its own scan, the same step's scoring took 2.5 ms against 2.0 here:
    H100, 128K x 1, ``rerank=6`` per query head.)"""
    wait_previous(PDL)
    pair, first = tl.program_id(0), tl.program_id(1) * ROWS
    row, kv = (pair // hkv).to(tl.int64), (pair % hkv).to(tl.int64)
    places = first + tl.arange(0, ROWS)
    ok = places < tl.load(count_ptr + pair)
    if first < tl.load(count_ptr + pair):
        d = tl.arange(0, D_PAD)
        rows = tl.load(out_ptr + pair.to(tl.int64) * width + places, mask=ok, other=0).to(tl.int64)
        keys = tl.load(key_ptr + row * sk_b + kv * sk_h + rows[:, None] * sk_l + d[None, :],
                       mask=ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        for g in tl.static_range(G):
            q = tl.load(q_ptr + row * sq_b + (kv * G + g) * sq_h + d, mask=d < D, other=0.0).to(tl.float32)
            tl.store(score_ptr + (pair.to(tl.int64) * G + g) * width + places, tl.sum(keys * q[None, :], axis=1),
                     mask=ok)


@triton.jit(do_not_specialize=["n", "stride_mb", "out_width", "parts"])  # they change every decode step
def _scan_kernel(
    class_ptr, summary_ptr, codes_ptr, cand_ptr, k_ptr, need_ptr, scan_ptr, out_ptr, count_ptr, n, m, stride_cb,
    stride_ch, stride_mb, out_width, parts, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, WORDS: tl.constexpr, PACKED: tl.constexpr, HEAD_BYTES: tl.constexpr, LOOK: tl.constexpr,
    LOOK_ONE: tl.constexpr, THREADS: tl.constexpr, PDL: tl.constexpr,
):
    """Program (pair, part of BLOCK_N tokens, in ticket order: :func:`_ticket`), one pass: each head's ties in
    the part counted, those in earlier parts found by look-back (:func:`_prefix`), the group's choice in the part
    (a tie is taken while fewer than the head's remaining budget of ties precede it, so ties go to the lowest token
    indices) counted, the choices before the part found by look-back too, and the chosen indices written at that
    offset into the zeroed ``out_ptr``; the last part writes the count."""
    wait_previous(PDL)
    pair, part = _ticket(scan_ptr, parts)
    row = pair // HKV
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    k = tl.load(k_ptr + row).to(tl.int32)
    need = tl.load(need_ptr + pair * G + g, mask=g_ok, other=0)
    active = g_ok & ((g * 0 + k) > 0)
    class_rows = class_ptr + pair.to(tl.int64) * m * (1 if WORDS else G_PAD)
    tokens = part * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = tokens < n
    code = tl.load(codes_ptr + row.to(tl.int64) * stride_cb + (pair % HKV).to(tl.int64) * stride_ch + tokens,
                   mask=t_ok, other=0).to(tl.int32)
    cand = (tl.load(cand_ptr + row.to(tl.int64) * stride_mb + tokens, mask=t_ok, other=0) != 0) & t_ok
    if WORDS:  # the summary first; the group's class word only for tokens tied for some head, others stand for it
        # with byte 0 (2: above for some head, so united; 0: below for every head)
        looked = cand & ((tokens * 0 + k) > 0)
        flags = (tl.load(summary_ptr + pair.to(tl.int64) * tl.cdiv(m, 16) + (code >> 4), mask=looked, other=0)
                 >> ((code & 15) * 2)) & 3
        word = tl.load(class_rows + code, mask=looked & ((flags & 1) != 0), other=0).to(tl.int64)
        word = tl.where((flags & 1) != 0, word, flags & 2)
    if PACKED:  # byte g of the token's word is head g's class; counted without unpacking to a tile
        word = word & HEAD_BYTES
        tie_bits = word & 0x01010101
        lanes = (tie_bits & 1) | (((tie_bits >> 8) & 1) << 16)  # one 16-bit counter per head
        lanes |= (((tie_bits >> 16) & 1) << 32) | (((tie_bits >> 24) & 1) << 48)
        here = ((tl.sum(lanes, axis=0) >> (16 * g).to(tl.int64)) & 0xFFFF).to(tl.int32)
    else:
        live = active[:, None] & cand[None, :]
        if WORDS:
            category = tl.where(live, (word[None, :] >> (8 * g[:, None]).to(word.dtype)) & 0xFF, 0)
        else:
            category = tl.load(class_rows + code[None, :] * G_PAD + g[:, None], mask=live, other=0)
        here = tl.sum((category == 1).to(tl.int32), axis=1)
    ties_state = scan_ptr + 1 + pair.to(tl.int64) * parts * (G_PAD + 1)
    ties_seen = _prefix(ties_state, part, here, G_PAD, LOOK, THREADS)
    # Ties are all taken while the head's budget lasts past this part, none once it ran out before it; only the
    # part where it runs out ranks them (a scan over a [group, block] tile).
    if tl.max(((ties_seen < need) & (ties_seen + here > need)).to(tl.int32), axis=0) > 0:
        if PACKED:
            category = tl.where(active[:, None], (word[None, :] >> (8 * g[:, None]).to(tl.int64)) & 0xFF, 0)
        tie = (category == 1).to(tl.int32)
        take_ties = (tie != 0) & ((tl.cumsum(tie, axis=1) - tie + ties_seen[:, None]) < need[:, None])
        union = tl.max(((category == 2) | take_ties).to(tl.int32), axis=0)
    elif PACKED:
        byte = tl.full([G_PAD], 1, tl.int64) << (8 * g).to(tl.int64)
        taken = tl.sum(tl.where(g_ok & (ties_seen < need), byte, 0), axis=0)  # heads whose ties are all in
        union = (((word & 0x02020202) != 0) | ((tie_bits & taken) != 0)).to(tl.int32)
    else:
        union = tl.max(((category == 2) | ((category == 1) & (ties_seen < need)[:, None])).to(tl.int32), axis=0)
    own = tl.sum(union, axis=0)
    before = tl.sum(_prefix(ties_state + parts * G_PAD, part, own + tl.zeros([1], dtype=tl.int32), 1, LOOK_ONE,
                            THREADS), axis=0)
    slot = tl.cumsum(union, axis=0) - union + before
    tl.store(out_ptr + pair.to(tl.int64) * out_width + slot, tokens, mask=union != 0)
    if part == parts - 1:
        tl.store(count_ptr + pair + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32) + before + own)


SCAN_BLOCK = 512  # codes a scan program reads (default of ``block_n``)
SCAN_WARPS = 4  # warps per scan program
SCORE_ROWS = 32  # chosen tokens a scoring program gathers and scores (re-ranking's; 64: 45 against 36 us a layer)
SCORE_WARPS = 4  # warps per scoring program
THRESHOLD_WARPS = 8


def select_topk(
    lut: torch.Tensor,
    codes: torch.Tensor,
    candidates: torch.Tensor,
    k: torch.Tensor,
    budget: str = "query_head",
    histogram: torch.Tensor | None = None,
    k_max: int | None = None,
    block_n: int | None = None,
    key_bits: int = 32,
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep: Keep | None = None,
) -> tuple[torch.Tensor, ...]:
    """Same contract as the torch reference, with int32 indices [B, Hkv, W] (W = an upper bound on the counts,
    entries past each count are 0) and int32 counts [B, Hkv]; with ``exact``, float32 scores [B, H, W] third, of
    the chosen tokens, by a launch after the scans (:func:`_score_chosen`; past each count not written); with
    ``keep`` too, :func:`keep_top` of those (a keep by scans takes its zeroed words from the select's: a memset
    fewer).

    ``codes`` may be a view [B, Hkv, N] of a longer buffer; ``histogram`` [B, Hkv, M] int32 (a view of wider rows
    is fine) counts each KV head's
    candidate codes (:func:`code_histogram`), computed here when not given (a cache keeps it up to date instead);
    ``k_max`` bounds ``k`` from the host, read from ``k`` (a device sync) when not given.
    """
    check_key_bits(key_bits)
    if keep is not None and exact is None:
        raise ValueError("select_topk's keep needs exact scores: pass exact=(query, keys) too")
    b, hkv, n = codes.shape
    block_n = block_n or SCAN_BLOCK
    lut = _per_budget(lut, hkv, budget).float().contiguous()
    m = lut.shape[-1]
    group = lut.shape[1] // hkv
    if histogram is None:
        histogram = code_histogram(codes, candidates, m)
    if k_max is None:
        k_max = int(k.max()) if k.numel() else 0
    width = max(1, min(group * k_max, n))
    words = triton.cdiv(m, 16)  # the summary's int32 words per pair
    heads, g_pad, parts = lut.shape[1], triton.next_power_of_2(group), triton.cdiv(n, block_n)
    by_scans = keep is not None and width > KEEP_TABLE  # the keep then goes by scans: its zeroed words come here
    keep_words = ()
    if by_scans:  # over its score rows a KV head, as keep_top ranks them (:func:`_per_budget`)
        kept_rows = 1 if keep.budget == "kv_head" else exact[0].shape[1] // hkv
        keep_words = _keep_words(b, hkv, kept_rows, width, _keep_width(kept_rows, keep.k_max, width))
    sizes = [_counters(m, b * heads, key_bits), b * hkv * width, b * hkv * words, 1 + b * hkv * parts * (g_pad + 1),
             sum(keep_words)]
    counted, indices, summary, scan, zeroed = torch.zeros(sum(sizes), dtype=torch.int32,
                                                          device=codes.device).split(sizes)
    indices, summary = indices.view(b, hkv, width), summary.view(b * hkv, words)
    counts = torch.empty(b, hkv, dtype=torch.int32, device=codes.device)
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    cand = candidates if candidates.stride(-1) == 1 else candidates.contiguous()  # bool, read as such
    need = torch.empty(b, heads, dtype=torch.int32, device=codes.device)
    classes = torch.empty(b * hkv, m, g_pad, dtype=torch.uint8, device=codes.device)  # padding bytes: masked
    histogram = histogram.to(torch.int32)
    if histogram.stride(-1) != 1 or histogram.stride(0) != hkv * histogram.stride(1):  # rows of one stride
        histogram = histogram.contiguous()
    _thresholds(lut, histogram, k.contiguous(), need, classes, summary, counted, group, g_pad, key_bits)
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(g_pad)
    entries = classes.view(word).view(b * hkv, m) if word else classes
    _scan_kernel[(b * hkv * parts,)](
        entries, summary, codes, cand, k, need, scan, indices, counts, n, m, codes.stride(0), codes.stride(1),
        cand.stride(0), width, parts, HKV=hkv, G=group, G_PAD=g_pad, BLOCK_N=block_n, WORDS=word is not None,
        PACKED=g_pad <= 4, HEAD_BYTES=(1 << 8 * group) - 1, **_windows(g_pad, SCAN_WARPS), num_warps=SCAN_WARPS,
        **pdl(codes.device))
    if exact is None:
        return indices, counts
    scores = _score_chosen(exact, indices, counts, heads)
    if keep is None:
        return indices, counts, scores
    return keep_top(indices, counts, scores, keep.k, keep.k_max, keep.budget, keep.key_bits,
                    zeroed if by_scans else None)


def _score_chosen(exact: tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor, counts: torch.Tensor,
                  heads: int) -> torch.Tensor:
    """Exact scores [B, H, W] float32 of the chosen ``indices`` [B, Hkv, W] (up to each of ``counts``; past them
    not written) by ``exact``'s query [B, H, D] (H a multiple of the ``heads`` that chose: each scores its
    chooser's tokens) against its keys [B, Hkv, >= N, D] (:func:`_score_kernel`, a program per SCORE_ROWS
    places)."""
    query, keys = exact
    b, hkv, width = indices.shape
    if query.shape[0] != b or query.shape[1] % heads or query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"exact scores need a query [{b}, a multiple of {heads}, D] and keys [B, Hkv, N, D], got "
                         f"{tuple(query.shape)} and {tuple(keys.shape)}")
    query = query if query.stride(-1) == 1 else query.contiguous()
    assert keys.stride(-1) == 1
    scores = torch.empty(b, query.shape[1], width, dtype=torch.float32, device=query.device)
    d = query.shape[-1]
    _score_kernel[(b * hkv, triton.cdiv(width, SCORE_ROWS))](
        indices, counts, query, keys, scores, width, hkv, query.stride(0), query.stride(1), *keys.stride()[:3],
        G=query.shape[1] // hkv, D=d, D_PAD=max(16, triton.next_power_of_2(d)), ROWS=SCORE_ROWS,
        num_warps=SCORE_WARPS, **pdl(query.device))
    return scores
