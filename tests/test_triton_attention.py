"""The Triton window attention and log-sum-exp merge against the torch reference, on random inputs of awkward sizes
(under TRITON_INTERPRET=1 without a GPU): grouped heads, head dims that are not powers of two, masked keys, rows with
no valid key at all; and the exact scores of re-ranking's candidates."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf.kernels import reference, triton_attention
from a2ats_hf.kernels.reference import FarRows
from a2ats_hf.store import DeviceKVStore, KVStore

from conftest import DEVICE

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"),
    reason="needs a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)",
)
KERNEL_DEVICE = DEVICE if DEVICE.type == "cuda" else torch.device("cpu")


@pytest.mark.parametrize(
    "b, hq, hkv, length, d, dtype",
    [(2, 6, 2, 37, 16, torch.float32), (1, 9, 3, 72, 64, torch.bfloat16), (3, 4, 4, 5, 80, torch.float32),
     (1, 12, 1, 100, 24, torch.float16), (2, 4, 2, 700, 32, torch.float32)],
    ids=["group3", "smollm2-shape-bf16", "mha-d80", "group12-fp16", "long-split-over-programs"],
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


@pytest.mark.parametrize("pinned", [False, True], ids=["device", "second-part-pinned"])
def test_merge_matches_reference(pinned):
    """Random parts, one part empty (lse -inf) in some rows, both empty in one; the second part on the device, or
    (where there is one) in pinned host memory read in place, as the CPU attention's outputs are."""
    g = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(2, 5, 3, 40, generator=g)
    lse_a, lse_b = torch.randn(2, 5, 3, generator=g) * 4
    lse_a[0, 0] = lse_b[1, 1] = float("-inf")
    lse_a[2, 2] = lse_b[2, 2] = float("-inf")
    out_a[0, 0] = out_b[1, 1] = out_a[2, 2] = out_b[2, 2] = 0.0
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    host = (lambda t: t.pin_memory()) if pinned and KERNEL_DEVICE.type == "cuda" else to
    merged = triton_attention.merge_attention(to(out_a), to(lse_a), host(out_b), host(lse_b))
    torch.testing.assert_close(merged.cpu(), reference.merge_attention(out_a, lse_a, out_b, lse_b),
                               atol=1e-6, rtol=1e-5)
    assert merged[2, 2].abs().max() == 0


@pytest.mark.parametrize("mapped", [False, True], ids=["device-store", "cpu-store-mapped"])
@pytest.mark.parametrize("b, hq, hkv, d, stored, width, dtype", [(2, 6, 2, 16, 900, 700, torch.float32),
                                                                  (1, 9, 3, 64, 300, 40, torch.bfloat16)],
                         ids=["three-splits", "smollm2-shape-one-split"])
def test_local_and_far_attention_matches_reference(b, hq, hkv, d, stored, width, dtype, mapped):
    """Sinks + window and far rows in one launch (split over programs, then combined): equal to the reference, with
    a pair that selected nothing, a row whose local keys are all masked, and full lists; the far rows in a device
    store, or in a one-block CPU store's (pinned where CUDA is) block, read in place (``gpu_share``)."""
    g = torch.Generator().manual_seed(stored)
    kv = torch.randn(2, b, hkv, stored, d, generator=g).to(dtype)
    if mapped:
        cpu_store = KVStore(b, hkv, d, dtype, block_size=stored + 5)
        cpu_store.append(*kv)
        store = cpu_store.mapped()
        assert store.keys.device.type == "cpu" and store.keys.is_pinned() == torch.cuda.is_available()
    else:
        store = DeviceKVStore(b, hkv, d, dtype, KERNEL_DEVICE)
        store.append(*kv.to(KERNEL_DEVICE))
    indices = torch.stack([torch.randperm(stored, generator=g)[:width].sort().values for _ in range(b * hkv)])
    indices = indices.view(b, hkv, width).to(torch.int32)
    counts = torch.randint(1, width + 1, (b, hkv), generator=g, dtype=torch.int32)
    counts[0, 0], counts[-1, -1] = 0, width
    query = torch.randn(b, hq, d, generator=g).to(dtype)
    keys, values = torch.randn(2, b, hkv, 37, d, generator=g).to(dtype)
    valid = (torch.rand(b, 37, generator=g) > 0.3)[:, None].expand(b, hkv, 37).clone()
    valid[-1] = False
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    far = FarRows(store, to(indices), to(counts))
    out, lse = triton_attention.attention_with_lse(to(query), to(keys), to(values), to(valid), d**-0.5, far)
    expected_out, expected_lse = reference.local_and_far_attention(to(query), to(keys), to(values), to(valid), d**-0.5,
                                                                   far)  # where the store lives, as the kernel
    torch.testing.assert_close(out.cpu(), expected_out.cpu(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), expected_lse.cpu(), atol=2e-5, rtol=1e-5)


def test_combine_matches_logsumexp():
    """Five partial attentions (some empty) combined equal the softmax-weighted sum, lse their logsumexp."""
    g = torch.Generator().manual_seed(1)
    parts, parts_lse = torch.randn(5, 2, 3, 24, generator=g), torch.randn(5, 2, 3, generator=g) * 3
    parts_lse[1:, 0, 0] = float("-inf")  # one part only
    parts_lse[:, 1, 2] = float("-inf")  # nothing at all
    parts[:, 1, 2] = 0.0
    out, lse = triton_attention.combine(parts.to(KERNEL_DEVICE), parts_lse.to(KERNEL_DEVICE))
    expected_lse = torch.logsumexp(parts_lse, 0)
    weights = torch.exp(parts_lse - expected_lse.nan_to_num(neginf=0.0)).nan_to_num()
    torch.testing.assert_close(lse.cpu(), expected_lse)
    torch.testing.assert_close(out.cpu(), (parts * weights[..., None]).sum(0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("b, hkv, c, k", [(2, 3, 70, 33), (1, 2, 3000, 1500)], ids=["small", "two-blocks"])
def test_gather_chosen_matches_reference(b, hkv, c, k):
    """Re-ranking's kept rows: the candidates at ascending chosen positions, the chosen padding of a head with fewer
    candidates than its budget dropped, 0 past each kept count."""
    g = torch.Generator().manual_seed(c)
    indices = torch.randint(1, 10**5, (b, hkv, c), generator=g, dtype=torch.int32)
    counts = torch.randint(0, c + 1, (b, hkv), generator=g)
    counts[0, 0], counts[-1, -1] = c, 5  # every candidate; fewer candidates than chosen
    chosen_counts = torch.randint(0, k + 1, (b, hkv), generator=g)
    chosen_counts[-1, -1] = k
    chosen = torch.stack([torch.stack([torch.randperm(c, generator=g)[:k].sort().values for _ in range(hkv)])
                          for _ in range(b)]).to(torch.int32)
    chosen = torch.where(torch.arange(k) < chosen_counts[..., None], chosen, 0)
    chosen[-1, -1] = torch.arange(k)  # a head's own candidates first, then its padding
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    rows, kept = triton_attention.gather_chosen(to(indices), to(counts), to(chosen), to(chosen_counts))
    expected_rows, expected_kept = reference.gather_chosen(indices, counts, chosen, chosen_counts)
    assert torch.equal(kept.cpu(), expected_kept) and kept[-1, -1] == 5
    assert torch.equal(rows.cpu(), expected_rows) and expected_rows[-1, -1, 5:].eq(0).all()
