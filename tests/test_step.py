"""One decode step (step.py): what the layers of a pass share is computed once, and the capture-ready step's
bucketed width."""

from __future__ import annotations

from a2ats_hf import A2ATSCache, cache_argument
from a2ats_hf.cache import A2ATSLayer
from a2ats_hf.step import bucket_width

from conftest import DEVICE, ids_of


def greedy(model, ids, cache, new):
    return model.generate(ids.to(DEVICE), **cache_argument(model, cache), max_new_tokens=new, do_sample=False,
                          pad_token_id=0)


def test_step_masks_are_computed_once_per_pass(tiny, monkeypatch):
    """Every layer of a decode pass shares its key validity, candidates and budget: the first computes them (the
    prompt's passes still find each layer's candidates for its histogram)."""
    model, books = tiny
    calls = []
    original = A2ATSLayer.far_candidates
    monkeypatch.setattr(A2ATSLayer, "far_candidates", lambda self, valid: calls.append(self) or original(self, valid))
    cache = A2ATSCache(books, topk=0.1)
    greedy(model, ids_of(2, 120), cache, new=4)  # one prompt pass, three decode passes
    layers = len(cache.a2ats_layers)
    assert layers > 1 and len(calls) == layers + 3


def test_bucket_width_rounds_up_within_capacity():
    """A step over N tokens reads N rounded up to the bucket, never past the buffers' capacity."""
    assert [bucket_width(n, 10000, 4096) for n in (1, 4096, 4097, 9000)] == [4096, 4096, 8192, 10000]
    assert bucket_width(33, 300, 32) == 64 and bucket_width(299, 300, 32) == 300


def test_observers_watch_every_decode_step(tiny):
    """Each layer's decode step calls the cache's observers with its output (what the fidelity probe reads, instead
    of replacing the step); a copy of the cache is not watched."""
    import copy

    model, books = tiny
    cache, seen = A2ATSCache(books, topk=0.1), []
    cache.observers.append(lambda layer, query, position_ids, masks, scaling, out: seen.append((layer, out.shape)))
    greedy(model, ids_of(2, 120), cache, new=4)  # one prompt pass, three decode passes
    layers = cache.a2ats_layers
    assert [layer for layer, _ in seen] == layers * 3 and {shape for _, shape in seen} == {(2, 6, 16)}
    assert copy.deepcopy(cache).observers == []
