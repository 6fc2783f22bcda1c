"""One decode step (step.py): what the layers of a pass share is computed once, and the capture-ready step's
bucketed width."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf import A2ATSCache, cache_argument, kernels, step
from a2ats_hf.cache import RERANK, A2ATSLayer
from a2ats_hf.scoring import SCORERS
from a2ats_hf.step import bucket_width
from a2ats_hf.store import kv_bytes

from conftest import DEVICE, ids_of, record_selects


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
    cache = A2ATSCache(books, topk=0.1, scoring="wrope")  # a scorer that reads the layer's histogram
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


def test_rerank_wide_enough_selects_what_the_exact_top_k_selects(tiny, monkeypatch):
    """With R x the budget covering every far token and the keep ranking by full float32 keys, re-ranked windowed
    RoPE decodes as the oracle does (the exact top-K) where the K/V is on the device; layers in CPU memory select
    as without it, and offload="cpu" (where no layer could re-rank) is refused; R = RERANK by default. (Token 0 may not
    come: its embedding is the zero padding vector, whose query scores every key 0, and such ties break
    differently.)"""
    monkeypatch.setattr(step, "KEEP_KEY_BITS", 32)  # the default 16 ties scores equal in bfloat16 (to lower indices)
    model, books = tiny
    ids = ids_of(2, 150, seed=11)

    def logits(**options):  # every step's: they move with any change in what is attended
        cache = A2ATSCache(books, topk=0.05, dense_below=0, **options)
        out = model.generate(ids, **cache_argument(model, cache), max_new_tokens=12, min_new_tokens=12,
                             suppress_tokens=[0], do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
        return torch.stack(out.scores)

    reranked = logits(offload="none", rerank=40)  # the same rows, padded to another width: sums in another order
    torch.testing.assert_close(reranked, logits(offload="none", scoring="oracle"), atol=1e-5, rtol=1e-5)
    cpu_layers = {"offload": "auto", "gpu_kv_budget": 0}  # every layer's K/V in CPU memory: nothing to re-rank by
    assert torch.equal(logits(**cpu_layers, rerank=40), logits(**cpu_layers))
    with pytest.raises(ValueError, match='rerank=40 re-ranks by the keys on the device: it needs offload="none"'):
        A2ATSCache(books, offload="cpu", rerank=40)  # where no layer could, refused
    assert (reranked - logits(offload="none", rerank=1)).nan_to_num().abs().max() > 1e-3  # the scorer alone: others
    assert torch.equal(logits(offload="none"), logits(offload="none", rerank=RERANK["query_head"]))  # on by default


def test_rerank_pools_a_kv_groups_candidates_by_its_summed_table(tiny, monkeypatch):
    """Under the per-query-head rule, re-ranking's candidates are one pool a KV group: the top R x k by the table of
    the group's summed query; each query head keeps its own exact top k of that pool, united over the group (not
    the union of each head's own R x k, which holds no more of their exact top-K and costs a table a head)."""
    monkeypatch.setattr(step, "KEEP_KEY_BITS", 32)  # full float32 keys: the order below, no ties in bfloat16
    monkeypatch.setattr(step, "CANDIDATE_KEY_BITS", 32)
    seen = record_selects(monkeypatch)
    model, books = tiny
    rerank = 3
    cache = A2ATSCache(books, topk=0.05, offload="none", dense_below=0, scoring="wrope", rerank=rerank)
    greedy(model, ids_of(2, 150, seed=3), cache, new=2)
    layer, query, position_ids, masks, _, (indices, counts) = seen[0]  # the first decode step's first layer
    lut, codes, _ = layer.scorer.scores(layer.score_inputs(query, position_ids, 1.0, masks.far, "kv_head"))
    approx = lut.gather(-1, codes.long()).masked_fill(~masks.far[:, None], float("-inf"))  # [B, Hkv, W]
    b, hkv, width = approx.shape
    group = query.shape[1] // hkv
    exact = torch.einsum("bkgd,bknd->bkgn", query.float().view(b, hkv, group, -1),
                         layer.store.keys[:, :, :width].float())
    for row in range(b):
        k = int(masks.budget[row])
        assert 0 < k and rerank * k < int(masks.far[row].sum())  # a pool narrower than the far tokens
        for head in range(hkv):
            pool = approx[row, head].sort(descending=True, stable=True).indices[: rerank * k]  # ties: lower first
            kept = exact[row, head][:, pool].topk(k, dim=-1).indices  # [group, k] places in the pool
            expected = sorted(set(pool[kept.flatten()].tolist()))
            got = indices[row, head, : int(counts[row, head])].tolist()
            assert got == expected


@pytest.mark.parametrize("scoring", ["wrope", "distance"])
def test_selection_ranks_by_the_top_key_bits(tiny, scoring, monkeypatch):
    """Without re-ranking, the step picks the far tokens by their table scores' top ``Scorer.key_bits`` bits, ties
    to the lower index (as the reference at those bits picks them). At 8 bits ties are common, so the pick differs
    from a float32 ranking's: the setting reaches the kernels."""
    monkeypatch.setattr(SCORERS[scoring], "key_bits", 8)
    seen = record_selects(monkeypatch)
    model, books = tiny
    cache = A2ATSCache(books, topk=0.1, offload="none", dense_below=0, scoring=scoring, rerank=1)
    greedy(model, ids_of(2, 150, seed=5), cache, new=2)
    differs = False
    for layer, query, position_ids, masks, _, (indices, counts) in seen:
        lut, codes, _ = layer.scorer.scores(layer.score_inputs(query, position_ids, 1.0, masks.far, "query_head"))
        for bits in (8, 32):
            expected, expected_counts = kernels.reference.select_topk(lut, codes, masks.far, masks.budget,
                                                                      key_bits=bits)
            width = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
            same = torch.equal(counts.long().cpu(), expected_counts.cpu()) and torch.equal(
                indices.long().masked_fill(~width, 0)[..., : expected.shape[-1]].cpu(), expected.cpu())
            if bits == 8:
                assert same, f"layer {layer.layer_idx}: not the reference's pick at 8 bits"
            else:
                differs |= not same
    assert seen and differs


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the hand-off between a GPU and the CPU needs a GPU")
def test_offloaded_step_waits_once_per_layer(tiny, monkeypatch):
    """An offloaded decode step issues no host synchronisation (torch's sync debug mode raises on one) besides one
    wait per layer for its selection to reach the CPU, and decodes the tokens it decoded before."""
    model, books = tiny
    ids = ids_of(2, 150, seed=3)
    expected = greedy(model, ids, A2ATSCache(books, topk=0.1, offload="none", dense_below=0), new=5)
    cache = A2ATSCache(books, topk=0.1, offload="cpu")
    out = greedy(model, ids, cache, new=2)
    waits = []
    original = torch.cuda.Event.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda event: waits.append(event) or original(event))
    token, position = out[:, -1:], torch.full((2, 1), out.shape[1] - 1, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            logits = model(token, position_ids=position + step, use_cache=True, **cache_argument(model, cache)).logits
            token = logits[:, -1:].argmax(-1)
            out = torch.cat([out, token], dim=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(waits) == 3 * len(cache.a2ats_layers)
    assert torch.equal(out, expected)


ONE_LAYER = 2 * kv_bytes(2, 2, 16, torch.float32, 200, 1) - 1  # "auto": the first of the tiny model's two layers on
# the device (short of room for both, with room for the other's row-cache slots where there are some)


@pytest.mark.parametrize("offload, share, window", [("cpu", 0.4, None), ("auto", 0.4, None), ("cpu", 1.0, None),
                                                    ("auto", 1.0, None), ("cpu", 1.0, 4)])
def test_a_gpu_share_attends_the_same_rows(tiny, offload, share, window, monkeypatch):
    """``gpu_share`` splits each offloaded layer's selection: the device attends the first share itself, beside
    the window, reading the rows in place from the store's one block, the CPU the rest (with 1, none); the same
    tokens and statistics as the CPU attending every row. With a window narrower than the store's staging (on a
    GPU, eager decode tokens wait there), staged tokens reach the block before they can be picked."""
    model, books = tiny
    ids = ids_of(2, 150, seed=3)
    auto = {"gpu_kv_budget": ONE_LAYER} if offload == "auto" else {}
    caches = [A2ATSCache(books, topk=0.1, offload=offload, max_length=200, gpu_share=s, window=window, row_cache=0,
                         **auto) for s in (0.0, share)]
    outs = [greedy(model, ids, caches[0], new=12)]
    attend, cpu_calls = kernels.sparse_attention, []
    monkeypatch.setattr(kernels, "sparse_attention", lambda *args: cpu_calls.append(args) or attend(*args))
    outs.append(greedy(model, ids, caches[1], new=12))
    assert torch.equal(outs[0], outs[1])
    assert bool(cpu_calls) != (share == 1)
    offloaded = [layer for layer in caches[1].a2ats_layers if not layer.store.resident]
    assert offloaded and all(len(layer.store.blocks) == 1 for layer in offloaded)
    assert caches[0].stats.far_selected == caches[1].stats.far_selected > 0


def test_a_gpu_share_past_max_length_warns_and_goes_to_the_cpu(tiny):
    """Decoding past ``max_length`` with ``gpu_share=1``: a warning that names it and what it costs, another
    block per layer, the CPU attending from then on, the tokens of the CPU attending throughout."""
    model, books = tiny
    ids = ids_of(1, 150, seed=4)
    caches = [A2ATSCache(books, topk=0.1, offload="cpu", max_length=155, gpu_share=s, row_cache=0) for s in (0.0, 1.0)]
    run = lambda cache: model.generate(ids, **cache_argument(model, cache), max_new_tokens=12,  # noqa: E731
                                       min_new_tokens=12, do_sample=False, pad_token_id=0)
    reference = run(caches[0])
    with pytest.warns(UserWarning, match=r"past this A2ATSCache's max_length=155.*GiB of CPU memory a layer"):
        out = run(caches[1])
    assert torch.equal(out, reference)
    assert all(len(layer.store.blocks) == 2 and not layer.attended_on_device() for layer in caches[1].a2ats_layers)


@pytest.mark.parametrize("settings, message", [
    ({"gpu_share": 1.5, "max_length": 100}, r"in \[0, 1\], got 1.5"),
    ({"gpu_share": 0.3}, "needs offload=\"cpu\" or \"auto\" .* and max_length"),
    ({"gpu_share": 0.3, "max_length": 100, "offload": "none"}, "got 'none'"),
])
def test_a_gpu_share_is_checked(tiny, settings, message):
    with pytest.raises(ValueError, match=message):
        A2ATSCache(tiny[1], **settings)
