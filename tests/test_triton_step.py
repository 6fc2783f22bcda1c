"""The capture-ready step's fused writes against the torch references, on random inputs of awkward sizes (under
TRITON_INTERPRET=1 without a GPU): head dims that are not powers of two, columns that wrap the window ring, a
leaving token that is no candidate, and none leaving yet."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf.kernels import reference, triton_step

from conftest import DEVICE, compile_for_hopper

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"),
    reason="needs a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)",
)
KERNEL_DEVICE = DEVICE if DEVICE.type == "cuda" else torch.device("cpu")


@pytest.mark.parametrize("b, h, d, sink, window, column, dtype", [
    (2, 3, 24, 2, 5, 17, torch.bfloat16), (1, 1, 64, 0, 8, 3, torch.float32), (3, 2, 80, 4, 7, 100, torch.float16)])
def test_write_token_matches_reference(b, h, d, sink, window, column, dtype):
    g = torch.Generator().manual_seed(column)
    key, value = torch.randn(2, b, h, 1, d, generator=g).to(dtype)  # the model's dtype, as the store's
    store = torch.randn(2, b, h, 128, d, generator=g).to(dtype)
    local = torch.randn(2, b, h, sink + window, d, generator=g).to(dtype)
    at = torch.tensor([column])
    expected_store, expected_local = store.clone(), local.clone()
    reference.write_token(key, value, *expected_store, *expected_local, at, sink, window)
    got_store, got_local = store.to(KERNEL_DEVICE), local.to(KERNEL_DEVICE)
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    triton_step.write_token(to(key), to(value), *got_store, *got_local, to(at), sink, window)
    assert torch.equal(got_store.cpu(), expected_store) and torch.equal(got_local.cpu(), expected_local)
    assert torch.equal(expected_store[0][:, :, column], key[:, :, 0])  # the reference did write them
    assert torch.equal(expected_local[1][:, :, sink + column % window], value[:, :, 0])
    ring_only = local.to(KERNEL_DEVICE)  # a store in CPU memory: the ring alone is written
    triton_step.write_token(to(key), to(value), None, None, *ring_only, to(at), sink, window)
    assert torch.equal(ring_only.cpu(), expected_local)


@pytest.mark.parametrize("column, offset", [(40, -7), (3, -7), (7, -7), (59, 0)])
def test_count_leaving_matches_reference(column, offset):
    g = torch.Generator().manual_seed(column)
    b, h, m = 3, 2, 37
    codes = torch.randint(0, m, (b, h, 64), generator=g, dtype=torch.int32).to(torch.uint16)
    far = torch.rand(b, 64, generator=g) > 0.4
    far[0, max(column + offset, 0)] = False  # one row where the leaving token is no candidate
    histogram = torch.randint(0, 5, (b, h, m), generator=g, dtype=torch.int32)
    expected = histogram.clone()
    reference.count_leaving(expected, codes, far, torch.tensor([column]), offset)
    got = histogram.clone().to(KERNEL_DEVICE)
    triton_step.count_leaving(got, codes.to(KERNEL_DEVICE), far.to(KERNEL_DEVICE),
                              torch.tensor([column], device=KERNEL_DEVICE), offset)
    assert torch.equal(got.cpu(), expected)
    for kernel in (reference.count_leaving, triton_step.count_leaving):  # the eager step's host column: the same
        from_host = histogram.clone().to(KERNEL_DEVICE)
        kernel(from_host, codes.to(KERNEL_DEVICE), far.to(KERNEL_DEVICE), column, offset)
        assert torch.equal(from_host.cpu(), expected)
    added = int((expected - histogram).sum())
    leaving = column + offset
    assert added == (0 if leaving < 0 else int(far[:, leaving].sum()) * h)


@pytest.mark.parametrize("on_device", [False, True])
def test_count_leaving_compiles_for_hopper(on_device):
    """The leaving token's count compiles to PTX for sm_90 without a GPU."""
    compile_for_hopper("triton_step", "_count_leaving_kernel", {"H": 8, "ON_DEVICE": on_device},
                       {"codes_ptr": "*u16", "far_ptr": "*i1", "column_ptr": "*i64"})
