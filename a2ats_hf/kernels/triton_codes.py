"""Triton kernels for the codes side of a decode step: encoding the new keys (un-rotate, whiten, nearest centroid,
written straight into the code buffer) and the lookup table (turn the query, score every centroid; in the same
launch, the distance scorer's columns moved on). Each is one launch where the torch reference
(:func:`a2ats_hf.kernels.reference.encode_keys`, :func:`~a2ats_hf.kernels.reference.rotated_lookup_table`) takes
twenty to forty small operations, which on a GPU cost more host time than the arithmetic: the host time of these
operations is what bounds decode with the K/V on the GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import ColumnMove
from .triton_launch import pdl, wait_previous


@triton.jit
def _rotate_half(ptr, d, ok, ROT: tl.constexpr):
    """RoPE's ``rotate_half`` of the vector at ``ptr + d`` (where ``ok``) over its leading ROT dimensions (0
    beyond them), float32."""
    half: tl.constexpr = ROT // 2
    partner = tl.load(ptr + tl.where(d < half, d + half, d - half), mask=ok & (d < ROT), other=0.0).to(tl.float32)
    return tl.where(d < half, -partner, partner)


@triton.jit
def _rotate(x, half_turned, d, ok, cos_ptr, sin_ptr, ROT: tl.constexpr):
    """``x`` [..., D_PAD] rotated by ``cos``/``sin`` (read where ``ok``) over its leading ROT dimensions (RoPE's
    ``x * cos + rotate_half(x) * sin``, ``half_turned`` from :func:`_rotate_half`); the others pass through."""
    cos = tl.load(cos_ptr + d, mask=ok & (d < ROT), other=1.0)
    sin = tl.load(sin_ptr + d, mask=ok & (d < ROT), other=0.0)
    return x * cos + half_turned * sin


@functools.cache
def _dot_precision(device: torch.device) -> str:
    """float32 products on tensor cores as three TF32 ones where there are (Ampere on), else plain float32."""
    return "tf32x3" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _encode_kernel(k_ptr, cos_ptr, sin_ptr, w_ptr, c_ptr, norm_ptr, best_ptr, code_ptr, T, M, PER_SPLIT,
                   sk_b, sk_h, sk_t, sr_b, sr_t,
                   H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr, BLOCK_M: tl.constexpr,
                   SPLITS: tl.constexpr):
    """Program (row, KV head, token; split of the centroids): the key un-rotated (ROT > 0), whitened, and the
    nearest of the split's PER_SPLIT whitened centroids (the first of equals), its distance less ||z||^2 and index
    stored for :func:`_encode_reduce_kernel`. Splitting the centroids puts a decode step's few keys on many
    programs (one program per key left most of the GPU idle: 115 us a layer at batch 1)."""
    pid, split = tl.program_id(0), tl.program_id(1)
    t, bh = pid % T, pid // T
    b, h = bh // H, bh % H
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    base = k_ptr + b * sk_b + h * sk_h + t * sk_t
    x = tl.load(base + d, mask=d_ok, other=0.0).to(tl.float32)
    if ROT > 0:
        x = _rotate(x, _rotate_half(base, d, d_ok, ROT), d, d_ok, cos_ptr + b * sr_b + t * sr_t,
                    sin_ptr + b * sr_b + t * sr_t, ROT)
    w = tl.load(w_ptr + h * D * D + d[:, None] * D + d[None, :], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    z = tl.sum(x[:, None] * w, axis=0)  # [D_PAD]: x @ W
    best = float("inf")
    code = 0
    lo = split * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, M)
    for m0 in range(lo, hi, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < hi
        c = tl.load(c_ptr + h * M * D + m[:, None] * D + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        dist = tl.load(norm_ptr + h * M + m, mask=m_ok, other=float("inf")) - 2.0 * tl.sum(c * z[None, :], axis=1)
        low = tl.min(dist, axis=0)
        first = tl.min(tl.where(dist == low, m, M), axis=0)
        code = tl.where(low < best, first, code)
        best = tl.minimum(low, best)
    tl.store(best_ptr + pid * SPLITS + split, best)
    tl.store(code_ptr + pid * SPLITS + split, code)


@triton.jit
def _encode_reduce_kernel(best_ptr, code_ptr, out_ptr, column_ptr, T, so_b, so_h, so_t, H: tl.constexpr,
                          SPLITS: tl.constexpr, S_PAD: tl.constexpr, AT_COLUMN: tl.constexpr):
    """Program (row, KV head, token): the nearest of the splits' nearest centroids (the first of equals: splits
    hold ascending centroids) written as the key's code (AT_COLUMN: at the column ``column_ptr`` holds + token)."""
    pid = tl.program_id(0)
    t, bh = pid % T, pid // T
    b, h = bh // H, bh % H
    s = tl.arange(0, S_PAD)
    best = tl.load(best_ptr + pid * SPLITS + s, mask=s < SPLITS, other=float("inf"))
    codes = tl.load(code_ptr + pid * SPLITS + s, mask=s < SPLITS, other=2**30)
    low = tl.min(best, axis=0)
    code = tl.min(tl.where(best == low, codes, 2**30), axis=0)
    at = t + tl.load(column_ptr).to(tl.int64) if AT_COLUMN else t
    tl.store(out_ptr + b * so_b + h * so_h + at * so_t, code.to(out_ptr.dtype.element_ty))


ENCODE_PROGRAMS_PER_UNIT = 2  # the encoder's programs per multiprocessor (a decode step's few keys, split)
ENCODE_WARPS = 8
LUT_BLOCK_M = 64  # centroids per LUT program (at most; fewer where a tile would pass 32 KB)


@functools.cache
def _units(device: torch.device) -> int:
    """Multiprocessors of ``device``; 8 under the interpreter, so the CPU's tests run the splits too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def encode_keys(
    keys: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None, whitener: torch.Tensor,
    whitened_centroids: torch.Tensor, norms: torch.Tensor, out: torch.Tensor, column: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`a2ats_hf.kernels.reference.encode_keys`; programs per (row, KV head, token) and
    split of the centroids, so meant for decode's few tokens (a prompt's many go through the matmul of the
    reference)."""
    b, h, t, d = keys.shape
    m = whitened_centroids.shape[1]
    keys = _unit_stride(keys)
    whitener, centroids = whitener.float().contiguous(), whitened_centroids.float().contiguous()
    norms = norms.float().contiguous()
    if rotation is None:
        cos = sin = norms  # not read
        rot, strides = 0, (0, 0)
    else:
        cos, sin = (_unit_stride(r.float().expand(b, 1, t, -1)) for r in rotation)  # views: no copy, no launch
        rot, strides = cos.shape[-1], (cos.stride(0), cos.stride(2))
    d_pad = triton.next_power_of_2(d)
    block_m = max(16, min(128, 8192 // d_pad))
    blocks = triton.cdiv(m, block_m)
    splits = max(1, min(blocks, ENCODE_PROGRAMS_PER_UNIT * _units(keys.device) // (b * h * t)))
    per_split = triton.cdiv(blocks, splits) * block_m
    splits = triton.cdiv(m, per_split)  # none empty
    best = torch.empty(b * h * t, splits, dtype=torch.float32, device=keys.device)
    codes = torch.empty(b * h * t, splits, dtype=torch.int32, device=keys.device)
    _encode_kernel[(b * h * t, splits)](
        keys, cos, sin, whitener, centroids, norms, best, codes, t, m, per_split, *keys.stride()[:3], *strides,
        H=h, D=d, D_PAD=d_pad, ROT=rot, BLOCK_M=block_m, SPLITS=splits, num_warps=ENCODE_WARPS,
    )
    _encode_reduce_kernel[(b * h * t,)](best, codes, out, codes if column is None else column, t, *out.stride(), H=h,
                                        SPLITS=splits, S_PAD=triton.next_power_of_2(splits),
                                        AT_COLUMN=column is not None)
    return out


@triton.jit
def _lut_block(q_ptr, cos_ptr, sin_ptr, c_ptr, out_ptr, h, block, M, R, ROWS, sq_b, sq_h, sr_b, sr_r,
               HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, SUMMED: tl.constexpr):
    """KV head ``h``'s block ``block`` of centroids: the block read once, then for each tile of BLOCK_R (row, query
    head of the group, rotation) triples the turned queries against it as one tensor-core product (PRECISION
    "tf32x3": float32's accuracy from three TF32 products; the CUDA cores' float32 took ~0.7 ms a layer at 12
    rotations x 4096 centroids). Each of the G heads is the sum of SUMMED query heads as it reads them (the
    per-KV-head rule's summed query, without a launch of its own; rotations are linear)."""
    d = tl.arange(0, D_PAD)
    m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    c = tl.load(c_ptr + h * M * D + m[:, None] * D + d[None, :], mask=m_ok[:, None] & (d < D)[None, :], other=0.0)
    for tile in range(0, ROWS, BLOCK_R):
        rho = tile + tl.arange(0, BLOCK_R)  # (row b, head g of the group, rotation r), r fastest
        ok = (rho < ROWS)[:, None]
        b, g, r = rho // (G * R), (rho // R) % G, rho % R
        heads = h * G + g
        turned = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
        half_turned = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
        for s in tl.static_range(SUMMED):
            rows = q_ptr + b[:, None] * sq_b + (heads * SUMMED + s)[:, None] * sq_h
            turned += tl.load(rows + d[None, :], mask=ok & (d < D)[None, :], other=0.0).to(tl.float32)
            if ROT > 0:
                half_turned += _rotate_half(rows, d[None, :], ok, ROT)
        if ROT > 0:
            turn = (b * sr_b + r * sr_r)[:, None]
            turned = _rotate(turned, half_turned, d[None, :], ok, cos_ptr + turn, sin_ptr + turn, ROT)
        lut = tl.dot(turned, tl.trans(c), input_precision=PRECISION)  # [BLOCK_R, BLOCK_M]
        out = out_ptr + ((b[:, None] * HKV * G + heads[:, None]) * R + r[:, None]) * M + m[None, :]
        tl.store(out, lut, mask=ok & m_ok[None, :])


@triton.jit
def _move_columns(col_ptr, hist_ptr, code_ptr, far_ptr, starts_ptr, n_ptr, n, m, window, S, b, h,
                  sc_b, sc_h, sh_b, sh_h, sk_b, sk_h, sf_b, S_PAD: tl.constexpr, N_ON_DEVICE: tl.constexpr):
    """Row ``b``, KV head ``h``: its columns and histogram moved on by one token, every bucket's crossing token at
    once (they sit at distinct positions; two may share a column value, so the histogram's updates are atomic
    additions, which commute). N_ON_DEVICE: the length is read from ``n_ptr`` (a capture-ready step), and a bucket
    that starts past the tokens moves none."""
    cols, hist = col_ptr + b * sc_b + h * sc_h, hist_ptr + b * sh_b + h * sh_h
    if N_ON_DEVICE:
        n = tl.load(n_ptr).to(tl.int32)
    last = n - 1
    tl.store(cols + last, tl.load(code_ptr + b * sk_b + h * sk_h + last).to(tl.int32))
    i = tl.arange(0, S_PAD)
    c = last - tl.load(starts_ptr + i, mask=i < S, other=0).to(tl.int32)
    live = (i < S) & (c >= 0)
    c = tl.maximum(c, 0)
    old = tl.load(cols + c, mask=live, other=0)
    tl.store(cols + c, old + m, mask=live)
    w = tl.load(far_ptr + b * sf_b + c, mask=live, other=0).to(tl.int32)
    tl.atomic_add(hist + old, -w, mask=live & (w != 0), sem="relaxed")
    tl.atomic_add(hist + old + m, w, mask=live & (w != 0), sem="relaxed")
    left = last - window  # the token that just left the window (bucket 0 reaches past it: it did not move)
    if left >= 0:
        tl.atomic_add(hist + tl.load(cols + left), tl.load(far_ptr + b * sf_b + left).to(tl.int32), sem="relaxed")


@triton.jit
def _lut_kernel(q_ptr, cos_ptr, sin_ptr, c_ptr, out_ptr, M, R, ROWS, sq_b, sq_h, sr_b, sr_r,
                col_ptr, hist_ptr, code_ptr, far_ptr, starts_ptr, n_ptr, n, window, S,
                sc_b, sc_h, sh_b, sh_h, sk_b, sk_h, sf_b,
                HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, MOVE: tl.constexpr,
                S_PAD: tl.constexpr, N_ON_DEVICE: tl.constexpr, SUMMED: tl.constexpr, PDL: tl.constexpr):
    """Program (KV head, block of centroids): :func:`_lut_block`. MOVE: the programs past the blocks, one a row,
    move the distance scorer's columns (:func:`_move_columns`), which the table does not read."""
    wait_previous(PDL)
    h, block = tl.program_id(0), tl.program_id(1)
    blocks = tl.cdiv(M, BLOCK_M)
    if MOVE:
        if block >= blocks:
            _move_columns(col_ptr, hist_ptr, code_ptr, far_ptr, starts_ptr, n_ptr, n, M, window, S, block - blocks,
                          h, sc_b, sc_h, sh_b, sh_h, sk_b, sk_h, sf_b, S_PAD, N_ON_DEVICE)
    if block < blocks:
        _lut_block(q_ptr, cos_ptr, sin_ptr, c_ptr, out_ptr, h, block, M, R, ROWS, sq_b, sq_h, sr_b, sr_r, HKV, G, D,
                   D_PAD, ROT, BLOCK_R, BLOCK_M, PRECISION, SUMMED)


def rotated_lookup_table(
    query: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None, centroids: torch.Tensor,
    move: ColumnMove | None = None, summed: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`a2ats_hf.kernels.reference.rotated_lookup_table`: query [B, Hq, D], R rotations
    ``cos``/``sin`` [B, 1, R, D'] (or none), centroids [Hkv, M, D] -> lut [B, Hq, R * M] float32 (``summed``:
    [B, Hkv, R * M], of each KV group's queries summed); with ``move``, a program per row and KV head more moves
    the columns."""
    b, hq, d = query.shape
    hkv, m = centroids.shape[0], centroids.shape[1]
    summed_heads = hq // hkv if summed else 1
    group, hq = hq // hkv // summed_heads, hq // summed_heads
    query = _unit_stride(query)
    centroids = centroids.float().contiguous()
    if rotation is None:
        cos = sin = centroids  # not read
        rot, turns, strides = 0, 1, (0, 0)
    else:
        turns = rotation[0].shape[2]
        cos, sin = (_unit_stride(t.float().expand(b, 1, turns, -1)) for t in rotation)
        rot, strides = cos.shape[-1], (cos.stride(0), cos.stride(2))
    lut = torch.empty(b, hq, turns * m, dtype=torch.float32, device=query.device)
    rows, d_pad = b * group * turns, max(16, triton.next_power_of_2(d))
    block_m = max(16, min(LUT_BLOCK_M, 8192 // d_pad))  # the centroid block and a tile of turned queries
    block_r = max(16, min(block_m, triton.next_power_of_2(rows)))
    blocks = triton.cdiv(m, block_m)
    assert move is None or move.m == m, "the columns' centroids per bucket are the table's"
    arguments, constants = _move_arguments(move, lut, hkv)
    _lut_kernel[(hkv, blocks + (b if move else 0))](
        query, cos, sin, centroids, lut, m, turns, rows, query.stride(0), query.stride(1), *strides, *arguments,
        HKV=hkv, G=group, D=d, D_PAD=d_pad, ROT=rot, BLOCK_R=block_r, BLOCK_M=block_m,
        PRECISION=_dot_precision(query.device), SUMMED=summed_heads, num_stages=1, **constants, **pdl(query.device),
    )
    return lut


def _move_arguments(move: ColumnMove | None, lut: torch.Tensor, hkv: int) -> tuple[list, dict]:
    """:func:`_lut_kernel`'s arguments and constants for ``move`` (for none, the table's own: not read)."""
    if move is None:
        return [lut] * 6 + [0] * 10, dict(MOVE=False, S_PAD=2, N_ON_DEVICE=False)
    columns, histogram, codes, far, starts = move.columns, move.histogram, move.codes, move.far, move.starts
    assert columns.stride(-1) == histogram.stride(-1) == codes.stride(-1) == far.stride(-1) == 1
    assert columns.shape[:2] == (lut.shape[0], hkv)
    on_device = isinstance(move.n, torch.Tensor)
    arguments = [columns, histogram, codes, far, starts, move.n if on_device else starts, 0 if on_device else move.n,
                 move.window, starts.numel(), columns.stride(0), columns.stride(1), histogram.stride(0),
                 histogram.stride(1), codes.stride(0), codes.stride(1), far.stride(0)]
    return arguments, dict(MOVE=True, S_PAD=max(2, triton.next_power_of_2(starts.numel())), N_ON_DEVICE=on_device)
