"""Placement: where each layer keeps its K/V under offload="none" / "cpu" / "auto", checked before allocating."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf import A2ATSCache, cache_argument

from conftest import DEVICE, generate, ids_of


def test_max_length_below_the_prompt_is_refused(tiny):
    model, books = tiny
    with pytest.raises(ValueError, match="max_length=40"):
        generate(model, ids_of(1, 60), A2ATSCache(books, max_length=40), new=2)


def test_window_and_sinks_count_in_the_memory_check(tiny):
    """An absurd window fails before allocating, naming the window (it tried to allocate many GB per tensor)."""
    model, books = tiny
    with pytest.raises(MemoryError, match="10000000000-token window"):
        generate(model, ids_of(1, 30), A2ATSCache(books, window=10**10), new=1)


def test_cpu_memory_is_checked_before_allocating(tiny, monkeypatch):
    """A batch whose K/V would not fit in CPU memory fails at once with the bytes needed and available."""
    from a2ats_hf import store

    model, books = tiny
    monkeypatch.setattr(store, "available_memory", lambda: 2**20)
    cache = A2ATSCache(books, max_length=100_000)
    with pytest.raises(MemoryError, match=r"needs \d+\.\d+ GiB of CPU memory but only 0\.00 GiB"):
        generate(model, ids_of(1, 50), cache)
    assert not cache.layers[1].is_initialized


def test_resident_memory_is_checked_where_it_lives(tiny, monkeypatch):
    """With offload="none" the whole K/V is checked against the device's memory (the CPU's for a CPU model) and a
    given max_length allocates each layer's buffer whole, so it never grows."""
    from a2ats_hf import store

    model, books = tiny
    if DEVICE.type == "cpu":
        monkeypatch.setattr(store, "available_memory", lambda: 2**20)
    else:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**30))
    with pytest.raises(MemoryError, match=r"needs \d+\.\d+ GiB of (CPU memory|memory on cuda)"):
        generate(model, ids_of(1, 50), A2ATSCache(books, max_length=100_000, offload="none"))
    monkeypatch.undo()
    cache = A2ATSCache(books, max_length=80, offload="none")
    generate(model, ids_of(1, 50), cache, new=5)
    assert all(layer.store.keys.shape[2] == 80 for layer in cache.a2ats_layers)


def test_auto_keeps_layers_on_the_device_while_the_budget_lasts(tiny):
    """offload="auto" with room for one layer's K/V: the first keeps it on the device, the others in CPU memory,
    and decoding equals offload="cpu"'s; without a budget on a CPU model everything goes to CPU memory."""
    from a2ats_hf.store import DeviceKVStore, KVStore, kv_bytes

    model, books = tiny
    ids = ids_of(1, 200)
    layer_bytes = kv_bytes(1, 2, 16, torch.float32, 200, 1)
    logits = {}
    for offload, budget in (("cpu", None), ("auto", layer_bytes + 1)):
        cache = A2ATSCache(books, topk=0.1, offload=offload, gpu_kv_budget=budget, dense_below=0,
                           rerank=1)  # (its device layer selects as the CPU store does)
        with torch.no_grad():
            model(ids.to(DEVICE), **cache_argument(model, cache))
            logits[offload] = torch.cat([model(torch.full((1, 1), t, device=DEVICE),
                                               **cache_argument(model, cache)).logits
                                         for t in range(5, 9)], 1)
    kinds = [type(layer.store) for layer in cache.a2ats_layers]
    assert len(kinds) > 1 and kinds[0] is DeviceKVStore and set(kinds[1:]) == {KVStore}
    assert cache.memory_footprint()["cpu_bytes"] == sum(layer.store.nbytes for layer in cache.a2ats_layers[1:])
    torch.testing.assert_close(logits["auto"], logits["cpu"], atol=1e-5, rtol=1e-4)
    if DEVICE.type == "cpu":
        cache = A2ATSCache(books, offload="auto")
        generate(model, ids, cache, new=2)
        assert all(isinstance(layer.store, KVStore) for layer in cache.a2ats_layers)


def test_auto_checks_cpu_memory_for_the_layers_it_offloads(tiny, monkeypatch):
    """Before allocating, offload="auto" counts against CPU memory only the layers beyond the device budget (no row
    cache: on a GPU the default one's slots would take from the budget too)."""
    from a2ats_hf import store

    model, books = tiny
    monkeypatch.setattr(store, "available_memory", lambda: 2**20)
    layer_bytes = store.kv_bytes(1, 2, 16, torch.float32, 100_000, 1)
    with pytest.raises(MemoryError, match=f"The K/V of {len(books.layers) - 1} layers"):
        generate(model, ids_of(1, 50), A2ATSCache(books, max_length=100_000, offload="auto", gpu_kv_budget=layer_bytes,
                                                    row_cache=0))


def test_row_cache_slots_are_counted(monkeypatch):
    """An offloaded layer's row-cache slots count towards the memory check of where the cache's device state
    lives (here the CPU's, with the K/V)."""
    from a2ats_hf import store
    from a2ats_hf.config import A2ATSConfig
    from a2ats_hf.placement import Placement

    config = A2ATSConfig(16, 4, max_length=1000, row_cache=2)
    keys = torch.zeros(2, 2, 100, 16)
    monkeypatch.setattr(store, "available_memory", lambda: 2**30)
    Placement(config, 3).check(keys)
    with pytest.raises(MemoryError, match="1000000 row-cache slots per row and KV head"):
        Placement(config, 3, row_slots=10**6).check(keys)


@pytest.mark.parametrize("row_slots, resident", [(0, 2), (40, 1), (10**4, 0)])
def test_auto_takes_row_cache_slots_from_its_budget(row_slots, resident):
    """offload="auto" keeps on the device as many layers as its budget holds beside the row-cache slots of the
    layers it offloads: room for two layers' K/V keeps two without a row cache, fewer as the slots grow."""
    from a2ats_hf.config import A2ATSConfig
    from a2ats_hf.placement import Placement
    from a2ats_hf.store import DeviceKVStore, kv_bytes

    keys = torch.zeros(2, 2, 100, 16)
    budget = 2 * kv_bytes(2, 2, 16, keys.dtype, 1000, 1) + 1
    config = A2ATSConfig(16, 4, max_length=1000, offload="auto", gpu_kv_budget=budget, row_cache=2)
    placement = Placement(config, 3, row_slots)
    assert placement.resident(keys, 1000) == resident
    stores = [placement.new_store(keys) for _ in range(3)]
    assert [isinstance(s, DeviceKVStore) for s in stores] == [True] * resident + [False] * (3 - resident)
    if resident:  # (slots larger than the budget are the memory check's to refuse)
        held = resident * kv_bytes(2, 2, 16, keys.dtype, 1000, 1) + (3 - resident) * placement.slot_bytes(keys, 1000)
        assert held <= budget


@pytest.mark.parametrize("row_cache, budget, kept", [(None, 10**9, True), (None, 10**4, False), (2, 10**4, True)])
def test_the_default_row_cache_is_kept_where_the_budget_holds_every_layers_slots(row_cache, budget, kept):
    """A row cache asked for keeps its slots (the memory check refuses them where they do not fit); the default's
    are settled at each prompt: kept where the device's budget holds every layer's, else none. (Keys on the meta
    device: not a CPU, and only their shape counts.)"""
    from a2ats_hf.config import A2ATSConfig
    from a2ats_hf.placement import Placement

    config = A2ATSConfig(16, 4, max_length=1000, offload="auto", gpu_kv_budget=budget, row_cache=row_cache)
    placement = Placement(config, 3, row_slots=40)
    placement.settle_rows(torch.empty(2, 2, 100, 16, device="meta"), 1000)
    assert placement.row_slots == (40 if kept else 0)
    placement.settle_rows(torch.empty(2, 2, 100, 16), 1000)  # a CPU model's keys: the default keeps none
    assert placement.row_slots == (40 if row_cache else 0)


@pytest.mark.parametrize("short", [0, 1])
def test_the_default_row_cache_counts_the_codes_and_windows_beside_its_slots(short):
    """Slots that fit the budget alone but not beside every layer's codes, sinks and window are not kept: the
    default would turn a cache that fits into a memory error."""
    from a2ats_hf.config import A2ATSConfig
    from a2ats_hf.placement import Placement

    keys = torch.empty(2, 2, 100, 16, device="meta")
    probe = Placement(A2ATSConfig(16, 4, max_length=1000, offload="cpu"), 3, row_slots=40)
    needed = 3 * probe.slot_bytes(keys, 1000) + probe.local_bytes(keys, 1000)
    assert probe.local_bytes(keys, 1000) > 0
    placement = Placement(A2ATSConfig(16, 4, max_length=1000, offload="auto", gpu_kv_budget=needed - short), 3,
                          row_slots=40)
    placement.settle_rows(keys, 1000)
    assert placement.row_slots == (0 if short else 40)


def test_the_device_budget_is_read_once_a_prompt(monkeypatch):
    """The default row cache and "auto"'s resident layers settle on one reading of the device's free memory, and a
    new prompt reads it again."""
    from a2ats_hf import placement as placement_module
    from a2ats_hf.config import A2ATSConfig

    reads = []
    monkeypatch.setattr(placement_module, "device_budget", lambda device: reads.append(device) or 10**9)
    placement = placement_module.Placement(A2ATSConfig(16, 4, max_length=1000, offload="auto"), 3, row_slots=40)
    keys = torch.empty(2, 2, 100, 16, device="meta")
    for prompt in (1, 2):
        placement.settle_rows(keys, 1000)
        assert placement.resident(keys, 1000) == 3 and placement.row_slots == 40
        assert len(reads) == prompt
        placement.reset()
