"""A device cache of the rows an offloaded layer picked most recently (``A2ATSCache(row_cache=R)``).

Consecutive decode steps pick mostly the same far rows (on SmolLM2 and real text, three quarters of a step's picks
repeat the step before's, and a cache of 2 budgets misses 6-8% of them: ``bench/selection_reuse.py``). An
offloaded layer keeps R budgets of rows per (row, KV head) on the device: each step's selection splits into the
rows it holds, attended by the device's kernel beside the window, and the misses, attended by the CPU as before;
the CPU copies the first misses (up to :data:`FILL_SHARE` of the selection's width) into a pinned buffer, and after
the merge they take the slots of the rows picked longest ago. With ``gpu_share=1`` the CPU attends nothing: the
device reads every miss in place from the pinned store over PCIe into those slots, then attends the whole
selection from the slots. Every shape is fixed by the selection's width, and nothing waits, so a captured step
runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels
from .store import select

FILL_SHARE = 1 / 8  # misses a step may bring into the cache, as a share of the selection's width


@dataclass
class Split:
    """A selection split by the cache: ``hit_slots`` [B, H, K] (the first ``hit_counts`` [B, H] are slots holding
    selected rows) and ``miss_indices`` [B, H, K] (the first ``miss_counts`` are the selected rows it lacks, in
    the selection's order)."""

    hit_slots: torch.Tensor
    hit_counts: torch.Tensor
    miss_indices: torch.Tensor
    miss_counts: torch.Tensor


@dataclass
class RowCache:
    """``slots`` rows of keys and values per (row, KV head) on the device: ``keys``, ``values`` [B, H, slots, D]; the
    token each slot holds, ``token`` [B, H, slots] (-1: empty), and when it was last picked, ``stamp`` (the step's
    length; -1: empty); the slot of each token, ``slot`` [B, H, N + 1] (-1: not held; the last column takes masked
    writes); and the selected rows ``sought`` [B, H] and ``found`` in the slots so far (int64, on the device)."""

    keys: torch.Tensor
    values: torch.Tensor
    token: torch.Tensor
    stamp: torch.Tensor
    slot: torch.Tensor
    sought: torch.Tensor
    found: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, slots: int, head_dim: int, tokens: int, dtype: torch.dtype,
              device: torch.device) -> "RowCache":
        keys = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device)
        token = torch.full((batch, heads, slots), -1, dtype=torch.int32, device=device)
        slot = torch.full((batch, heads, tokens + 1), -1, dtype=torch.int32, device=device)
        counts = torch.zeros(batch, heads, dtype=torch.int64, device=device)
        return cls(keys, torch.zeros_like(keys), token, token.clone().long(), slot, counts, counts.clone())

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    def fill_width(self, width: int) -> int:
        """Misses of a selection ``width`` wide that a step may bring in."""
        return min(math.ceil(width * FILL_SHARE), self.slots)

    def split(self, indices: torch.Tensor, counts: torch.Tensor, now: int | torch.Tensor) -> Split:
        """Split a selection (``indices`` [B, H, K], the first ``counts`` [B, H] valid) into the rows held and the
        rows missed, and stamp the held ones with ``now`` (a host int or a device tensor [1])."""
        return Split(*kernels.split_rows(self.slot, self.stamp, self.sought, self.found, indices, counts, now))

    def fill(self, split: Split, source: torch.Tensor, now: int | torch.Tensor, from_store: bool = False) -> None:
        """Bring misses of ``split`` into the slots of the rows picked longest ago (empty slots first), in place:
        the first of them (up to :meth:`fill_width`) with their keys and values ``source`` [B, H, F, 2, D] (the
        CPU's copies), or with ``from_store`` every miss, read at its token from the store's block ``source``
        [B, H, >= N, 2, D] (over PCIe where it is pinned) and listed after ``split``'s hits, whose slots then name
        every selected row."""
        kernels.fill_rows(self.keys, self.values, self.token, self.stamp, self.slot, split.miss_indices,
                          split.miss_counts, source, now, by_token=from_store,
                          hits=(split.hit_slots, split.hit_counts) if from_store else None)

    def clear(self) -> None:
        """Hold nothing (after a crop: the rows past it are gone)."""
        for held in (self.token, self.stamp, self.slot):
            held.fill_(-1)

    def grow(self, tokens: int) -> None:
        """Room for ``tokens`` in the token -> slot map (it grows with the layer's codes)."""
        if tokens + 1 > self.slot.shape[-1]:
            grown = torch.full((*self.slot.shape[:2], tokens + 1), -1, dtype=torch.int32, device=self.slot.device)
            grown[..., : self.slot.shape[-1] - 1] = self.slot[..., :-1]
            self.slot = grown

    def select_rows(self, index: torch.Tensor) -> "RowCache":
        """The cache of batch rows ``index`` [B'] (a reorder, repeat or subset): in place where the row count stays
        (beam search reorders every step, and a captured step keeps reading the same addresses), else a copy."""
        return RowCache(*(select(t, index) for t in self.tensors()))

    def rows(self, start: int, stop: int) -> "RowCache":
        """Batch rows [start, stop) as views: what a part of a pipelined step writes lands in this cache."""
        return RowCache(*(t[start:stop] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.token, self.stamp, self.slot, self.sought, self.found
