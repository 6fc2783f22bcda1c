"""KVStore and DeviceKVStore: appends in pieces (across KVStore's blocks without re-copying, growing
DeviceKVStore's buffer); gather and to_tensors equal indexing the whole K/V."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from a2ats_hf.store import (
    BLOCK_SIZE,
    HUGE_PAGE,
    STAGING_SLOTS,
    DeviceKVStore,
    KVStore,
    advise_huge_pages,
    from_hugetlb_pool,
    hugetlb_pool,
    pinned_on_huge_pages,
)

STORES = {
    "cpu-blocks": lambda: KVStore(batch=3, heads=2, head_dim=8, dtype=torch.float32, block_size=5),
    "device-buffer": lambda: DeviceKVStore(batch=3, heads=2, head_dim=8, dtype=torch.float32, device="cpu", capacity=2),
}


@pytest.mark.parametrize("kind", STORES)
def test_append_and_gather(kind):
    """Pieces of 1, 3, 7 and 2 tokens: gather and to_tensors match the concatenation."""
    gen = torch.Generator().manual_seed(0)
    store = STORES[kind]()
    keys, values = [], []
    for t in (1, 3, 7, 2):
        k, v = torch.randn(3, 2, t, 8, generator=gen), torch.randn(3, 2, t, 8, generator=gen)
        first_block = store.blocks[0] if getattr(store, "blocks", None) else None
        store.append(k, v)
        assert first_block is None or store.blocks[0] is first_block  # blocks are never re-allocated
        keys.append(k), values.append(v)
    full_k, full_v = torch.cat(keys, 2), torch.cat(values, 2)
    assert store.length == 13
    indices = torch.randint(0, 13, (3, 2, 9), generator=gen)
    gk, gv = store.gather(indices)
    assert torch.equal(gk, full_k.gather(2, indices[..., None].expand(-1, -1, -1, 8)))
    assert torch.equal(gv, full_v.gather(2, indices[..., None].expand(-1, -1, -1, 8)))
    tk, tv = store.to_tensors()
    assert torch.equal(tk, full_k) and torch.equal(tv, full_v)
    for start, end in ((0, 5), (4, 6), (5, 13), (7, 11), (12, 13)):  # spans within and across blocks
        tk, tv = store.to_tensors(start, end)
        assert torch.equal(tk, full_k[:, :, start:end]) and torch.equal(tv, full_v[:, :, start:end])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="staged copies from a GPU need one")
def test_decode_tokens_from_a_gpu_are_staged():
    """Decode tokens from a GPU (more than the staging holds, across blocks, before and after a prompt chunk) read
    back as appended, and appending them issues no host synchronisation (torch's sync debug mode raises on one)."""
    g = torch.Generator().manual_seed(4)
    keys, values = (torch.randn(2, 3, 60, 8, generator=g).cuda() for _ in range(2))
    store = KVStore(2, 3, 8, torch.float32, block_size=5)
    store.append(keys[:, :, :7], values[:, :, :7])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(7, 7 + STAGING_SLOTS + 3):
            store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert store.staged == 4 and store.length == 7 + STAGING_SLOTS + 3  # 15 written to their blocks at the 16th
    store.append(keys[:, :, 26:40], values[:, :, 26:40])  # a chunk: the staged tokens go first
    for t in range(40, 60):
        store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    k, v = store.to_tensors()
    assert store.staged == 0 and torch.equal(k, keys.cpu()) and torch.equal(v, values.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="registering host memory with CUDA needs a GPU")
def test_pinned_blocks_on_huge_pages():
    """A pinned block on huge pages is page-locked for CUDA (asynchronous copies) and takes a GPU's copy; the store's
    blocks are such, where Linux offers transparent huge pages."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this machine")
    block = pinned_on_huge_pages((3, HUGE_PAGE), torch.uint8)
    assert block is not None and block.is_pinned()
    source = torch.arange(3 * HUGE_PAGE, device="cuda").view(3, HUGE_PAGE).to(torch.uint8)
    block.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(block, source.cpu())
    store = KVStore(1, 2, 64, torch.bfloat16)
    store.append(*torch.randn(2, 1, 2, 5, 64, device="cuda", dtype=torch.bfloat16))
    assert store.blocks[0].is_pinned()


def test_sizes():
    """KVStore holds whole blocks; DeviceKVStore its buffer: as allocated while appends fit (a cache's max_length),
    else grown to whole blocks of 4096 tokens."""
    blocks = STORES["cpu-blocks"]()
    blocks.append(torch.zeros(3, 2, 13, 8), torch.zeros(3, 2, 13, 8))
    assert len(blocks.blocks) == 3 and blocks.nbytes == 2 * 3 * (3 * 2 * 5 * 8 * 4)
    buffer = DeviceKVStore(batch=3, heads=2, head_dim=8, dtype=torch.float32, device="cpu", capacity=14)
    for t in (13, 1):
        buffer.append(torch.zeros(3, 2, t, 8), torch.zeros(3, 2, t, 8))
        assert buffer.keys.shape[2] == 14 and buffer.nbytes == 2 * (3 * 2 * 14 * 8 * 4)
    buffer.append(torch.ones(3, 2, 1, 8), torch.ones(3, 2, 1, 8))
    assert buffer.keys.shape[2] == 4096 and buffer.length == 15
    assert buffer.to_tensors(13)[0].tolist() == torch.cat([torch.zeros(3, 2, 1, 8), torch.ones(3, 2, 1, 8)], 2).tolist()


def test_device_store_checks_gpu_memory(monkeypatch):
    """A buffer that cannot fit fails before allocating, saying how much it needs and has."""
    store = DeviceKVStore(batch=1, heads=1, head_dim=8, dtype=torch.float32, device="cpu")
    monkeypatch.setattr("a2ats_hf.store.available_memory", lambda: 100)
    with pytest.raises(MemoryError, match=r"needs 0\.00 GiB of CPU memory"):
        store.append(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))


@pytest.mark.parametrize("batch, heads, head_dim, dtype", [(5, 8, 128, torch.bfloat16), (1, 3, 64, torch.float32),
                                                           (3, 8, 128, torch.bfloat16), (7, 1, 80, torch.float16)])
def test_cpu_blocks_fill_a_power_of_two_of_bytes(batch, heads, head_dim, dtype):
    """The pinned allocator rounds each block up to a power of two of bytes: blocks fill one to within a token, and
    hold at least BLOCK_SIZE tokens."""
    store = KVStore(batch, heads, head_dim, dtype)
    per_token = 2 * batch * heads * head_dim * dtype.itemsize  # a key and a value
    size = store.block_size * per_token
    power = 2 ** math.ceil(math.log2(size))
    assert store.block_size >= BLOCK_SIZE and power - size < per_token


@pytest.mark.parametrize("kind", STORES)
def test_select_rows_and_truncate_follow_the_whole_kv(kind):
    """Rows reordered, repeated and dropped (beam search, assisted decoding), then columns cut (a crop) and more
    appended: the store holds what the same edits of the whole K/V hold."""
    gen = torch.Generator().manual_seed(1)
    store = STORES[kind]()
    keys, values = torch.randn(3, 2, 13, 8, generator=gen), torch.randn(3, 2, 13, 8, generator=gen)
    store.append(keys, values)
    for index in (torch.tensor([2, 0, 0]), torch.tensor([1, 1, 2, 0, 2]), torch.tensor([4, 0])):
        store.select_rows(index)
        keys, values = keys[index], values[index]
    store.truncate(6)
    more_keys, more_values = torch.randn(2, 2, 4, 8, generator=gen), torch.randn(2, 2, 4, 8, generator=gen)
    store.append(more_keys, more_values)
    expected_keys, expected_values = (torch.cat([keys[:, :, :6], more_keys], 2),
                                      torch.cat([values[:, :, :6], more_values], 2))
    assert store.length == 10 and store.shape[0] == 2
    torch.testing.assert_close(store.to_tensors(), (expected_keys, expected_values), rtol=0, atol=0)
    if kind == "cpu-blocks":
        assert len(store.blocks) == 2  # blocks past the cut were freed


@pytest.mark.parametrize("kind", STORES)
def test_stores_share_one_interface(kind):
    """Both stores offer what the Store protocol names; ``resident`` tells the decode step where to attend."""
    from a2ats_hf.store import Store

    store = STORES[kind]()
    names = [n for n in dir(Store) if not n.startswith("_")] + list(Store.__annotations__)
    assert all(hasattr(store, name) for name in names), [n for n in names if not hasattr(store, n)]
    assert store.resident == (kind == "device-buffer")


def test_meminfo_reads_linux_fields_in_bytes():
    """``meminfo`` gives a /proc/meminfo field in bytes (where Linux has one), None for a field it lacks."""
    from a2ats_hf.store import available_memory, meminfo

    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo on this machine")
    total = meminfo("MemTotal")
    assert total is not None and total % 1024 == 0 and 0 < available_memory() <= total
    assert meminfo("NoSuchField") is None


def test_huge_page_advice_covers_whole_huge_pages():
    """Memory spanning whole 2 MiB pages is advised where Linux offers transparent huge pages (not "never"); a
    tensor within one page has nothing to advise."""
    assert advise_huge_pages(torch.empty(16)) is False
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this machine")
    assert advise_huge_pages(torch.empty(3 * HUGE_PAGE, dtype=torch.uint8))


def test_rows_of_a_cpu_store_write_into_the_whole_store():
    """A half's view of a KVStore (a pipelined step's part): its blocks and staging slot are the whole store's rows,
    a token it places lands in the whole store's blocks (a new block reserved by the whole store, shared by the
    other half's view), and it refuses appends."""
    whole = KVStore(batch=3, heads=2, head_dim=8, dtype=torch.float32, block_size=5)
    keys, values = torch.randn(2, 3, 2, 5, 8)
    whole.append(keys, values)  # one full block
    halves = [whole.rows(0, 2), whole.rows(2, 3)]
    assert all(part.blocks[0].data_ptr() == whole.blocks[0][rows].data_ptr()
               for part, rows in zip(halves, (slice(0, 2), slice(2, 3))))
    new = torch.randn(2, 3, 2, 1, 8)
    for part, rows in zip(halves, (slice(0, 2), slice(2, 3))):
        part.write(new[0][rows], new[1][rows])
        part.place_written()
    assert len(whole.blocks) == 2 and all(len(part.blocks) == 2 for part in halves)
    whole.length += 1
    assert torch.equal(whole.to_tensors()[0], torch.cat([keys, new[0]], 2))
    assert torch.equal(whole.to_tensors()[1], torch.cat([values, new[1]], 2))
    with pytest.raises(RuntimeError, match="append to the whole store"):
        halves[0].append(new[0][:2], new[1][:2])


def test_rows_of_a_device_store_are_views():
    whole = DeviceKVStore(batch=3, heads=2, head_dim=8, dtype=torch.float32, device="cpu", capacity=4)
    keys, values = torch.randn(2, 3, 2, 4, 8)
    whole.append(keys, values)
    part = whole.rows(1, 3)
    part.write(torch.tensor([3]), *torch.ones(2, 2, 2, 1, 8))
    assert part.shape[0] == 2 and part.length == 4
    assert torch.equal(whole.keys[1:, :, 3], torch.ones(2, 2, 8)) and torch.equal(whole.keys[0], keys[0])


def test_a_one_block_store_is_mapped_as_views():
    """A store allocated whole (``gpu_share``: one block for max_length tokens) offers its K/V as [B, H, N, D] views
    a GPU kernel can read in place; one with several blocks offers none."""
    whole = KVStore(batch=2, heads=3, head_dim=8, dtype=torch.float32, block_size=10)
    keys, values = torch.randn(2, 2, 3, 7, 8)
    whole.append(keys, values)
    mapped = whole.mapped()
    assert mapped.keys.data_ptr() == whole.blocks[0].data_ptr() and mapped.length == 7
    assert torch.equal(mapped.keys[:, :, :7], keys) and torch.equal(mapped.values[:, :, :7], values)
    index = torch.tensor([[[6, 0]] * 3] * 2)
    assert all(torch.equal(a, b) for a, b in zip(mapped.gather(index), whole.gather(index)))
    whole.append(*torch.randn(2, 2, 3, 4, 8))
    assert whole.mapped() is None


def test_a_deep_copy_has_blocks_of_its_own_kind():
    """A deep copy of a CPU store holds what the store holds in blocks of its own, pinned where the store's are (a
    GPU reads a pinned block in place; torch's deep copy of a tensor would be pageable)."""
    store = KVStore(batch=2, heads=3, head_dim=8, dtype=torch.float32, block_size=10)
    store.append(*torch.randn(2, 2, 3, 7, 8))
    clone = copy.deepcopy(store)
    assert [b.data_ptr() for b in clone.blocks] != [b.data_ptr() for b in store.blocks]
    assert len(clone.blocks) == len(store.blocks) == 1
    # Only the 7 written tokens: a block's unwritten tail is uninitialised memory (a NaN there is unequal to itself).
    assert all(torch.equal(a[:, :, :7], b[:, :, :7]) and a.is_pinned() == b.is_pinned()
               for a, b in zip(clone.blocks, store.blocks))
    assert clone.mapped().length == 7 and all(torch.equal(a, b) for a, b in zip(clone.to_tensors(), store.to_tensors()))
    clone.append(*torch.randn(2, 2, 3, 1, 8))
    assert store.length == 7 and clone.length == 8


def test_without_room_in_a_hugetlb_pool_blocks_are_ordinary_memory(monkeypatch):
    """No pool, or a pool whose pages the kernel refuses to map: no pool memory, and a store's blocks come from
    ordinary (transparent huge page) memory. A pool's free pages count as available memory."""
    import mmap

    from a2ats_hf import store as store_module

    monkeypatch.setattr(store_module, "hugetlb_pool", lambda: (0, 0))
    assert from_hugetlb_pool((4, 8), torch.float32) is None
    monkeypatch.setattr(store_module, "hugetlb_pool", lambda: (1 << 40, HUGE_PAGE))
    assert store_module.available_memory() > 1 << 40  # the pool's free pages count as available to the store

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    assert from_hugetlb_pool((4, 8), torch.float32) is None
    store = KVStore(batch=1, heads=2, head_dim=8, dtype=torch.float32, block_size=5)
    keys, values = torch.randn(2, 1, 2, 7, 8)
    store.append(keys, values)
    assert torch.equal(store.to_tensors()[0], keys)


@pytest.mark.skipif(hugetlb_pool()[0] < 4 * HUGE_PAGE,
                    reason="needs a hugetlb pool with 4 free 2 MiB pages (sysctl vm.nr_hugepages=4)")
def test_blocks_come_from_the_hugetlb_pool_where_it_has_room():
    """Where an administrator reserved huge pages, a store's blocks take them (huge pages for certain), hold what is
    appended, and give them back when freed."""
    free = hugetlb_pool()[0]
    store = KVStore(batch=1, heads=2, head_dim=8, dtype=torch.float32, block_size=100)
    keys, values = torch.randn(2, 1, 2, 150, 8)
    store.append(keys, values)
    assert hugetlb_pool()[0] == free - 2 * HUGE_PAGE  # two blocks, a page each
    assert torch.equal(store.to_tensors()[0], keys) and torch.equal(store.to_tensors()[1], values)
    del store
    assert hugetlb_pool()[0] == free
