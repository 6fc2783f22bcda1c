"""Where one layer's full post-RoPE K/V lives, behind one interface (:class:`Store`): `KVStore` in CPU memory, grown
in fixed blocks (never re-copied), or `DeviceKVStore` in one buffer on the GPU (``A2ATSCache(offload="none")``)."""

from __future__ import annotations

import copy
import ctypes
import functools
import math
import mmap
import os
import sys
import weakref
from pathlib import Path
from typing import Protocol

import torch


def meminfo(field: str) -> int | None:
    """Bytes of a Linux ``/proc/meminfo`` field (``MemAvailable``, ``AnonHugePages``...), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes of CPU memory available to new allocations (Linux ``MemAvailable``, and the free pages of a hugetlb pool,
    which the store's blocks take first: :func:`from_hugetlb_pool`), or None where unknown."""
    available = meminfo("MemAvailable")
    if available is not None:
        return available + hugetlb_pool()[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, what: str, device: torch.device | None = None) -> None:
    """Raise MemoryError naming ``what`` when ``needed`` bytes exceed the memory available on ``device`` (CPU
    memory by default, else the GPU's free memory)."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else available_memory()
    if free is not None and needed > free:
        where = f"memory on {device}" if on_gpu else "CPU memory"
        hint = ('use offload="cpu", a smaller batch or context' if on_gpu
                else "use a smaller batch or context, or a machine with more memory")
        raise MemoryError(
            f"{what} needs {needed / 2**30:.2f} GiB of {where} but only {free / 2**30:.2f} GiB is available; {hint}."
        )


def select(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``tensor``, in place where the row count stays (beam search): a captured CUDA graph keeps
    reading the same addresses."""
    if len(index) == tensor.shape[0]:
        return tensor.copy_(tensor.index_select(0, index))
    return tensor.index_select(0, index)


MADV_HUGEPAGE = 14  # Linux's madvise() advice: back the range with transparent huge pages
HUGE_PAGE = 2 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the whole 2 MiB pages of ``tensor``'s memory with transparent huge pages (best before it is
    first written): the CPU attention's random rows of a large store then cost far fewer page walks (one TLB entry
    covers 512x the memory). Returns whether the advice was taken; elsewhere, or for memory the kernel refuses to
    advise, nothing happens."""
    libc = _libc()
    begin = tensor.data_ptr()
    start = -(-begin // HUGE_PAGE) * HUGE_PAGE
    end = (begin + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if libc is None or end <= start:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


MAP_HUGETLB = 0x40000  # Linux's mmap() flag: pages from the hugetlb pool


def hugetlb_pool() -> tuple[int, int]:
    """(bytes free, page size) of the machine's hugetlb pool, the huge pages an administrator reserved
    (``sysctl vm.nr_hugepages=N``); (0, 0) where there is none."""
    free, reserved = meminfo("HugePages_Free"), meminfo("HugePages_Rsvd") or 0  # counts (read as kB: x 1024)
    size = meminfo("Hugepagesize")
    return (0, 0) if not free or not size else ((free - reserved) // 1024 * size, size)


def from_hugetlb_pool(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Memory for ``shape`` from the hugetlb pool, where it has room, else None: huge pages for certain, where
    transparent ones are advice the kernel may not follow. Reserved whole when mapped (so touching it cannot
    fail), and given back to the pool when the tensor's memory is freed."""
    numel = math.prod(shape)
    free, page = hugetlb_pool()
    size = -(-numel * dtype.itemsize // max(page, 1)) * page
    if numel == 0 or size > free:
        return None
    try:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(memory, dtype=dtype, count=numel).view(shape)


def on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Memory for ``shape`` on huge pages: from the hugetlb pool where it has room, else pageable memory advised onto
    transparent huge pages; None where neither is offered."""
    tensor = from_hugetlb_pool(shape, dtype)
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype)
        if not advise_huge_pages(tensor):
            return None
    return tensor


PIN_ON_HUGE_PAGES = True  # pinned blocks on huge pages, registered with CUDA (else from CUDA's pinned allocator)


def pinned_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Page-locked host memory on huge pages (:func:`on_huge_pages`), or None where Linux or CUDA refuses: registered
    with CUDA (``cudaHostRegister``, which faults its pages in), so copies between it and a GPU are asynchronous as
    from CUDA's pinned allocator, whose memory cannot be advised. Unregistered when the tensor is freed."""
    tensor = on_huge_pages(shape, dtype)
    if tensor is None:
        return None
    cudart, pointer = torch.cuda.cudart(), tensor.data_ptr()
    if int(cudart.cudaHostRegister(pointer, tensor.numel() * tensor.element_size(), 0)) != 0:
        return None
    weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)
    return tensor


BLOCK_SIZE = 4096


def block_tokens(batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Tokens per CPU block (each token's key and value side by side): as many as fit the power of two of bytes at
    or above ``BLOCK_SIZE`` tokens' worth. Pinned memory comes from a caching allocator that rounds every allocation
    up to a power of two, so a block of ``BLOCK_SIZE`` tokens could waste up to half its memory (80 MiB takes 128 MiB
    at batch 5 of Llama-3.1-8B); this one wastes less than a token."""
    per_token = 2 * batch * heads * head_dim * dtype.itemsize
    return max(1, 2 ** math.ceil(math.log2(per_token * BLOCK_SIZE)) // per_token)


def kv_bytes(batch: int, heads: int, head_dim: int, dtype: torch.dtype, tokens: int,
             block_size: int | None = None) -> int:
    """CPU bytes of one layer's keys and values for ``tokens`` tokens, allocated in whole blocks (default: the
    store's, :func:`block_tokens`; 1 for a device buffer)."""
    block_size = block_size or block_tokens(batch, heads, head_dim, dtype)
    return 2 * math.ceil(tokens / block_size) * block_size * batch * heads * head_dim * dtype.itemsize


class Store(Protocol):
    """What a layer's K/V store offers, wherever it keeps the K/V: ``resident`` says whether the K/V sits on the
    layer's device (its selected rows attended there) or in CPU memory (attended by the CPU kernel)."""

    resident: bool
    shape: tuple[int, int, int, int]  # [B, H, block or buffer granularity, D]
    dtype: torch.dtype
    device: torch.device
    length: int

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None: ...
    def wait(self) -> None: ...
    def place_staged(self) -> None: ...
    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def to_tensors(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...
    def select_rows(self, index: torch.Tensor) -> None: ...
    def truncate(self, length: int) -> None: ...
    def held(self) -> tuple[torch.Tensor | None, ...]: ...
    @property
    def nbytes(self) -> int: ...


STAGING_SLOTS = 16  # decode tokens a store keeps in pinned staging before it writes them into its blocks (the
# last slot is a capture-ready step's)


class KVStore:
    """Keys and values [B, H, N, D] kept on the CPU as a list of [B, H, block_size, 2, D] blocks: each token's key
    and value side by side, so a selected token is one contiguous read (one page, one run of cache lines) for the CPU
    attention instead of two; pageable blocks on transparent huge pages (:func:`advise_huge_pages`).

    Appending fills the last block and adds new ones as needed, so what is stored is never copied again.
    Blocks are pinned when CUDA is available. A decode token from a GPU goes to a contiguous pinned staging slot
    (a strided copy into a block goes through a pageable temporary: it returns only once the GPU has finished all
    it was queued behind) and reaches its block on the CPU side at the next read of the store (:meth:`wait`), by
    when its copy has landed: the layer's selection was queued after it.
    """

    resident = False

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, block_size: int | None = None):
        block_size = block_size or block_tokens(batch, heads, head_dim, dtype)
        self.shape = (batch, heads, block_size, head_dim)
        self.dtype = dtype
        self.block_size = block_size
        self.pin = torch.cuda.is_available()
        self.blocks: list[torch.Tensor] = []
        self.length = 0
        self.device = torch.device("cpu")
        self.staging: torch.Tensor | None = None  # [STAGING_SLOTS, B, H, 2, D] pinned, for decode tokens
        self.staged = 0  # the last `staged` tokens of `length` are in staging, not yet in their blocks
        self.landed: torch.cuda.Event | None = None  # after the last copy from a GPU (or a captured step's write
        # into the block, where the GPU attends it in place), until waited on

    def wait(self) -> None:
        """Block until the copies from a GPU have landed (they have by the time a layer's CPU attention reads the
        store), then write the staged tokens into their blocks."""
        if self.landed is not None:
            if not self.landed.query():  # (a wait on a finished event is still a call the step need not make)
                self.landed.synchronize()
            self.landed = None
        start = self.length - self.staged
        for i in range(self.staged):
            column = start + i
            self.blocks[column // self.block_size][:, :, column % self.block_size] = self.staging[i]
        self.staged = 0

    def place_staged(self) -> None:
        """The staged tokens into their blocks (waiting for their copies), if any are staged."""
        if self.staged:
            self.wait()

    def _new_block(self) -> torch.Tensor:
        """A new block on huge pages (:func:`on_huge_pages`: the hugetlb pool where it has room, else transparent
        huge pages), before the appends write it: pinned ones through :func:`pinned_on_huge_pages` (from CUDA's
        pinned allocator where that fails)."""
        b, h, n, d = self.shape
        shape = (b, h, n, 2, d)
        if not self.pin:
            block = on_huge_pages(shape, self.dtype)
            return torch.empty(shape, dtype=self.dtype) if block is None else block
        block = pinned_on_huge_pages(shape, self.dtype) if PIN_ON_HUGE_PAGES else None
        return torch.empty(shape, dtype=self.dtype, pin_memory=True) if block is None else block

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [B, H, T, D] keys and values; copies from a GPU are asynchronous (on its current stream)."""
        t = keys.shape[-2]
        self._reserve(t)
        from_gpu = self.pin and keys.is_cuda
        if from_gpu and t == 1:
            self._stage(keys, values)
        else:
            self.wait()  # the staged tokens first, in order
            done = 0
            while done < t:
                offset = self.length % self.block_size
                n = min(t - done, self.block_size - offset)
                for half, source in enumerate((keys, values)):
                    self.blocks[self.length // self.block_size][:, :, offset : offset + n, half].copy_(
                        source[:, :, done : done + n], non_blocking=from_gpu)
                done += n
                self.length += n
        if from_gpu:
            self.landed = self.landed or torch.cuda.Event()
            self.landed.record(torch.cuda.current_stream(keys.device))

    def _reserve(self, t: int) -> None:
        """Blocks for ``t`` more tokens past ``length``, once CPU memory is checked for them."""
        blocks = math.ceil((self.length + t) / self.block_size) - len(self.blocks)
        if blocks > 0:
            b, h, _, d = self.shape
            needed = kv_bytes(b, h, d, self.dtype, blocks * self.block_size, self.block_size)
            check_memory(needed, f"Storing {t} more tokens of K/V (batch {b}, {h} KV heads)")
            self.blocks += [self._new_block() for _ in range(blocks)]

    def _stage(self, keys: torch.Tensor, values: torch.Tensor, slot: int | None = None) -> None:
        """One decode token [B, H, 1, D] into staging slot ``slot`` (default: the next, counted as stored),
        asynchronously from a GPU."""
        if slot is None and self.staged == STAGING_SLOTS - 1:
            self.wait()
        self.staging_slots()
        pair = torch.cat([keys, values], dim=2).to(self.dtype)  # [B, H, 2, D], contiguous on the GPU
        self.staging[self.staged if slot is None else slot].copy_(pair, non_blocking=keys.is_cuda)
        if slot is None:
            self.staged += 1
            self.length += 1

    def staging_slots(self) -> torch.Tensor:
        """The staging slots [STAGING_SLOTS, B, H, 2, D] (pinned where blocks are), allocated on first use."""
        if self.staging is None:
            b, h, _, d = self.shape
            self.staging = torch.empty(STAGING_SLOTS, b, h, 2, d, dtype=self.dtype, pin_memory=self.pin)
        return self.staging

    def __deepcopy__(self, memo: dict) -> "KVStore":
        """An independent copy whose blocks are new ones of the same kind (pinned where these are: a GPU reads a
        pinned block in place, a deep copy of a tensor is pageable), holding what is stored."""
        self.wait()
        new = copy.copy(self)
        memo[id(self)] = new
        new.blocks = [self._new_block().copy_(block) for block in self.blocks]
        new.staging, new.landed = None, None
        return new

    def rows(self, start: int, stop: int) -> "KVStoreRows":
        """Rows [start, stop) of this store, for one part of a pipelined decode step (:class:`KVStoreRows`)."""
        return KVStoreRows(self, start, stop)

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A capture-ready step's token [B, H, 1, D] into the last staging slot, a copy a CUDA graph can hold (no
        host state moves: a replay runs no Python); :meth:`place_written` then puts it in its block."""
        self._stage(keys, values, slot=STAGING_SLOTS - 1)

    def place_written(self) -> None:
        """The token :meth:`write` staged, into its block at column ``length`` (the host's count, which the graph
        runner moves on after the step), once its copy has landed. The caller waited for the step's selection,
        which was queued after that copy."""
        self.wait()  # tokens staged by eager steps before (slots below the last) go first
        self._reserve(1)
        column = self.length
        self.blocks[column // self.block_size][:, :, column % self.block_size] = self.staging[-1]

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` [B, H, K] (CPU, each < length) of every (row, head) -> keys, values [B, H, K, D]."""
        self.wait()
        b, h, k = indices.shape
        indices = indices.long()
        pairs = torch.empty(b, h, k, 2, self.shape[-1], dtype=self.dtype)
        block, offset = indices // self.block_size, indices % self.block_size
        rows = torch.arange(b)[:, None, None].expand_as(indices)
        heads = torch.arange(h)[None, :, None].expand_as(indices)
        for j in torch.unique(block).tolist():
            sel = block == j
            pairs[sel] = self.blocks[j][rows[sel], heads[sel], offset[sel]]
        return pairs[..., 0, :], pairs[..., 1, :]

    def to_tensors(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys and values of columns [start, end) (default: all) as two [B, H, end - start, D] tensors (a
        copy of the blocks they span only)."""
        self.wait()
        end = self.length if end is None else end
        spans = [(j, max(start - j * self.block_size, 0), min(end - j * self.block_size, self.block_size))
                 for j in range(start // self.block_size, -(-end // self.block_size))]
        pairs = torch.cat([self.blocks[j][:, :, lo:hi] for j, lo, hi in spans], dim=2)
        return pairs[..., 0, :], pairs[..., 1, :]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` [B'] (a reorder, repeat or subset of the batch: beam search, assisted decoding): in
        the same blocks where the row count stays (beam search reorders every step), else into new pinned ones."""
        self.wait()
        index = index.to("cpu", torch.long)
        if len(index) == self.shape[0]:
            for block in self.blocks:
                select(block, index)
            return
        self.shape = (len(index), *self.shape[1:])
        self.blocks = [torch.index_select(block, 0, index, out=self._new_block()) for block in self.blocks]
        self.staging = None  # of the old batch size

    def one_block(self) -> torch.Tensor | None:
        """The store's one block [B, H, N, 2, D] (a store allocated whole, for ``max_length`` tokens): pinned, a GPU
        kernel reads and writes its rows in place over PCIe. None where the store has several blocks."""
        return self.blocks[0] if len(self.blocks) == 1 else None

    def mapped(self) -> "DeviceKVStore | None":
        """The stored keys and values as [B, H, N, D] views of :meth:`one_block`, behind the device store's
        interface; None where the store has several blocks."""
        block = self.one_block()
        return None if block is None else DeviceKVStore.over(block[:, :, :, 0], block[:, :, :, 1], self.length)

    def held(self) -> tuple[torch.Tensor | None, ...]:
        """What a captured step writes of the store, its staging (None until a capture-ready step first wrote), and
        its first block, which it reads where the GPU attends rows of it (:meth:`mapped`)."""
        return self.staging, self.blocks[0] if self.blocks else None

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (blocks past it are freed)."""
        self.wait()
        self.length = min(self.length, length)
        del self.blocks[-(-self.length // self.block_size):]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.blocks)


class KVStoreRows(KVStore):
    """Rows [start, stop) of a :class:`KVStore`, which one part of a pipelined decode step reads and writes
    (:mod:`a2ats_hf.graphs`): its blocks and its staging slot are row slices of the whole store's (contiguous, as
    rows are their first dimension), new blocks are reserved by the whole store. Its length is its own count,
    which the graph runner moves on with the whole store's; it serves capture-ready steps (:meth:`write`,
    :meth:`place_written` and the CPU attention), not appends."""

    def __init__(self, whole: KVStore, start: int, stop: int):
        whole.wait()  # tokens staged by eager steps reach their blocks: the slices see them
        self.__dict__.update(whole.__dict__)
        self.whole, self.row_slice = whole, slice(start, stop)
        self.shape = (stop - start, *whole.shape[1:])
        self.blocks = [block[self.row_slice] for block in whole.blocks]
        self.staging = whole.staging_slots()[:, self.row_slice]

    def _reserve(self, t: int) -> None:
        self.whole._reserve(t)
        self.blocks += [block[self.row_slice] for block in self.whole.blocks[len(self.blocks):]]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise RuntimeError("KVStoreRows serves capture-ready decode steps; append to the whole store")


class DeviceKVStore:
    """Keys and values [B, H, N, D] in one buffer each on the layer's device, for GPU-resident decoding: the same
    interface as :class:`KVStore`, and the GPU's sparse attention reads rows straight from ``keys`` / ``values``.

    The buffer grows by whole blocks of 4096 tokens (a re-copy of one layer's K/V, ~1 ms for a GiB, once every
    4096 decode steps), never by a factor: a long context's K/V fills most of the GPU, and growing every layer by
    half would not fit. A cache given ``max_length`` allocates it whole at the prompt, so it never grows.
    """

    resident = True

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 0):
        self.shape = (batch, heads, BLOCK_SIZE, head_dim)
        self.dtype, self.device, self.length = dtype, torch.device(device), 0
        self.keys = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> "DeviceKVStore":
        """A store over given [B, H, N, D] buffers (any strides but the last), ``length`` of them stored."""
        store = cls.__new__(cls)
        store.keys, store.values, store.length = keys, values, length
        store.shape, store.dtype, store.device = (*keys.shape[:2], BLOCK_SIZE, keys.shape[-1]), keys.dtype, keys.device
        return store

    def wait(self) -> None:
        """Nothing to wait for: appends are ordered on the device's stream."""

    place_staged = wait  # nothing is staged

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [B, H, T, D] keys and values, growing the buffers when full."""
        n, t = self.length, keys.shape[-2]
        if n + t > self.keys.shape[2]:
            b, h, _, d = self.shape
            size = math.ceil((n + t) / BLOCK_SIZE) * BLOCK_SIZE
            check_memory(kv_bytes(b, h, d, self.dtype, size, 1), f"Growing the K/V buffer to {size} tokens "
                         f"(batch {b}, {h} KV heads)", self.device)
            for name in ("keys", "values"):
                grown = torch.empty(b, h, size, d, dtype=self.dtype, device=self.device)
                grown[:, :, :n] = getattr(self, name)[:, :, :n]
                setattr(self, name, grown)
        self.keys[:, :, n : n + t] = keys
        self.values[:, :, n : n + t] = values
        self.length = n + t

    def write(self, column: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one token's [B, H, 1, D] keys and values at ``column`` [1], a device tensor (a capture-ready step:
        the length is moved on by the caller)."""
        self.keys.index_copy_(2, column, keys.to(self.dtype))
        self.values.index_copy_(2, column, values.to(self.dtype))

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` [B, H, K] (each < length) of every (row, head) -> keys, values [B, H, K, D]."""
        index = indices.long().to(self.device)[..., None].expand(-1, -1, -1, self.shape[-1])
        return self.keys.gather(2, index), self.values.gather(2, index)

    def to_tensors(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys and values of columns [start, end) (default: all): views of the buffers."""
        end = self.length if end is None else end
        return self.keys[:, :, start:end], self.values[:, :, start:end]

    def rows(self, start: int, stop: int) -> "DeviceKVStore":
        """Rows [start, stop) of this store, for one part of a pipelined decode step: views of its buffers (which a
        capture-ready step writes in place, as it never grows them), with a length of their own."""
        part = copy.copy(self)
        part.keys, part.values = self.keys[start:stop], self.values[start:stop]
        part.shape = (stop - start, *self.shape[1:])
        return part

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` [B'] (a reorder, repeat or subset of the batch)."""
        index = index.to(self.device, torch.long)
        self.keys, self.values = select(self.keys, index), select(self.values, index)
        self.shape = (len(index), *self.shape[1:])

    def held(self) -> tuple[torch.Tensor, ...]:
        """The buffers a captured step reads and writes."""
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (the buffers keep their capacity)."""
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
