"""The device cache of recently picked rows: a selection's split and the slots' bookkeeping against a plain model of
it, and decoding with it against decoding without."""

from __future__ import annotations

import pytest
import torch
from test_step import ONE_LAYER, greedy

from a2ats_hf import A2ATSCache, cache_argument, kernels
from a2ats_hf.rowcache import RowCache

from conftest import DEVICE, ids_of

D, TOKENS = 4, 50
attend = kernels.sparse_attention


def key_of(token: torch.Tensor) -> torch.Tensor:
    """A row's key as the test stores it: its token, repeated [..., D]."""
    return token.float()[..., None].expand(*token.shape, D)


def check_consistent(rows: RowCache) -> None:
    """Every held token maps to its slot, holds its own key and value, and nothing else maps anywhere."""
    held = rows.token >= 0
    for b, h in torch.cartesian_prod(torch.arange(rows.token.shape[0]), torch.arange(rows.token.shape[1])).tolist():
        tokens, slots = rows.token[b, h][held[b, h]].long(), held[b, h].nonzero().flatten()
        assert torch.equal(rows.slot[b, h, tokens].long(), slots)
        assert int((rows.slot[b, h, :-1] >= 0).sum()) == len(tokens)
        assert torch.equal(rows.keys[b, h, slots], key_of(tokens)) and torch.equal(rows.values[b, h, slots],
                                                                                  -key_of(tokens))


def test_split_and_fill_follow_the_rows_picked_most_recently():
    """Random selections of awkward widths over 60 steps: the hits are exactly the selected rows held, in slots
    that hold them; the misses the rest, in the selection's order; the first misses (up to the fill width) are held
    afterwards, in the slots of the rows picked longest ago; this step's hits are never evicted."""
    g = torch.Generator().manual_seed(0)
    rows = RowCache.empty(2, 3, 24, D, TOKENS, torch.float32, torch.device("cpu"))
    last_picked = torch.full((2, 3, TOKENS), -1)
    for step in range(60):
        k = int(torch.randint(6, 13, (1,), generator=g))
        pool = torch.randperm(20, generator=g)[:16] + (step % 3) * 10  # overlapping picks, drifting
        indices = torch.stack([torch.stack([pool[torch.randperm(16, generator=g)[:k]].sort().values for _ in range(3)])
                               for _ in range(2)]).int()
        counts = torch.randint(k - 3, k + 1, (2, 3), generator=g).int()
        before = rows.token.clone()
        split = rows.split(indices, counts, step)
        for b in range(2):
            for h in range(3):
                chosen = indices[b, h, : counts[b, h]].long()
                held = set(before[b, h][before[b, h] >= 0].tolist())
                hits = split.hit_slots[b, h, : split.hit_counts[b, h]].long()
                assert sorted(rows.token[b, h, hits].tolist()) == sorted(t for t in chosen.tolist() if t in held)
                misses = split.miss_indices[b, h, : split.miss_counts[b, h]].tolist()
                assert misses == [t for t in chosen.tolist() if t not in held]
                last_picked[b, h, chosen] = step
        f = rows.fill_width(k)
        incoming = split.miss_indices[..., :f].long()
        rows.fill(split, torch.stack([key_of(incoming), -key_of(incoming)], dim=3), step)
        check_consistent(rows)
        for b in range(2):
            for h in range(3):
                chosen = indices[b, h, : counts[b, h]].tolist()
                now_held = set(rows.token[b, h][rows.token[b, h] >= 0].tolist())
                assert set(split.miss_indices[b, h, : min(f, int(split.miss_counts[b, h]))].tolist()) <= now_held
                assert set(chosen) & set(before[b, h].tolist()) <= now_held  # hits stay
                stamps = last_picked[b, h, rows.token[b, h][rows.token[b, h] >= 0].long()]
                assert (stamps >= 0).all()


def test_rows_views_write_through_and_select_copies():
    rows = RowCache.empty(3, 1, 4, D, TOKENS, torch.float32, torch.device("cpu"))
    part = rows.rows(1, 3)
    indices, counts = torch.tensor([[[5, 7]], [[9, 11]]], dtype=torch.int32), torch.tensor([[2], [2]])
    split = part.split(indices, counts, 0)
    part.fill(split, torch.stack([key_of(indices.long()[..., :1]), -key_of(indices.long()[..., :1])], dim=3), 0)
    assert rows.token[1:, 0].sort(-1).values[..., -1].tolist() == [5, 9] and (rows.token[:, 0] >= 0).sum() == 2
    picked = rows.select_rows(torch.tensor([2, 2]))
    assert picked.token[:, 0].max(-1).values.tolist() == [9, 9] and picked.keys.data_ptr() != rows.keys.data_ptr()


@pytest.mark.parametrize("offload, budget, share", [
    ("cpu", "query_head", 0), ("cpu", "kv_head", 0), ("auto", "kv_head", 0), ("cpu", "query_head", 1),
    ("auto", "kv_head", 1)], ids=["cpu", "cpu-kv-head", "auto", "gpu-reads-misses", "auto-gpu-reads-misses"])
def test_a_row_cache_decodes_as_the_cpu_does(tiny, offload, budget, share, monkeypatch):
    """With recently picked rows attended from device slots, the same tokens and statistics as the CPU attending
    every row; once the slots have filled, most picks are found there, and they hold what the store holds. With
    ``gpu_share=1`` the device reads the misses into the slots itself, and the CPU attends nothing."""
    model, books = tiny
    ids = ids_of(2, 150, seed=5)
    auto = {"gpu_kv_budget": ONE_LAYER} if offload == "auto" else {}
    caches = [A2ATSCache(books, topk=0.1, offload=offload, budget=budget, max_length=200, row_cache=r,
                         gpu_share=s, **auto) for r, s in ((0, 0), (2, share))]
    outs = [greedy(model, ids, caches[0], new=30)]
    cpu_calls = []
    monkeypatch.setattr(kernels, "sparse_attention", lambda *args: cpu_calls.append(args) or attend(*args))
    outs.append(greedy(model, ids, caches[1], new=30))
    assert torch.equal(outs[0], outs[1])
    assert bool(cpu_calls) != (share == 1)
    assert caches[0].row_cache_hits != caches[0].row_cache_hits  # nan: none kept
    if share == 1:  # every miss comes in, not an eighth of the width: the slots fill faster
        slow = A2ATSCache(books, topk=0.1, offload=offload, budget=budget, max_length=200, row_cache=2, **auto)
        greedy(model, ids, slow, new=30)
        assert slow.row_cache_hits < caches[1].row_cache_hits < 1
    else:  # a step brings in at most an eighth of its width: they fill slowly (0.24-0.45 over these 30 steps here
        assert 0.15 < caches[1].row_cache_hits < 1  # and on an H200, where the tiny model's tokens differ)
    assert caches[0].stats.far_selected == caches[1].stats.far_selected > 0
    cache, shape = caches[1], books.fingerprint
    width = cache.budget_for(200 - cache.window - cache.sink)  # max_length's far tokens
    group = shape["num_attention_heads"] // shape["num_key_value_heads"] if budget == "query_head" else 1
    assert cache.row_slots == 2 * width * group
    offloaded = [layer for layer in caches[1].a2ats_layers if not layer.store.resident]
    assert offloaded and all(layer.row_cache is None for layer in caches[1].a2ats_layers if layer.store.resident)
    for layer in offloaded:
        rows, (keys, values) = layer.row_cache, layer.store.to_tensors()
        assert rows.slots == cache.row_slots
        held = rows.token >= 0
        assert held.any(-1).all()
        b, h = (t.cpu() for t in torch.nonzero(held, as_tuple=True)[:2])
        tokens = rows.token[held].long().cpu()
        assert torch.equal(rows.keys[held].cpu(), keys[b, h, tokens])
        assert torch.equal(rows.values[held].cpu(), values[b, h, tokens])


def test_a_row_cache_follows_beam_search_and_crop(tiny):
    model, books = tiny
    ids = ids_of(1, 120, seed=6)
    caches = [A2ATSCache(books, topk=0.1, max_length=200, row_cache=r) for r in (0, 2)]
    outs = [model.generate(ids, **cache_argument(model, c), max_new_tokens=10, num_beams=3, do_sample=False)
            for c in caches]
    assert torch.equal(outs[0], outs[1])
    cache = caches[1]
    cache.crop(-5)
    assert all((layer.row_cache.token == -1).all() for layer in cache.a2ats_layers)


@pytest.mark.parametrize("settings, message", [
    ({"row_cache": 1.5, "max_length": 100}, "0 \\(none\\) or at least 2, got 1.5"),
    ({"row_cache": 2}, "needs offload=\"cpu\" or \"auto\" .* and max_length"),
    ({"row_cache": 2, "max_length": 100, "offload": "none"}, "got 'none'"),
    ({"row_cache": 2, "max_length": 100, "gpu_share": 0.3}, r"combines with gpu_share 0 .* or 1 .*, got 0.3"),
])
def test_a_row_cache_is_checked(tiny, settings, message):
    with pytest.raises(ValueError, match=message):
        A2ATSCache(tiny[1], **settings)


@pytest.mark.parametrize("settings, wanted", [
    ({"max_length": 100}, 2), ({"max_length": 100, "offload": "auto"}, 2), ({"max_length": 100, "gpu_share": 1}, 2),
    ({}, 0), ({"max_length": 100, "offload": "none"}, 0), ({"max_length": 100, "gpu_share": 0.3}, 0),
    ({"max_length": 100, "row_cache": 0}, 0), ({"max_length": 100, "row_cache": 3}, 3)])
def test_the_default_row_cache_is_wanted_where_it_can_serve(tiny, settings, wanted):
    """By default an offloading cache with max_length (its slots are sized once) and gpu_share 0 or 1 wants 2
    budgets of slots; without max_length, with the K/V on the device or a partial share it wants none; a value given
    is kept."""
    assert A2ATSCache(tiny[1], **settings).config.rows_wanted == wanted


def test_the_default_row_cache_decodes_as_none_and_holds_rows_only_on_a_gpu(tiny):
    """The default row cache on the test device: kept on a GPU (the same tokens as none), settled to none on a CPU,
    where it would only copy CPU memory into CPU memory."""
    model, books = tiny
    ids = ids_of(2, 150, seed=5).to(DEVICE)
    caches = [A2ATSCache(books, topk=0.1, max_length=200, **extra) for extra in ({"row_cache": 0}, {})]
    outs = [greedy(model, ids, cache, new=20) for cache in caches]
    assert torch.equal(outs[0], outs[1])
    on_gpu = DEVICE.type == "cuda"
    assert caches[1].row_cache == (2 if on_gpu else 0) and (caches[1].row_slots > 0) == on_gpu
    assert all((layer.row_cache is not None) == on_gpu for layer in caches[1].a2ats_layers)
