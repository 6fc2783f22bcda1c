"""Kernels behind A2ATS decode: top-K selection over codes, sparse attention over the CPU store, LSE merge.

Every kernel has a plain torch reference in :mod:`.reference`; the rest of the package calls only the names
exported here, which pick the fast implementation where it applies (Triton top-K, window attention and merge on a
GPU, the C++ CPU kernel for sparse attention) and the reference otherwise.
"""

from __future__ import annotations

import importlib.util

import torch

from . import reference
from .cpu_attention import sparse_attention
from .reference import FarRows, code_histogram

HAS_TRITON = importlib.util.find_spec("triton") is not None


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float,
    far: FarRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp over the sinks + window (see :func:`.reference.attention_with_lse`) and,
    where the K/V stays on the device, the selected ``far`` rows too (:func:`.reference.local_and_far_attention`).
    One Triton launch on a GPU (two when the far rows are split over programs), the torch reference elsewhere."""
    if query.is_cuda and HAS_TRITON:
        from .triton_attention import attention_with_lse as triton_attention_with_lse

        with torch.cuda.device(query.device):
            return triton_attention_with_lse(query, keys, values, valid, scaling, far)
    if far is not None:
        return reference.local_and_far_attention(query, keys, values, valid, scaling, far)
    return reference.attention_with_lse(query, keys, values, valid, scaling)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Two attentions over disjoint key sets merged by their log-sum-exps; see :func:`.reference.merge_attention`.
    One Triton launch on a GPU, the torch reference elsewhere."""
    if out_a.is_cuda and HAS_TRITON:
        from .triton_attention import merge_attention as triton_merge_attention

        with torch.cuda.device(out_a.device):
            return triton_merge_attention(out_a, lse_a, out_b, lse_b)
    return reference.merge_attention(out_a, lse_a, out_b, lse_b)


def select_topk(
    lut: torch.Tensor,
    codes: torch.Tensor,
    candidates: torch.Tensor,
    k: torch.Tensor,
    budget: str = "query_head",
    histogram: torch.Tensor | None = None,
    k_max: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K far tokens per (row, KV head) from LUT scores; see :func:`.reference.select_topk` for the contract.

    On a GPU with Triton, the fused kernel runs (``histogram`` of the candidates' codes and a host-side bound
    ``k_max`` on ``k`` spare it a pass over the codes and a device sync); indices may then be int32 and padded
    wider than the largest count.
    """
    if codes.is_cuda and HAS_TRITON:
        from .triton_topk import select_topk as triton_select_topk

        with torch.cuda.device(codes.device):  # Triton launches on the current GPU; a layer may sit on another
            return triton_select_topk(lut, codes, candidates, k, budget, histogram=histogram, k_max=k_max)
    return reference.select_topk(lut, codes, candidates, k, budget)


__all__ = ["FarRows", "attention_with_lse", "code_histogram", "merge_attention", "select_topk", "sparse_attention"]
