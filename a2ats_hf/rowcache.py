"""A device cache of the rows an offloaded layer picked most recently (``A2ATSCache(row_cache=R)``).

Consecutive decode steps pick mostly the same far rows (on SmolLM2 and real text, three quarters of a step's picks
repeat the step before's, and a cache of 2 budgets misses 6-8% of them: ``bench/selection_reuse.py``). An
offloaded layer keeps R budgets of rows per (row, KV head) on the device: each step's selection splits into the
rows it holds, attended by the device's kernel beside the window, and the misses, attended by the CPU as before;
the CPU copies the first misses (up to :data:`FILL_SHARE` of the selection's width) into a pinned buffer, and after
the merge they take the slots of the rows picked longest ago. Every shape is fixed by the selection's width, and
nothing waits, so a captured step runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
        k = indices.shape[-1]
        columns = torch.arange(k, device=indices.device)
        valid = columns < counts[..., None]
        held = self.slot.gather(-1, indices.long().clamp(0, self.slot.shape[-1] - 2))
        hit = valid & (held >= 0)
        order = torch.where(hit, 0, 1 + (~valid).long()).argsort(dim=-1, stable=True)  # hits, misses, padding
        hit_counts = hit.sum(-1)
        self.sought += counts
        self.found += hit_counts
        hit_slots = held.gather(-1, order).clamp_min(0)
        self.stamp.scatter_reduce_(-1, hit_slots.long(), torch.where(columns < hit_counts[..., None], now, -1),
                                   "amax")
        shifted = (columns + hit_counts[..., None]).clamp(max=k - 1)  # past the hits
        miss_indices = indices.gather(-1, order).gather(-1, shifted)
        return Split(hit_slots.to(indices.dtype), hit_counts.to(counts.dtype), miss_indices,
                     (counts - hit_counts).to(counts.dtype))

    def fill(self, split: Split, keys: torch.Tensor, values: torch.Tensor, now: int | torch.Tensor) -> None:
        """Bring in the first misses of ``split`` with their ``keys`` and ``values`` [B, H, F, D] (F =
        :meth:`fill_width`), each into the slot of the row picked longest ago (empty slots first), in place."""
        f = keys.shape[2]
        victims = self.stamp.topk(f, dim=-1, largest=False).indices  # [B, H, F], distinct per (row, head)
        coming = torch.arange(f, device=keys.device) < split.miss_counts[..., None]  # [B, H, F]
        new = split.miss_indices[..., :f].long()
        old = self.token.gather(-1, victims).long()
        spare = self.slot.shape[-1] - 1  # the column masked writes go to
        self.slot.scatter_(-1, torch.where(coming & (old >= 0), old, spare), -1)
        self.slot.scatter_(-1, torch.where(coming, new, spare), victims.int())
        self.token.scatter_(-1, victims, torch.where(coming, new, old).int())
        self.stamp.scatter_(-1, victims, torch.where(coming, now, self.stamp.gather(-1, victims)))
        for held, rows in ((self.keys, keys), (self.values, values)):
            index = victims[..., None].expand(-1, -1, -1, held.shape[-1])
            held.scatter_(2, index, torch.where(coming[..., None], rows.to(held.dtype), held.gather(2, index)))

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
        """The cache of batch rows ``index`` [B'] (a reorder, repeat or subset: a copy)."""
        return RowCache(*(t.index_select(0, index) for t in self.tensors()))

    def rows(self, start: int, stop: int) -> "RowCache":
        """Batch rows [start, stop) as views: what a part of a pipelined step writes lands in this cache."""
        return RowCache(*(t[start:stop] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.token, self.stamp, self.slot, self.sought, self.found
