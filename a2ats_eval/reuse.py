"""How much of a decode step's selection the steps before it already selected.

An offloaded layer reads its selected rows from CPU memory at every step. Where consecutive steps pick mostly the
same rows, a device-resident cache of recently picked rows would serve most of them: these measures say how much,
from the picks a :class:`~a2ats_eval.fidelity.FidelityProbe` records (``keep_picks=True``): per layer, one
[B, Hkv, N] bool per decode step, the far rows each KV head attends (N grows by one a step).
"""

from __future__ import annotations

import math

import torch


def _aligned(earlier: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """``earlier`` [B, Hkv, N'] padded with False to ``later``'s N (tokens it did not store yet)."""
    return torch.nn.functional.pad(earlier, (0, later.shape[-1] - earlier.shape[-1]))


def reuse(picks: list[torch.Tensor], history: int = 1, skip: int = 8) -> float:
    """The share of a step's picked rows that one of the ``history`` steps before it picked, over the steps after the
    first ``skip`` (at least ``history``) and every (row, KV head) that picked anything."""
    shares = []
    for t in range(max(skip, history), len(picks)):
        before = torch.zeros_like(picks[t])
        for earlier in picks[t - history : t]:
            before |= _aligned(earlier, picks[t])
        picked = picks[t].sum(-1)
        shares.append(((picks[t] & before).sum(-1) / picked.clamp_min(1))[picked > 0])
    return torch.cat(shares).mean().item() if shares else float("nan")


def lru_misses(picks: list[torch.Tensor], capacity: float, skip: int = 8) -> float:
    """The share of picked rows (after the first ``skip`` steps, which fill it) that a cache of the rows picked most
    recently would not hold: one cache per (row, KV head), of ``capacity`` x the most rows that (row, KV head) picks
    in a step, evicting the row picked longest ago."""
    if len(picks) <= skip:
        return float("nan")
    n = picks[-1].shape[-1]
    steps = torch.stack([_aligned(p, picks[-1]) for p in picks]).flatten(1, 2)  # [T, B * Hkv, N]
    missed = total = 0
    for seq in steps.unbind(1):
        size = math.ceil(capacity * int(seq.sum(-1).max()))
        if size == 0:
            continue
        stamp = torch.full((n,), -1)  # the step a cached row was last picked at; -1: not cached
        for t, picked in enumerate(seq):
            if t >= skip:
                missed += int((picked & (stamp < 0)).sum())
                total += int(picked.sum())
            stamp[picked] = t
            if int((stamp >= 0).sum()) > size:  # keep the `size` most recently picked (this step's among them)
                kept = stamp.topk(size).indices
                stamp = torch.full((n,), -1).index_copy_(0, kept, stamp[kept])
    return missed / total if total else float("nan")


def union_size(picks: list[torch.Tensor], steps: int, skip: int = 8) -> float:
    """How many budgets the rows picked over ``steps`` consecutive steps make: the union's size over the last step's
    picks, averaged as :func:`reuse` averages."""
    sizes = []
    for t in range(max(skip, steps - 1), len(picks)):
        union = torch.zeros_like(picks[t])
        for earlier in picks[t - steps + 1 : t + 1]:
            union |= _aligned(earlier, picks[t])
        picked = picks[t].sum(-1)
        sizes.append((union.sum(-1) / picked.clamp_min(1))[picked > 0])
    return torch.cat(sizes).mean().item() if sizes else float("nan")
