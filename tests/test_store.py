"""KVStore: appends across block boundaries without re-copying; gather equals indexing the whole K/V."""

from __future__ import annotations

import torch

from a2ats_hf.store import KVStore


def test_append_and_gather_across_blocks():
    """Pieces of 1, 3, 7 and 2 tokens in blocks of 5: gather and to_tensors match the concatenation."""
    gen = torch.Generator().manual_seed(0)
    store = KVStore(batch=3, heads=2, head_dim=8, dtype=torch.float32, block_size=5)
    keys, values = [], []
    for t in (1, 3, 7, 2):
        k, v = torch.randn(3, 2, t, 8, generator=gen), torch.randn(3, 2, t, 8, generator=gen)
        first_block = store.key_blocks[0] if store.key_blocks else None
        store.append(k, v)
        assert first_block is None or store.key_blocks[0] is first_block  # nothing re-allocated
        keys.append(k), values.append(v)
    full_k, full_v = torch.cat(keys, 2), torch.cat(values, 2)
    assert store.length == 13 and len(store.key_blocks) == 3
    indices = torch.randint(0, 13, (3, 2, 9), generator=gen)
    gk, gv = store.gather(indices)
    assert torch.equal(gk, full_k.gather(2, indices[..., None].expand(-1, -1, -1, 8)))
    assert torch.equal(gv, full_v.gather(2, indices[..., None].expand(-1, -1, -1, 8)))
    tk, tv = store.to_tensors()
    assert torch.equal(tk, full_k) and torch.equal(tv, full_v)
    for start, end in ((0, 5), (4, 6), (5, 13), (7, 11), (12, 13)):  # spans within and across blocks
        tk, tv = store.to_tensors(start, end)
        assert torch.equal(tk, full_k[:, :, start:end]) and torch.equal(tv, full_v[:, :, start:end])
    assert store.nbytes == 2 * 3 * (3 * 2 * 5 * 8 * 4)
