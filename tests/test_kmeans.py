"""Whitening and batched k-means (kmeans.py) against brute-force references; query-aware beats plain k-means."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf import Codebooks, encoding
from a2ats_hf import kmeans as km


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_second_moment_and_whitening():
    """L L^T is the normalised moment (+ eps I), and (k-c) H (k-c)^T == ||(k-c) L||^2."""
    x = torch.randn(3, 501, 24, generator=gen(0)) * torch.linspace(0.1, 3, 24)
    moment = km.second_moment(x)
    torch.testing.assert_close(moment, torch.einsum("hni,hnj->hij", x, x))
    L = km.whitening(moment)
    assert torch.equal(L, L.tril())
    h = moment.double() / moment.double().pow(2).mean((-1, -2), keepdim=True).sqrt()
    torch.testing.assert_close((L @ L.transpose(-1, -2)).double(), h + 1e-6 * torch.eye(24, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    diff = torch.randn(3, 9, 24, generator=gen(1))
    torch.testing.assert_close(torch.einsum("hni,hij,hnj->hn", diff.double(), h, diff.double()).float(),
                               (diff @ L).pow(2).sum(-1), rtol=1e-4, atol=1e-4)


def blobs(seed: int, heads=2, k=5, per=60, dim=8):
    centers = torch.randn(heads, k, dim, generator=gen(seed)) * 20
    points = centers.repeat_interleave(per, 1) + torch.randn(heads, k * per, dim, generator=gen(seed + 1))
    return points, centers


def test_kmeans_finds_separated_blobs_deterministically():
    """Well-separated blobs are recovered, and the same seed gives bit-identical centroids."""
    x, centers = blobs(4)
    a, b = km.kmeans(x, 5, seed=7), km.kmeans(x, 5, seed=7)
    assert torch.equal(a.centroids, b.centroids)
    for h in range(2):
        nearest = torch.cdist(centers[h], a.centroids[h]).min(-1).values
        assert nearest.max() < 1.0  # a blob mean of 60 unit-noise points in 8-d is ~0.4 off
    assert a.objective < 10


def test_kmeans_objective_improves_with_iterations():
    """More Lloyd iterations never give a worse objective (same seeding)."""
    x = torch.randn(3, 400, 6, generator=gen(5))
    objectives = [km.kmeans(x, 16, max_iters=i, tol=0.0, seed=1).objective for i in (1, 3, 10)]
    assert objectives[0] >= objectives[1] >= objectives[2]


def test_kmeans_leaves_no_empty_cluster():
    """With many duplicate points, every centroid still owns points (empty ones are re-seeded)."""
    x = torch.cat([torch.zeros(2, 300, 4), torch.randn(2, 40, 4, generator=gen(6))], dim=1)
    result = km.kmeans(x, 32, max_iters=20, seed=0)
    codes, _ = encoding.assign(x, result.centroids)
    for h in range(2):
        assert codes[h].unique().numel() == 32


def test_kmeans_needs_enough_points():
    """Fewer points than centroids is a ValueError."""
    with pytest.raises(ValueError, match="at least"):
        km.kmeans(torch.randn(1, 5, 3), 8)


def score_error(books: Codebooks, keys: torch.Tensor, queries: torch.Tensor) -> float:
    """E[(q.k - q.c(k))^2] over held-out keys and queries (one head)."""
    codes = encoding.encode(keys[None, None], books.whitener[0], books.whitened_centroids[0])[0, 0]
    approx = books.centroids[0, 0][codes]
    return ((queries @ keys.T) - (queries @ approx.T)).pow(2).mean().item()


def test_query_aware_beats_plain_kmeans_on_held_out_data():
    """On anisotropic keys and queries, query-aware codebooks give a clearly lower score error than plain k-means."""
    dim, n = 16, 4000
    key_scale = torch.linspace(3.0, 0.3, dim)  # keys vary most in the first dimensions
    query_scale = torch.linspace(0.1, 4.0, dim)  # queries weight the last ones
    keys = torch.randn(2, n, dim, generator=gen(12)) * key_scale
    queries = torch.randn(2, n, dim, generator=gen(13)) * query_scale
    fingerprint = {}
    L = km.whitening(km.second_moment(queries[0:1]))
    aware = km.kmeans(keys[0:1] @ L, 64, seed=0).centroids
    plain = km.kmeans(keys[0:1], 64, seed=0).centroids
    aware_books = Codebooks(L[None], aware[None], fingerprint)
    plain_books = Codebooks(torch.eye(dim)[None, None], plain[None], fingerprint)
    held_keys, held_queries = keys[1], queries[1]
    aware_err, plain_err = score_error(aware_books, held_keys, held_queries), score_error(plain_books, held_keys,
                                                                                          held_queries)
    assert aware_err < 0.8 * plain_err, (aware_err, plain_err)
