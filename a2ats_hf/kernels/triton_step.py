"""Triton kernels for the small writes of a capture-ready decode step (:mod:`a2ats_hf.graphs`), where the new
token's column is a device tensor: its K/V into the store and the window ring, and the code of the token leaving
the window into the histogram. Each is one launch where the torch reference
(:func:`a2ats_hf.kernels.reference.write_token`, :func:`~a2ats_hf.kernels.reference.count_leaving`) takes five to
ten; in a captured step every launch is a graph node (~2 us each, ~30 layers)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_token_kernel(k_ptr, v_ptr, sk_ptr, sv_ptr, lk_ptr, lv_ptr, column_ptr, sink, window,
                        sk_b, sk_h, sv_b, sv_h, ssk_b, ssk_h, ssk_l, ssv_b, ssv_h, ssv_l,
                        slk_b, slk_h, slk_l, slv_b, slv_h, slv_l,
                        H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, STORE: tl.constexpr):
    """Program (row, KV head): the token's key and value at the store's column (STORE: a device store) and at the
    ring's slot for it."""
    pid = tl.program_id(0)
    b, h = (pid // H).to(tl.int64), (pid % H).to(tl.int64)  # offsets past 2**31: a large batch's store
    d = tl.arange(0, D_PAD)
    ok = d < D
    column = tl.load(column_ptr).to(tl.int64)
    slot = sink + column % window
    key = tl.load(k_ptr + b * sk_b + h * sk_h + d, mask=ok)
    value = tl.load(v_ptr + b * sv_b + h * sv_h + d, mask=ok)
    if STORE:
        tl.store(sk_ptr + b * ssk_b + h * ssk_h + column * ssk_l + d, key.to(sk_ptr.dtype.element_ty), mask=ok)
        tl.store(sv_ptr + b * ssv_b + h * ssv_h + column * ssv_l + d, value.to(sv_ptr.dtype.element_ty), mask=ok)
    tl.store(lk_ptr + b * slk_b + h * slk_h + slot * slk_l + d, key.to(lk_ptr.dtype.element_ty), mask=ok)
    tl.store(lv_ptr + b * slv_b + h * slv_h + slot * slv_l + d, value.to(lv_ptr.dtype.element_ty), mask=ok)


def write_token(
    key: torch.Tensor, value: torch.Tensor, store_keys: torch.Tensor | None, store_values: torch.Tensor | None,
    local_keys: torch.Tensor, local_values: torch.Tensor, column: torch.Tensor, sink: int, window: int,
) -> None:
    """Same contract as :func:`a2ats_hf.kernels.reference.write_token`."""
    b, h, _, d = key.shape
    store = store_keys is not None
    if not store:  # the ring alone (stand-ins for the pointers, not written)
        store_keys, store_values = local_keys, local_values
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    _write_token_kernel[(b * h,)](
        key, value, store_keys, store_values, local_keys, local_values, column, sink, window,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), *store_keys.stride()[:3],
        *store_values.stride()[:3], *local_keys.stride()[:3], *local_values.stride()[:3],
        H=h, D=d, D_PAD=triton.next_power_of_2(d), STORE=store,
    )


@triton.jit
def _count_leaving_kernel(hist_ptr, codes_ptr, far_ptr, column_ptr, column, offset, sh_b, sh_h, sc_b, sc_h, sf_b,
                          H: tl.constexpr, ON_DEVICE: tl.constexpr):
    """Program (row, KV head): +1 at the leaving token's code where it is a far candidate (ON_DEVICE: the column is
    read from ``column_ptr``)."""
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    if ON_DEVICE:
        column = tl.load(column_ptr).to(tl.int64)
    column = column + offset
    at = tl.maximum(column, 0)
    counted = (column >= 0) & (tl.load(far_ptr + b * sf_b + at) != 0)
    code = tl.load(codes_ptr + b * sc_b + h * sc_h + at).to(tl.int64)
    tl.atomic_add(hist_ptr + b * sh_b + h * sh_h + code, counted.to(tl.int32), sem="relaxed")


def count_leaving(histogram: torch.Tensor, codes: torch.Tensor, far: torch.Tensor, column: int | torch.Tensor,
                  offset: int) -> None:
    """Same contract as :func:`a2ats_hf.kernels.reference.count_leaving`."""
    b, h, _ = histogram.shape
    on_device = isinstance(column, torch.Tensor)
    _count_leaving_kernel[(b * h,)](histogram, codes, far, column if on_device else histogram,
                                    0 if on_device else column, offset, histogram.stride(0), histogram.stride(1),
                                    codes.stride(0), codes.stride(1), far.stride(0), H=h, ON_DEVICE=on_device)
