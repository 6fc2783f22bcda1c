"""Reuse of a step's selection: the measures on hand-made picks, and the probe's picks from a real decode."""

from __future__ import annotations

import pytest
import torch

from a2ats_eval.fidelity import FidelityProbe
from a2ats_eval.reuse import lru_misses, reuse, union_size
from a2ats_hf import A2ATSCache, cache_argument

from conftest import ids_of


def picks_of(*sets: set[int], n: int = 12, grow: int = 0) -> list[torch.Tensor]:
    """One [1, 1, N] bool per step with the given rows picked (N grows by ``grow`` a step)."""
    out = []
    for t, rows in enumerate(sets):
        pick = torch.zeros(1, 1, n + t * grow, dtype=torch.bool)
        pick[..., sorted(rows)] = True
        out.append(pick)
    return out


def test_reuse_and_union():
    """The same rows every step: reuse 1, a union of one budget; disjoint steps: reuse 0 of the last step and all of
    two steps back when they alternate."""
    same = picks_of(*[{1, 2, 3}] * 6, grow=1)
    assert reuse(same, skip=1) == 1.0 and union_size(same, 4, skip=1) == 1.0
    alternating = picks_of(*[{1, 2}, {5, 6}] * 4)
    assert reuse(alternating, skip=2) == 0.0 and reuse(alternating, history=2, skip=2) == 1.0
    assert union_size(alternating, 2, skip=2) == 2.0


def test_lru_misses():
    """Alternating sets miss everything in a cache of one budget and nothing in one of two; a set sliding by one row
    a step misses one of its K rows; a cache never evicts this step's picks."""
    alternating = picks_of(*[{1, 2}, {5, 6}] * 5)
    assert lru_misses(alternating, 1.0, skip=2) == 1.0 and lru_misses(alternating, 2.0, skip=2) == 0.0
    sliding = picks_of(*[set(range(t, t + 4)) for t in range(8)])
    assert lru_misses(sliding, 1.0, skip=1) == pytest.approx(1 / 4) == lru_misses(sliding, 3.0, skip=1)
    back = picks_of({0, 1}, {2, 3}, {4, 5}, {0, 1})  # rows 0, 1 evicted from 2 budgets, held by 3
    assert lru_misses(back, 2.0, skip=3) == 1.0 and lru_misses(back, 3.0, skip=3) == 0.0


def test_probe_keeps_each_steps_picks(tiny):
    """Every decode call of a layer leaves one [B, Hkv, N] pick, N growing by one a step, of the budget's size per
    KV head under the per-KV-head rule; the exact top-K of a steady query repeats most of itself."""
    model, books = tiny
    cache = A2ATSCache(books, topk=0.05, scoring="oracle", budget="kv_head")
    with FidelityProbe(cache, every=1, keep_picks=True) as probe, torch.no_grad():
        model.generate(ids_of(2, 300), **cache_argument(model, cache), max_new_tokens=6, min_new_tokens=6,
                       do_sample=False)
    assert sorted(probe.picks) == [0, 1]
    steps = probe.picks[0]
    assert len(steps) == 5 and [p.shape[-1] for p in steps] == list(range(301, 306))
    far = steps[-1].shape[-1] - cache.window - cache.sink
    assert (steps[-1].sum(-1) == cache.budget_for(far)).all()
    assert 0 < reuse(steps, skip=1) <= 1 and lru_misses(steps, 1.0, skip=1) == pytest.approx(1 - reuse(steps, skip=1))
