"""The Triton window attention and log-sum-exp merge against the torch reference, on random inputs of awkward sizes
(under TRITON_INTERPRET=1 without a GPU): grouped heads, head dims that are not powers of two, masked keys, rows with
no valid key at all."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf.kernels import reference, triton_attention

from conftest import DEVICE

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"),
    reason="needs a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)",
)
KERNEL_DEVICE = DEVICE if DEVICE.type == "cuda" else torch.device("cpu")


@pytest.mark.parametrize(
    "b, hq, hkv, length, d, dtype",
    [(2, 6, 2, 37, 16, torch.float32), (1, 9, 3, 72, 64, torch.bfloat16), (3, 4, 4, 5, 80, torch.float32),
     (1, 12, 1, 100, 24, torch.float16)],
    ids=["group3", "smollm2-shape-bf16", "mha-d80", "group12-fp16"],
)
def test_attention_with_lse_matches_reference(b, hq, hkv, length, d, dtype):
    g = torch.Generator().manual_seed(length + d)
    query = torch.randn(b, hq, d, generator=g).to(dtype)
    keys = torch.randn(b, hkv, length + 3, d, generator=g).to(dtype)[:, :, 3:]  # a strided view, as a slice would be
    values = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    rows = torch.rand(b, length, generator=g) > 0.3
    rows[1:2] = False  # a row with nothing to attend (where there is a second row): zero output, lse -inf
    valid = rows[:, None].expand(b, hkv, length)  # an expanded view, stride 0 over the KV heads
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    out, lse = triton_attention.attention_with_lse(to(query), to(keys), to(values), to(valid), d**-0.5)
    expected_out, expected_lse = reference.attention_with_lse(query, keys, values, valid, d**-0.5)
    torch.testing.assert_close(out.cpu(), expected_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=1e-5, rtol=1e-5)


def test_merge_matches_reference():
    """Random parts, one part empty (lse -inf) in some rows, both empty in one."""
    g = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(2, 5, 3, 40, generator=g)
    lse_a, lse_b = torch.randn(2, 5, 3, generator=g) * 4
    lse_a[0, 0] = lse_b[1, 1] = float("-inf")
    lse_a[2, 2] = lse_b[2, 2] = float("-inf")
    out_a[0, 0] = out_b[1, 1] = out_a[2, 2] = out_b[2, 2] = 0.0
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    merged = triton_attention.merge_attention(to(out_a), to(lse_a), to(out_b), to(lse_b))
    torch.testing.assert_close(merged.cpu(), reference.merge_attention(out_a, lse_a, out_b, lse_b), atol=1e-6, rtol=1e-5)
    assert merged[2, 2].abs().max() == 0
