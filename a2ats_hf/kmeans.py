"""Calibration-time vector quantization: whitening from the queries' second moments, and batched k-means (k-means++
seeding, empty clusters reseeded, deterministic) that builds the codebooks.

Batched over a leading "head" axis (one codebook per (layer, KV head)); runs on CPU or CUDA.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .encoding import assign, chunk_rows


def second_moment(queries: torch.Tensor) -> torch.Tensor:
    """Sum of outer products ``q^T q`` over tokens: [H, N, D] -> [H, D, D] (float32, to be accumulated)."""
    q = queries.float()
    return q.transpose(-1, -2) @ q


def whitening(moment: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cholesky factor L (lower, [H, D, D]) of H / sqrt(mean(H^2)) + eps*I, so (k-c) H (k-c)^T = ||(k-c) L||^2."""
    m = moment.double()
    m = 0.5 * (m + m.transpose(-1, -2))
    m = m / m.pow(2).mean(dim=(-1, -2), keepdim=True).sqrt()
    m = m + eps * torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return torch.linalg.cholesky(m).float()


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [H, M, D]
    objective: float  # mean squared distance of points to their centroid, averaged over heads
    iterations: int


def kmeans_plus_plus(x: torch.Tensor, n_centroids: int, generator: torch.Generator, rounds: int = 128) -> torch.Tensor:
    """k-means++ (D^2 sampling) seeding, batched over heads.

    Centres are drawn in ``rounds`` batches of ``n_centroids / rounds`` (distances refreshed between batches), so
    seeding costs ``rounds`` passes over the data instead of ``n_centroids``; ``rounds >= n_centroids`` is classic
    k-means++.
    """
    heads, n, d = x.shape
    per_round = math.ceil(n_centroids / min(rounds, n_centroids))
    first = torch.randint(n, (heads, 1), generator=generator, device=x.device)
    chosen = [first]
    centroids = x.gather(1, first[..., None].expand(heads, 1, d))
    min_dist = assign(x, centroids)[1]
    taken = 1
    while taken < n_centroids:
        k = min(per_round, n_centroids - taken)
        weights = min_dist.double() + 1e-30  # all-zero rows (duplicates) still sample
        idx = torch.multinomial(weights, k, replacement=False, generator=generator)
        new = x.gather(1, idx[..., None].expand(heads, k, d))
        min_dist = torch.minimum(min_dist, assign(x, new)[1])
        chosen.append(idx)
        taken += k
    idx = torch.cat(chosen, dim=1)
    return x.gather(1, idx[..., None].expand(heads, n_centroids, d)).float()


def kmeans(
    x: torch.Tensor,
    n_centroids: int,
    max_iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> KMeansResult:
    """Lloyd's k-means on x [H, N, D] for all heads at once; deterministic for ``seed``.

    Stops when the relative decrease of the objective falls below ``tol``. Empty clusters are re-seeded at the
    points farthest from their centroid, so no centroid is left unused.
    """
    heads, n, d = x.shape
    if n < n_centroids:
        raise ValueError(f"k-means needs at least n_centroids={n_centroids} points per head, got {n}.")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    x = x.float()
    centroids = kmeans_plus_plus(x, n_centroids, generator)
    offsets = (torch.arange(heads, device=x.device) * n_centroids)[:, None]
    previous = math.inf
    iterations = 0
    bar = tqdm(total=max_iters, desc="k-means", disable=not progress)
    for iterations in range(1, max_iters + 1):
        codes, dist = assign(x, centroids)
        objective = dist.mean().item()
        flat = codes + offsets
        sums = torch.zeros(heads * n_centroids, d, device=x.device)
        step = chunk_rows(heads, d, n)
        with _deterministic():  # CUDA's index_add_ otherwise sums in a run-dependent order; its deterministic
            for i in range(0, n, step):  # form copies what it adds, so it adds a block of rows at a time
                sums.index_add_(0, flat[:, i : i + step].reshape(-1), x[:, i : i + step].reshape(-1, d))
        counts = torch.bincount(flat.reshape(-1), minlength=heads * n_centroids).float()[:, None]
        centroids = (sums / counts.clamp_min(1)).view(heads, n_centroids, d)
        empty = (counts.view(heads, n_centroids) == 0)
        if empty.any():
            _reseed_empty(x, centroids, empty, dist)
        bar.update(1)
        bar.set_postfix(objective=f"{objective:.4g}")
        if previous < math.inf and previous - objective <= tol * previous:
            break
        previous = objective
    bar.close()
    objective = assign(x, centroids)[1].mean().item()
    return KMeansResult(centroids, objective, iterations)


@contextmanager
def _deterministic():
    enabled, warn_only = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _reseed_empty(x: torch.Tensor, centroids: torch.Tensor, empty: torch.Tensor, dist: torch.Tensor) -> None:
    """Move each empty centroid onto a distinct point among those farthest from their current centroid."""
    for h in torch.nonzero(empty.any(-1)).flatten().tolist():
        slots = torch.nonzero(empty[h]).flatten()
        far = dist[h].topk(len(slots)).indices
        centroids[h, slots] = x[h, far]
