"""The fidelity probe: exact where the cache attends everything, and ordering the scorers as their definitions do."""

from __future__ import annotations

import torch

from a2ats_eval.fidelity import FidelityProbe
from a2ats_hf import A2ATSCache, cache_argument

from conftest import ids_of


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


def test_rerank_moves_recall_towards_the_exact_top_k(tiny):
    """Re-ranking (the K/V on the device) measures what it attends: recall and mass grow with R, and R covering
    every far token gives the oracle's recall of 1 and its mass."""
    model, books = tiny
    oracle = probe_run(model, books, topk=0.05, scoring="oracle", offload="none")
    runs = [probe_run(model, books, topk=0.05, offload="none", rerank=r) for r in (1, 3, 40)]
    recalls, masses = ([run[m]["mean"] for run in runs] for m in ("recall", "mass"))
    assert recalls[0] < recalls[1] <= recalls[2] == 1.0 and masses[0] < masses[2]
    assert abs(masses[2] - oracle["mass"]["mean"]) < 1e-6
