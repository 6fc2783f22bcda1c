"""Scorers behind the cache: each baseline selects what its definition says, and all decode through one top-K."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from a2ats_hf import A2ATSCache, cache_argument, calibrate
from a2ats_hf.rope import distance_buckets
from a2ats_hf.scoring import SCORERS, DistanceBuckets, Quest, ScoreInputs, scorer_of

from conftest import DEVICE, CharTokenizer, ids_of


@pytest.fixture(scope="module")
def books_of(tiny):
    """The codebooks each scorer reads: post-RoPE ones for the "postrope" ablation, the tiny model's otherwise."""
    model, books = tiny
    text = " ".join(f"token{i % 97} word{i % 13}" for i in range(2000))
    post = calibrate(model, CharTokenizer(), [text], n_centroids=32, max_tokens=4000, chunk_size=1024,
                     uuid_tokens=1000, kmeans_iters=15, window=16, sink=4, keys="post_rope", progress=False)
    return lambda scoring: post if scorer_of(scoring).keys == "post_rope" else books


def decode(model, books, scoring, topk=0.1, length=200, new=4):
    cache = A2ATSCache(books, topk=topk, scoring=scoring)
    with torch.no_grad():
        out = model.generate(ids_of(1, length), **cache_argument(model, cache), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
    return out, cache


@pytest.mark.parametrize("scoring", sorted(SCORERS))
def test_every_scorer_decodes(tiny, books_of, scoring):
    """Every scorer generates; the window-only one retrieves nothing, the others about topk per query head; at
    topk=1.0 each decodes exactly as full attention over every token does (A2ATS at 1.0)."""
    model, books = tiny
    out, cache = decode(model, books_of(scoring), scoring)
    assert out.shape[1] == 204
    if scoring == "window":
        assert cache.stats.far_selected == 0
    else:
        assert 0.1 <= cache.stats.far_fraction <= 0.3 + 0.02  # 3 query heads per KV head, united
        assert torch.equal(decode(model, books_of(scoring), scoring, topk=1.0)[0],
                           decode(model, books, "wrope", 1.0)[0])


def test_scorers_refuse_codebooks_of_the_other_kind(tiny, books_of):
    with pytest.raises(ValueError, match="post_rope"):
        A2ATSCache(tiny[1], scoring="postrope")
    with pytest.raises(ValueError, match="pre_rope"):
        A2ATSCache(books_of("postrope"), scoring="wrope")


def test_quest_bound_is_an_upper_bound():
    """Quest's page score bounds every q.k in the page from above, and is reached by a page of one key."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8), torch.randn(1, 1, 40, 8)

    class Store:  # what Quest reads of a store
        @staticmethod
        def to_tensors(start=0):
            return k[:, :, start:], k[:, :, start:]

    step = ScoreInputs(q, None, 1.0, None, torch.zeros(1, 1, 40, dtype=torch.int32), None, None, None, None, 0, 0, 40,
                       None, None, Store)
    for page in (1, 16):
        lut, codes, _ = Quest(page=page).scores(step)
        exact = torch.einsum("bhd,bnd->bhn", q, k[:, 0])
        per_token = lut.gather(-1, codes.long().expand(1, 2, 40))
        assert (per_token >= exact - 1e-5).all()
        if page == 1:
            assert torch.allclose(per_token, exact, atol=1e-5)


@pytest.mark.parametrize("scoring", ["wrope", "distance", "postrope"])
def test_kv_head_rule_scores_the_summed_query(tiny, books_of, scoring):
    """Under the per-KV-head rule a lookup-table scorer turns the KV group's summed query: its table [B, Hkv, M] is
    the per-query-head table summed over each group."""
    model, _ = tiny
    _, cache = decode(model, books_of(scoring), scoring)
    layer, n = cache.a2ats_layers[1], cache.a2ats_layers[1].store.length
    query = torch.randn(1, model.config.num_attention_heads, model.config.head_dim,
                        generator=torch.Generator().manual_seed(0)).to(DEVICE)
    far = layer.far_candidates(torch.ones(1, n, dtype=torch.bool, device=DEVICE))
    step = layer.score_inputs(query, torch.tensor([[n - 1]], device=DEVICE), 1.0, far)
    per_head = scorer_of(scoring).scores(step)[0]
    summed = scorer_of(scoring).scores(dataclasses.replace(step, budget="kv_head"))[0]
    hkv = layer.codes.shape[1]
    assert summed.shape == (1, hkv, per_head.shape[-1])
    assert torch.allclose(summed, per_head.view(1, hkv, -1, per_head.shape[-1]).sum(2), atol=1e-4)


@pytest.mark.parametrize("per_octave", [1, 3])
def test_distance_scores_are_expected_true_scores_over_their_bucket(tiny, per_octave):
    """A token's distance-aware score is the mean, over its bucket's distances, of the true post-RoPE score of the
    query against its centroid at that distance (windowed RoPE's score at offset = distance)."""
    model, books = tiny
    _, cache = decode(model, books, "distance")
    layer, n = cache.a2ats_layers[1], cache.a2ats_layers[1].store.length
    torch.manual_seed(0)
    query = torch.randn(1, model.config.num_attention_heads, model.config.head_dim).to(DEVICE)
    position_ids = torch.tensor([[n - 1]], device=DEVICE)
    far = layer.far_candidates(torch.ones(1, n, dtype=torch.bool, device=DEVICE))
    lut, codes, _ = DistanceBuckets(per_octave=per_octave).scores(layer.score_inputs(query, position_ids, 1.0, far))
    group = query.shape[1] // layer.codes.shape[1]
    score = lut.gather(-1, codes.long().repeat_interleave(group, 1))  # [1, Hq, N]
    bucket = distance_buckets(torch.arange(n - 1, -1, -1), cache.window, per_octave)
    centroids = layer.centroids.repeat_interleave(group, 0)  # [Hq, M, D]
    for j in (0, n // 3, n - cache.window - 1):
        distances = [n - 1 - i for i in range(n) if bucket[i] == bucket[j]]
        true = torch.stack([cache.rope.windowed_query(query[:, :, None], position_ids, d)[0, :, 0] for d in distances])
        centroid = centroids[torch.arange(query.shape[1], device=DEVICE),
                             layer.codes[0].long().repeat_interleave(group, 0)[:, j]]
        assert torch.allclose(score[0, :, j], (true * centroid).sum(-1).mean(0), atol=1e-4)
    assert len(set(bucket.tolist())) == 1 + int(per_octave * torch.log2(torch.tensor((n - 1) / cache.window)))


def test_unknown_scoring_is_refused(tiny):
    with pytest.raises(ValueError, match="scoring must be one of"):
        A2ATSCache(tiny[1], scoring="best")
    for bad in ({"per_octave": 0}, {"rotation": "median"}):
        with pytest.raises(ValueError, match="per_octave"):
            DistanceBuckets(**bad)
    assert scorer_of("quest").page == 16


@pytest.mark.parametrize("per_octave", [1, 2])
def test_distance_columns_move_on_exactly(tiny, monkeypatch, per_octave):
    """Decode steps move each layer's (bucket, code) columns and their candidates' histogram on by one token, and
    they equal a rebuild over every token at every step, across a new bucket's first step (window 16: buckets start
    at 32, 64, 128 ... tokens back) and with a padded row; rebuilt only after the prompt (the histogram is as wide as
    the buckets of the buffer's whole size, which doubles when full)."""
    from a2ats_hf import scoring as scoring_module

    model, books = tiny
    rebuilds, checked = [], []
    histogram = scoring_module.code_histogram
    monkeypatch.setattr(scoring_module, "code_histogram", lambda *a: rebuilds.append(1) or histogram(*a))
    original = DistanceBuckets.scores

    def scores(self, step):  # every layer's copy of the scorer
        lut, columns, hist = original(self, step)
        bucket = self.turns(step)[2]  # of each distance; column j is n - 1 - j back
        expected = (bucket.flip(0) * step.centroids.shape[1]).to(torch.int32) + step.codes.to(torch.int32)
        assert torch.equal(columns, expected) and torch.equal(hist, histogram(expected, step.far, lut.shape[-1]))
        checked.append(step.length)
        return lut, columns, hist

    monkeypatch.setattr(DistanceBuckets, "scores", scores)
    ids, mask = ids_of(2, 100), torch.ones(2, 100, dtype=torch.long, device=DEVICE)
    mask[1, :7] = 0  # left padding
    cache = A2ATSCache(books, topk=0.1, scoring=DistanceBuckets(per_octave=per_octave))
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_argument(model, cache), max_new_tokens=40, min_new_tokens=40,
                       do_sample=False, pad_token_id=0)
    layers = len(cache.a2ats_layers)
    assert len(checked) == 39 * layers and min(checked) <= 128 < max(checked)  # column 127 reaches bucket "128"
    appeared = len({int(distance_buckets(torch.tensor([n - 1]), 16, per_octave)) for n in set(checked)}) - 1
    assert appeared >= 1 and len(rebuilds) == layers  # a new bucket fits the histogram kept for the buffer's size


@pytest.mark.parametrize("edit", ["reorder", "select"])
def test_distance_scorer_follows_row_edits(tiny, edit):
    """After a reorder (beam search) or a row subset, the distance scorer decodes on as a cache filled with those
    rows from the start does (its kept columns are rebuilt for the new rows)."""
    model, books = tiny
    ids, first, then = ids_of(3, 150, seed=5), ids_of(3, 3, seed=6), ids_of(3, 3, seed=7)
    rows = torch.tensor([2, 0, 1]) if edit == "reorder" else torch.tensor([2, 0])

    def logits(cache, tokens):
        with torch.no_grad():
            return torch.cat([model(tokens[:, i : i + 1].to(DEVICE), **cache_argument(model, cache)).logits
                              for i in range(tokens.shape[1])], dim=1)

    edited, refilled = (A2ATSCache(books, topk=0.05, scoring="distance") for _ in range(2))
    with torch.no_grad():
        model(ids.to(DEVICE), **cache_argument(model, edited))
        model(ids[rows].to(DEVICE), **cache_argument(model, refilled))
    logits(edited, first), logits(refilled, first[rows])
    if edit == "reorder":
        edited.reorder_cache(rows.to(DEVICE))
    else:
        edited.batch_select_indices(rows.to(DEVICE))
    torch.testing.assert_close(logits(edited, then[: len(rows)]), logits(refilled, then[: len(rows)]),
                               atol=1e-5, rtol=1e-4)
