"""The C++ CPU sparse attention against the torch reference: float32, bfloat16 and float16 stores, awkward sizes,
selections spanning several blocks and several of the kernel's 256-row chunks, empty selections, and both the
register-tiled loops (groups of 1, 2, 4, 8 with a head dimension divisible by 8) and the generic ones."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf.kernels import cpu_attention, reference
from a2ats_hf.store import KVStore


def test_kernel_builds():
    """The compiled kernel is what runs here (no silent fallback to the reference)."""
    assert cpu_attention.extension() is not None


def test_fallback_can_be_forced(monkeypatch):
    monkeypatch.setenv("A2ATS_CPU_KERNEL", "torch")
    assert cpu_attention.extension.__wrapped__() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b, hq, hkv, n, d, block",
    [(2, 9, 3, 1301, 64, 500), (1, 4, 1, 700, 24, 4096), (3, 8, 8, 90, 128, 7), (1, 16, 2, 600, 64, 128),
     (2, 4, 2, 77, 40, 33), (1, 8, 2, 300, 20, 64)],
    ids=["group3", "group4-d24", "group1", "group8", "group2-d40", "group4-d20-untiled"],
)
def test_matches_reference(dtype, b, hq, hkv, n, d, block):
    g = torch.Generator().manual_seed(n)
    store = KVStore(b, hkv, d, dtype, block_size=block)
    for part in torch.randn(b, hkv, n, 2 * d, generator=g).split([n // 3, n - n // 3], dim=2):  # two appends
        store.append(part[..., :d].to(dtype), part[..., d:].to(dtype))
    chosen = torch.rand(b, hkv, n, generator=g) < torch.rand(b, hkv, 1, generator=g)
    chosen[0, -1] = False  # a head that retrieves nothing
    counts = chosen.sum(-1)
    indices = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., : int(counts.max())]
    query = torch.randn(b, hq, d, generator=g)
    out, lse = cpu_attention.sparse_attention(query, store, indices, counts, d**-0.5)
    ref_out, ref_lse = reference.sparse_attention(query, store, indices, counts, d**-0.5)
    empty = counts.repeat_interleave(hq // hkv, dim=1) == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_matches_reference_on_smollm2(smollm2, austen):
    """Real queries and offloaded K/V from SmolLM2 decoding Persuasion at topk=0.05: every layer's call agrees."""
    from demo import codebooks as demo_codebooks

    from a2ats_hf import A2ATSCache, cache_argument
    from a2ats_hf import attention as attention_module

    model, tokenizer = smollm2
    books = demo_codebooks(model, tokenizer, austen)
    ids = tokenizer(austen["Persuasion"][60000:66000], return_tensors="pt")["input_ids"]
    checked = []

    def spy(query, store, indices, counts, scaling):
        out, lse = cpu_attention.sparse_attention(query, store, indices, counts, scaling)
        ref_out, ref_lse = reference.sparse_attention(query, store, indices, counts, scaling)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
        checked.append(int(counts.sum()))
        return out, lse

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module.kernels, "sparse_attention", spy)
        model.generate(ids, **cache_argument(model, A2ATSCache(books, topk=0.05)), max_new_tokens=3, do_sample=False)
    assert len(checked) == 2 * model.config.num_hidden_layers and min(checked) > 0


def test_stale_build_lock_is_removed(tmp_path):
    """An interrupted build's lock would make every later build wait forever: an old one goes (with a warning), a
    fresh one (a build in progress) stays."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    cpu_attention._clear_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - cpu_attention.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="interrupted build"):
        cpu_attention._clear_stale_lock(tmp_path)
    assert not lock.exists()
