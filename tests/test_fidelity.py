"""The fidelity probe: exact where the cache attends everything, and ordering the scorers as their definitions do."""

from __future__ import annotations

import pytest
import torch

from a2ats_eval.fidelity import FidelityProbe
from a2ats_hf import A2ATSCache, cache_argument, step
from a2ats_hf.scoring import SCORERS

from conftest import ids_of, record_selects


def probe_run(model, books, **cache_kwargs) -> dict:
    ids = ids_of(1, 300)
    cache = A2ATSCache(books, **cache_kwargs)
    with FidelityProbe(cache, every=1) as probe, torch.no_grad():
        model.generate(ids, **cache_argument(model, cache), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return probe.summary()


def test_full_budget_is_exact(tiny):
    """At topk=1.0 every token is attended: mass 1, recall 1, output error at float rounding, on every layer."""
    model, books = tiny
    summary = probe_run(model, books, topk=1.0)
    assert set(summary["mass"]["per_layer"]) == {0, 1}
    assert abs(summary["mass"]["mean"] - 1) < 1e-5 and summary["recall"]["mean"] == 1.0
    assert summary["output_error"]["mean"] < 1e-5


def test_oracle_beats_random_and_window(tiny):
    """The exact top-K's recall is 1 and its mass the highest; random selection covers less; sinks + window alone
    the least, with the largest output error."""
    model, books = tiny
    oracle, random, window = (probe_run(model, books, topk=0.05, scoring=s) for s in ("oracle", "random", "window"))
    assert oracle["recall"]["mean"] == 1.0 and "recall" not in window
    assert oracle["mass"]["mean"] >= random["mass"]["mean"] >= window["mass"]["mean"]
    assert oracle["output_error"]["mean"] <= window["output_error"]["mean"]
    assert window["output_error"]["mean"] > 1e-3


def test_rerank_moves_recall_towards_the_exact_top_k(tiny, monkeypatch):
    """Re-ranking (the K/V on the device) measures what it attends: recall and mass grow with R, and R covering
    every far token, kept by full float32 keys, gives the oracle's recall of 1 and its mass."""
    monkeypatch.setattr(step, "KEEP_KEY_BITS", 32)  # the default 16 ties scores equal in bfloat16 (to lower indices)
    model, books = tiny
    oracle = probe_run(model, books, topk=0.05, scoring="oracle", offload="none")
    runs = [probe_run(model, books, topk=0.05, offload="none", rerank=r) for r in (1, 3, 40)]
    recalls, masses = ([run[m]["mean"] for run in runs] for m in ("recall", "mass"))
    assert recalls[0] < recalls[1] <= recalls[2] == 1.0 and masses[0] < masses[2]
    assert abs(masses[2] - oracle["mass"]["mean"]) < 1e-6


@pytest.mark.parametrize("rerank", [1, 3])
def test_probe_picks_what_the_step_attends(tiny, rerank, monkeypatch):
    """The probe re-derives each step's far pick as the kernels rank it (by the step's key bits, ties to the lower
    index): at 8-bit keys, where ties are common, its rows are the step's own, with and without re-ranking."""
    for name in ("CANDIDATE_KEY_BITS", "KEEP_KEY_BITS"):
        monkeypatch.setattr(step, name, 8)
    monkeypatch.setattr(SCORERS["distance"], "key_bits", 8)
    seen = record_selects(monkeypatch)
    model, books = tiny
    cache = A2ATSCache(books, topk=0.05, offload="none", dense_below=0, rerank=rerank)
    with FidelityProbe(cache, every=1, keep_picks=True) as probe, torch.no_grad():
        model.generate(ids_of(1, 300), **cache_argument(model, cache), max_new_tokens=3, min_new_tokens=3,
                       do_sample=False)
    layers = sorted(probe.picks)
    probed = [probe.picks[layer][i] for i in range(len(probe.picks[layers[0]])) for layer in layers]
    assert len(seen) == len(probed) > 0  # (both in the steps' order: a decode pass, layer by layer)
    for rows, (*_, (indices, counts)) in zip(probed, seen):
        got = torch.zeros_like(rows)
        for head in range(rows.shape[1]):
            got[0, head, indices[0, head, : int(counts[0, head])].long().cpu()] = True
        assert torch.equal(got, rows)
