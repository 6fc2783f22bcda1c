"""Encoding keys to codes and the lookup table (encoding.py) against brute-force references."""

from __future__ import annotations

import torch

from a2ats_hf import encoding
from a2ats_hf import kmeans as km


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_assign_matches_brute_force(monkeypatch):
    """Nearest centroid and distance equal a cdist argmin, also when the distance block is chunked."""
    monkeypatch.setattr(encoding, "DISTANCE_BLOCK_BYTES", 3 * 7 * 4 * 5)
    x, c = torch.randn(3, 257, 16, generator=gen(2)), torch.randn(3, 7, 16, generator=gen(3))
    codes, dist = encoding.assign(x, c)
    d = torch.cdist(x.double(), c.double()).pow(2)
    assert torch.equal(codes, d.argmin(-1))
    torch.testing.assert_close(dist.double(), d.min(-1).values, rtol=1e-4, atol=1e-4)


def test_encode_and_lookup_table():
    """encode is argmin ||kL - c'||; the LUT maps query head h to KV head h // group."""
    keys = torch.randn(3, 2, 33, 8, generator=gen(8))
    L = km.whitening(km.second_moment(torch.randn(2, 100, 8, generator=gen(9))))
    cw = torch.randn(2, 11, 8, generator=gen(10))
    codes = encoding.encode(keys, L, cw)
    for h in range(2):
        z = keys[:, h] @ L[h]
        assert torch.equal(codes[:, h], torch.cdist(z, cw[h].expand(3, -1, -1)).argmin(-1))
    queries = torch.randn(3, 6, 8, generator=gen(11))
    lut = encoding.lookup_table(queries, cw, group=3)
    for h in range(6):
        torch.testing.assert_close(lut[:, h], queries[:, h] @ cw[h // 3].T)
