"""Decode-time vector quantization: a key's code (its nearest centroid after whitening) and the lookup table of a
query against the centroids, in torch (the references the Triton kernels in :mod:`a2ats_hf.kernels` reproduce).

Batched over a leading "head" axis (one codebook per (layer, KV head)); the point-to-centroid distance matrix is
computed in chunks, so memory stays bounded for a whole prompt's keys.
"""

from __future__ import annotations

import torch

# Bytes the [heads, chunk, centroids] float32 distance block may take.
DISTANCE_BLOCK_BYTES = 256 * 2**20


def chunk_rows(heads: int, n_centroids: int, n: int) -> int:
    """Rows of ``n`` whose [heads, rows, n_centroids] float32 block fits ``DISTANCE_BLOCK_BYTES``."""
    return max(1, min(n, DISTANCE_BLOCK_BYTES // (4 * heads * n_centroids)))


def assign(
    x: torch.Tensor, centroids: torch.Tensor, norms: torch.Tensor | None = None, distances: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest centroid and squared distance for every point: x [H, N, D], centroids [H, M, D] -> ([H, N], [H, N]).

    ``norms`` [H, 1, M] (the centroids' squared norms) may be precomputed; ``distances=False`` skips them.
    """
    heads, n, _ = x.shape
    c2 = centroids.pow(2).sum(-1)[:, None, :] if norms is None else norms
    codes = torch.empty(heads, n, dtype=torch.long, device=x.device)
    dist = torch.empty(heads, n, dtype=torch.float32, device=x.device) if distances else None
    step = chunk_rows(heads, max(centroids.shape[1], x.shape[-1]), n)  # few centroids: rows of x bound the block
    for i in range(0, n, step):
        xs = x[:, i : i + step].float()
        d = torch.baddbmm(c2, xs, centroids.transpose(1, 2), alpha=-2.0)
        best, idx = d.min(-1)
        codes[:, i : i + step] = idx
        if distances:
            dist[:, i : i + step] = (best + torch.linalg.vector_norm(xs, dim=-1).square()).clamp_min_(0)
    return codes, dist


def encode(
    keys: torch.Tensor, whitener: torch.Tensor, whitened_centroids: torch.Tensor, norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes of pre-RoPE keys: argmin_m ||k L - c'_m||^2. keys [B, H, T, D] -> [B, H, T] long.

    One batched matmul per head group; ``whitener`` [H, D, D], ``whitened_centroids`` [H, M, D], ``norms``
    [H, 1, M] their squared norms if precomputed (a cache encodes one token per step).
    """
    b, h, t, d = keys.shape
    z = keys.float().transpose(0, 1).reshape(h, b * t, d) @ whitener
    codes = assign(z, whitened_centroids, norms, distances=False)[0]
    return codes.view(h, b, t).transpose(0, 1)


def lookup_table(queries: torch.Tensor, centroids: torch.Tensor, group: int) -> torch.Tensor:
    """LUT of approximate scores: queries [B, Hq, D] x centroids [Hkv, M, D] -> [B, Hq, M] (float32).

    Query head h uses the codebook of KV head ``h // group``.
    """
    b, hq, d = queries.shape
    q = queries.float().view(b, hq // group, group, d)
    return torch.einsum("bkgd,kmd->bkgm", q, centroids.float()).reshape(b, hq, -1)
