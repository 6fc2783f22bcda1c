"""`A2ATSCache`: a transformers `Cache` whose layers keep codes and a local window on the device and the full
K/V in CPU memory (or, with ``offload="none"``, on the device too; ``"auto"``: on the device while it fits)."""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from . import kernels
from .codebooks import Codebooks
from .config import A2ATSConfig
from .graphs import capture_decoding
from .kernels import code_histogram
from .memo import PassMemo
from .placement import Placement
from .rope import RoPE
from .rowcache import RowCache
from .scoring import ScoreInputs, Scorer, scorer_of
from .stats import AttendedStats
from .store import select

ENCODE_CHUNK = 8192  # prompt keys encoded per launch (each chunk's float32 copies are a few hundred MB at most)
NOT_A2ATS_ATTENTION = (
    "A2ATSCache stored K/V on the last forward but the \"a2ats\" attention did not read them: load the model with "
    "AutoModelForCausalLM.from_pretrained(..., attn_implementation=\"a2ats\") (or call "
    "model.set_attn_implementation(\"a2ats\")) after `import a2ats_hf`. If a forward failed midway instead, call "
    "cache.reset() before the next prompt."
)


RERANK = {"query_head": 6, "kv_head": 4}  # R x the budget re-ranked by default where a layer's K/V is on the device,
# per budget rule: the smallest factor whose pool keeps recall of the exact top-K past 0.8 and attention mass within
# 0.01 of it on SmolLM2 at 4K and 8K (per query head: R = 4 recalls 0.80, 0.012 of mass short; 6: 0.87 / 0.91,
# within 0.007), +19% over windowed RoPE per query head, +10% per KV head (H100, 128K; docs/results.md)
EMPTY_INPUT = "A2ATSCache got an empty input (0 tokens): give the prompt at least one token."
NOT_COMPILABLE = (
    "A model holding an A2ATSCache cannot run under torch.compile (its decode step reads host state and custom "
    "kernels that torch.compile does not trace). For graph-speed decoding, capture it in CUDA graphs instead: "
    "A2ATSCache.from_pretrained(model, ...) does on a CUDA model, or a2ats_hf.graphs.capture_decoding(model)."
)


def _stored(index: int, name: str) -> property:
    """A layer's stored ``name`` (0: keys, 1: values) [B, Hkv, N, D] where they live, as transformers' layers expose
    them: views of a device store, a copy of the CPU blocks; None before the first forward. Read-only."""

    def get(layer: "A2ATSLayer") -> torch.Tensor | None:
        return layer.store.to_tensors()[index] if layer.is_initialized else None

    def set_(layer: "A2ATSLayer", value) -> None:
        if value is not None:  # CacheLayerMixin.__init__ sets None
            raise AttributeError(f"A2ATSLayer.{name} is read-only: it reads the layer's store")

    return property(get, set_, doc=f"Stored post-RoPE {name} [B, Hkv, N, D] (None before the first forward).")


class A2ATSLayer(CacheLayerMixin):
    """One layer: full K/V in a CPU :class:`KVStore` (or a :class:`DeviceKVStore` where the cache keeps it on the
    device), codes [B, Hkv, N] and sinks + window K/V on the layer's device. ``book`` indexes the layer's codebook;
    ``first`` marks the first layer A2ATS serves in a pass.

    The sinks and the window share one buffer per K and V, ``local_keys`` [B, Hkv, sink + window, D]: slots
    ``[0, sink)`` hold each row's first tokens, slot ``sink + c % window`` the token of column ``c`` among the last
    ``window`` (a ring, so a new token is one copy; attention does not depend on the order of its keys).

    The layer sees its cache through a weak reference: a strong back-reference would make every cache a reference
    cycle, whose (pinned, possibly many GiB) CPU store lives on after the cache is dropped, until Python's cycle
    collector happens to run."""

    is_sliding = False
    is_croppable = True
    keys = _stored(0, "keys")
    values = _stored(1, "values")

    def __init__(self, cache: "A2ATSCache", layer_idx: int, book: int):
        super().__init__()
        self.layer_idx, self.book, self.first = layer_idx, book, book == 0
        self.config = cache.config  # the settings, immutable: read directly
        self.scorer = cache.scorer.for_layer()  # this layer's copy, which owns what it keeps between steps
        self.cache_ref = weakref.ref(cache)
        self.awaiting_attention = False  # K/V stored by `update` that the "a2ats" attention has not read yet
        self.row_cache: RowCache | None = None  # an offloaded layer's recent picks on the device (``row_cache``)

    @property
    def cache(self) -> "A2ATSCache":
        return self.cache_ref()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.store = self.cache.placement.new_store(key_states)
        self.scorer.forget()  # a new prompt: nothing kept from the last one
        capacity = max(key_states.shape[-2], self.config.max_length or 0)  # grown by doubling past it
        self.code_buffer = torch.zeros(b, h, capacity, dtype=torch.uint16, device=self.device)  # codes in range
        self.histogram: torch.Tensor | None = None  # [B, Hkv, M] codes of the far candidates, for scorers reading it
        self.local_keys = torch.zeros(b, h, self.config.sink + self.config.window, d, dtype=self.dtype,
                                      device=self.device)
        self.local_values = torch.zeros_like(self.local_keys)
        self.first_token = torch.zeros(b, dtype=torch.long, device=self.device)  # column of each row's first real token
        books = self.cache.codebooks
        self.whitener = books.whitener[self.book].to(self.device)
        self.whitened_centroids = books.whitened_centroids[self.book].to(self.device)
        self.centroid_norms = self.whitened_centroids.pow(2).sum(-1)[:, None, :]
        self.centroids = books.centroids[self.book].to(self.device)
        slots = self.cache.placement.row_slots  # (settled for this prompt by the placement's check)
        self.row_cache = (RowCache.empty(b, h, slots, d, capacity, self.dtype, self.device)
                          if slots and not self.store.resident else None)  # a new prompt: fresh slots
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new post-RoPE K/V and return them, tagged so the "a2ats" attention finds this layer.

        Several tokens at once are a prompt, or a chunk of one, or a continuation of the conversation.
        """
        if torch.compiler.is_compiling():
            raise RuntimeError(NOT_COMPILABLE)
        if self.awaiting_attention:
            raise RuntimeError(NOT_A2ATS_ATTENTION)
        if key_states.shape[-2] == 0:
            raise ValueError(EMPTY_INPUT)
        if not self.is_initialized:
            if self.first:
                self.cache.placement.check(key_states)
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.store.shape[0]:
            raise RuntimeError(
                f"This A2ATSCache holds a batch of {self.store.shape[0]} rows but got {key_states.shape[0]}; "
                "call cache.reset() or create a new A2ATSCache for a new batch."
            )
        static = self.cache.static
        if static is None:
            self.warn_past_one_block(key_states.shape[-2])
            self.store.append(key_states, value_states)
            self.fill_ring(key_states, value_states)
        else:  # a capture-ready step: written at the column the device holds, the host's length moved by the runner
            # the device store, or the pinned block a GPU-attended layer's step reads in place (over PCIe)
            target = self.store if self.store.resident else self.store.mapped() if self.attended_on_device() else None
            kernels.write_token(key_states, value_states, None if target is None else target.keys,
                                None if target is None else target.values, self.local_keys, self.local_values,
                                static.column, self.config.sink, self.config.window)
            if target is None:  # to the CPU store's staging; it reaches its block at the layer's CPU attention
                self.store.write(key_states, value_states)
        key_states.a2ats_layer = value_states.a2ats_layer = self  # read back by stored_by(key)
        self.awaiting_attention = True
        return key_states, value_states

    def warn_past_one_block(self, t: int) -> None:
        """Warn when ``t`` more tokens take a ``gpu_share`` layer's K/V past its one pinned block of ``max_length``
        tokens: the store then grows by another such block, and the GPU no longer reads its rows in place."""
        block = None if self.store.resident else self.store.one_block()
        if self.config.gpu_share and block is not None and self.store.length + t > self.store.block_size:
            warnings.warn(
                f"The sequence grew past this A2ATSCache's max_length={self.config.max_length}: with gpu_share, each "
                f"offloaded layer's K/V is one pinned buffer of max_length tokens, so each now allocates another "
                f"({block.nbytes / 2**30:.2f} GiB of CPU memory a layer) and the CPU attends its rows from here on "
                "(the same result, slower). Pass a max_length that covers the prompt and every new token.",
                stacklevel=3)

    def fill_ring(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy the window's share of ``keys`` / ``values`` [B, Hkv, T, D], the store's last T columns, into the ring
        (a copy: no view keeps a whole prompt alive on the device)."""
        n, sink, window = self.store.length, self.config.sink, self.config.window
        last = min(keys.shape[-2], window)
        if last == 1:
            slot = sink + (n - 1) % window
            self.local_keys[:, :, slot : slot + 1] = keys[:, :, -1:]
            self.local_values[:, :, slot : slot + 1] = values[:, :, -1:]
        else:
            slots = sink + torch.arange(n - last, n, device=self.device) % window
            self.local_keys.index_copy_(2, slots, keys[:, :, -last:].to(self.device, self.dtype))
            self.local_values.index_copy_(2, slots, values[:, :, -last:].to(self.device, self.dtype))

    def attended_on_device(self) -> bool:
        """Whether this layer's decode steps attend every selected row on the device although its K/V is in CPU
        memory (``gpu_share=1``): the GPU reads the rows (or, with a row cache, its misses) in place from the
        store's one pinned block over PCIe, and the CPU only holds the K/V. A store grown past ``max_length`` (two
        blocks) goes back to the CPU attention."""
        return self.config.gpu_share == 1 and not self.store.resident and self.store.one_block() is not None

    @property
    def rerank(self) -> int:
        """The cache's re-ranking factor where this layer's K/V is on the device, else 1 (no keys to re-rank by)."""
        return self.cache.rerank if self.store.resident else 1

    @property
    def table_rule(self) -> str:
        """The budget rule this layer's lookup table ranks by: the layer's, or for re-ranking's pool the KV group's
        ("kv_head": the group's summed query picks R x the budget once for its query heads)."""
        return "kv_head" if self.rerank > 1 else self.config.budget

    # The "a2ats" attention calls the methods below, which need positions and padding that `update` does not see.

    @property
    def length(self) -> int | torch.Tensor:
        """Tokens stored, the current one included: the store's count, or in a capture-ready step a device tensor
        [1] (the host's count is moved on outside the graph)."""
        return self.store.length if self.cache.static is None else self.cache.static.length

    @property
    def width(self) -> int:
        """Columns a decode step reads: the tokens stored, or in a capture-ready step its bucket's fixed width (the
        columns past the length are masked)."""
        return self.store.length if self.cache.static is None else self.cache.static.width

    @property
    def codes(self) -> torch.Tensor:
        """[B, Hkv, width] uint16 codes of the stored keys (a view of a buffer grown by doubling)."""
        return self.code_buffer[:, :, : self.width]

    def reserve_codes(self, n: int) -> None:
        """Room for ``n`` codes per (row, KV head), keeping those stored (the buffer at least doubles)."""
        if n > self.code_buffer.shape[-1]:
            grown = torch.zeros(*self.code_buffer.shape[:2], max(n, 2 * self.code_buffer.shape[-1]),
                                dtype=torch.uint16, device=self.device)
            grown[:, :, : self.code_buffer.shape[-1]] = self.code_buffer
            self.code_buffer = grown
            if self.row_cache is not None:
                self.row_cache.grow(grown.shape[-1])

    def append_codes(self, keys: torch.Tensor, position_ids: torch.Tensor, rope: RoPE) -> None:
        """Encode new post-RoPE keys [B, Hkv, T, D] at ``position_ids`` [B, T] into the last T code slots (in a
        capture-ready step, the column the device holds)."""
        n, t, static = self.store.length, keys.shape[-2], self.cache.static
        if static is None:
            self.reserve_codes(n)
            out, column = self.code_buffer[:, :, n - t : n], None
        else:
            out, column = self.code_buffer, static.column
        position_ids = position_ids.expand(keys.shape[0], -1)
        for start in range(0, t, ENCODE_CHUNK):  # a long prompt in chunks: no float32 copy of a whole layer's keys
            part = slice(start, start + ENCODE_CHUNK)
            rotation = None
            if self.cache.codebooks.keys == "pre_rope":
                rotation = rope.inverse_rotation(position_ids[:, part], keys.device)
            kernels.encode_keys(keys[:, :, part], rotation, self.whitener, self.whitened_centroids,
                                self.centroid_norms, out if column is not None else out[:, :, part], column)

    def set_first_tokens(self, valid: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """After a prompt: each row's first real column from the key validity [B, N], its sinks from all the
        layer's keys and values [B, Hkv, N, D] on the device, and (for a scorer that reads it) the far candidates'
        code histogram."""
        self.first_token = valid.long().argmax(-1)
        self.last_first_token = int(self.first_token.max())  # on the host: when every row's sinks are complete
        self.sink_valid: torch.Tensor | None = None  # validity of the sink slots, kept once it can no longer change
        cols = (self.first_token[:, None]
                + torch.arange(self.config.sink, device=self.device)).clamp(max=valid.shape[1] - 1)
        index = cols[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        self.local_keys[:, :, : self.config.sink] = keys.gather(2, index)
        self.local_values[:, :, : self.config.sink] = values.gather(2, index)
        if self.scorer.reads_code_histogram:
            self.histogram = code_histogram(self.codes, self.far_candidates(valid), self.centroids.shape[1])

    def score_inputs(self, query: torch.Tensor, position_ids: torch.Tensor, scaling: float,
                     far: torch.Tensor, budget: str | None = None) -> ScoreInputs:
        """What the layer's scorer reads of this step (``query`` [B, Hq, D] post-RoPE at ``position_ids`` [B or 1,
        T], the candidates ``far`` [B, width]), for a table ranked by the ``budget`` rule (default: the layer's;
        re-ranking's pool ranks by the KV group's)."""
        cache, static = self.cache, self.cache.static
        return ScoreInputs(query, position_ids[:, -1:], scaling, far, self.codes, self.code_buffer, self.histogram,
                           self.centroids, cache.rope, cache.codebooks.offset, self.config.window,
                           self.store.length + (0 if static is None else 1), None if static is None else static.length,
                           cache.pass_memo, self.store, budget or self.config.budget, self.first_token)

    # The masks below take the key validity [B, width]; the length may be a host int or (capture-ready) a tensor.

    def far_candidates(self, valid: torch.Tensor) -> torch.Tensor:
        """[B, width] bool: tokens eligible for retrieval (valid, outside each row's sinks and the window)."""
        cols = torch.arange(valid.shape[1], device=valid.device)
        real = cols[None] - self.first_token[:, None]  # index among each row's real tokens
        return valid & (cols < self.length - self.config.window) & (real >= self.config.sink)

    def sink_validity(self, valid: torch.Tensor) -> torch.Tensor:
        """[B, sink] bool: which sink slots hold a real token outside the window (``valid`` [B, width]); kept once
        every row's sinks have left the window, after which it cannot change."""
        if self.sink_valid is not None:
            return self.sink_valid
        n, window, sink = self.length, self.config.window, self.config.sink
        cols = self.first_token[:, None] + torch.arange(sink, device=valid.device)
        sink_valid = (cols < n - window) & valid.gather(1, cols.clamp(max=valid.shape[1] - 1))
        if isinstance(n, int) and self.last_first_token + sink - 1 < n - window:
            self.sink_valid = sink_valid
        return sink_valid

    def local_validity(self, valid: torch.Tensor) -> torch.Tensor:
        """[B, sink + window] bool: which local slots hold a token the query may see (``valid`` [B, width]): the
        sinks outside the window, and the column each ring slot holds (none yet where fewer tokens have come)."""
        n, window = self.length, self.config.window
        slots = torch.arange(window, device=valid.device)
        cols = (n - 1) - (n - 1 - slots) % window
        ring_valid = valid.gather(1, cols.clamp(min=0).expand(valid.shape[0], -1)) & (cols >= 0)
        return torch.cat([self.sink_validity(valid), ring_valid], dim=1)

    def advance(self, keys: torch.Tensor, values: torch.Tensor, far: torch.Tensor) -> None:
        """After one decoded token [B, Hkv, 1, D]: fill sink slots of rows still within their first ``sink`` tokens,
        and count the token that just left the window into the code histogram (where one is kept) if it is a
        candidate (``far`` [B, width]). In a capture-ready step both run masked, with no host decision."""
        n, sink = self.length, self.config.sink
        if self.sinks_filling():
            slot = n - 1 - self.first_token  # [B]
            inside = (slot < sink)[:, None, None, None]
            onehot = (torch.arange(sink, device=self.device) == slot[:, None])[:, None, :, None]
            sink_keys, sink_values = self.local_keys[:, :, :sink], self.local_values[:, :, :sink]
            sink_keys.copy_(torch.where(inside & onehot, keys.to(self.dtype), sink_keys))
            sink_values.copy_(torch.where(inside & onehot, values.to(self.dtype), sink_values))
        if self.histogram is not None:  # the new token's column: the host's, or the device's in a capture-ready step
            column = n - 1 if self.cache.static is None else self.cache.static.column
            kernels.count_leaving(self.histogram, self.code_buffer, far, column, -self.config.window)

    def sinks_filling(self) -> bool:
        """Whether a row's sinks may still be filling at the token being decoded: its column (known on the host)
        before the latest row's first real token + ``sink``. A capture-ready step fills them only where this holds
        (the runner captures the two cases apart)."""
        column = self.store.length - (1 if self.cache.static is None else 0)  # the runner moves the length after it
        return column < self.last_first_token + self.config.sink

    def get_seq_length(self) -> int:
        return self.store.length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 0:  # asked before the layers run, where an empty input fails deep inside the model
            raise ValueError(EMPTY_INPUT)
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the abstract name in older transformers 5.x (5.4)

    def reset(self) -> None:
        self.is_initialized = self.awaiting_attention = False
        for name in ("store", "code_buffer", "histogram", "local_keys", "local_values"):
            self.__dict__.pop(name, None)
        self.scorer.forget()

    # Batch and length edits (beam search, assisted decoding): every row-indexed tensor follows the store.

    ROW_STATE = ("code_buffer", "local_keys", "local_values", "first_token", "histogram", "sink_valid")

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` [B'] (long) of everything the layer holds: a reorder, repeat or subset of the batch."""
        if not self.is_initialized:
            return
        self.store.select_rows(index)
        index = index.to(self.device)
        for name in self.ROW_STATE:
            if getattr(self, name, None) is not None:
                setattr(self, name, select(getattr(self, name), index))
        if self.row_cache is not None:
            self.row_cache = self.row_cache.select_rows(index)
        if hasattr(self, "last_first_token"):
            self.last_first_token = int(self.first_token.max())
        self.scorer.forget()

    def rows(self, start: int, stop: int, cache: "A2ATSCache") -> "A2ATSLayer":
        """Rows [start, stop) of this layer as a layer of ``cache`` (a view of the whole cache's rows, for one part of
        a pipelined decode step): its store, codes, window and per-row state are row slices of this layer's, its
        scorer a copy with state of its own (rebuilt from the part's codes at its first step)."""
        part = copy.copy(self)
        part.cache_ref, part.scorer = weakref.ref(cache), self.scorer.for_layer()
        part.store = self.store.rows(start, stop)
        for name in self.ROW_STATE:
            if getattr(self, name, None) is not None:
                setattr(part, name, getattr(self, name)[start:stop])
        if self.row_cache is not None:
            part.row_cache = self.row_cache.rows(start, stop)
        return part

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.select_rows(torch.arange(self.store.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(row_index(indices))

    def crop(self, tokens: int) -> None:
        """Forget the last ``-tokens`` columns (a negative count, as transformers passes it) or keep the first
        ``tokens`` (older transformers; some pass a 0-d tensor): the window ring is refilled from the store, the code
        histogram recounted."""
        tokens = int(tokens)
        if tokens == 0 or not self.is_initialized:  # 0: nothing to remove (newer) or keep (older), as DynamicLayer
            return
        n = self.store.length
        m = max(n + tokens if tokens < 0 else min(tokens, n), 0)
        if m == 0:
            return self.reset()
        if m == n:
            return
        self.store.truncate(m)
        if self.row_cache is not None:
            self.row_cache.clear()
        self.fill_ring(*self.store.to_tensors(max(m - self.config.window, 0), m))
        self.sink_valid = None  # recomputed from the sinks still stored
        if self.histogram is not None:
            self.histogram = code_histogram(self.codes, self.far_candidates(self.cache.validity[:, :m].to(self.device)),
                                            self.centroids.shape[1])
        self.scorer.forget()

    def nbytes(self) -> tuple[int, int]:
        """(device bytes, CPU bytes) held by this layer."""
        if not self.is_initialized:
            return 0, 0
        tensors = (self.code_buffer, self.local_keys, self.local_values) + self.scorer.held()
        tensors += () if self.histogram is None else (self.histogram,)
        tensors += () if self.row_cache is None else self.row_cache.tensors()
        device = sum(t.numel() * t.element_size() for t in tensors)
        if self.store.resident:
            return device + self.store.nbytes, 0
        return device, self.store.nbytes


def stored_by(key: torch.Tensor) -> A2ATSLayer | None:
    """The layer whose ``update`` returned ``key``, or None for K/V no A2ATSCache stored.

    This is how the "a2ats" attention function finds its layer: transformers calls it with the module and the K/V
    the cache's ``update`` returned, but with no handle on the cache (5.4 passes the cache nothing it forwards; later
    versions forward a keyword dict, not all of them), so the layer rides on the tensors it returned."""
    return getattr(key, "a2ats_layer", None)


def row_index(indices: torch.Tensor | list) -> torch.Tensor:
    """Long row indices from what ``batch_select_indices`` may get: indices, or a bool mask over the rows."""
    indices = torch.as_tensor(indices)
    return indices.nonzero().flatten() if indices.dtype == torch.bool else indices.long()


MASK_CHANGED = ("The attention mask changed for tokens already in the A2ATSCache (a 0 where it had 1 or the reverse): "
                "the cache derived each row's sinks and candidates from it. Extend the mask with the new tokens only, "
                "or call cache.reset() and run the prompt again with the new mask.")


@dataclass
class ValidityCheck:
    """A comparison of the mask queued on a GPU: its answer copied to a pinned flag, ``landed`` once there."""

    flag: torch.Tensor
    landed: torch.cuda.Event

    @classmethod
    def queue(cls, changed: torch.Tensor) -> "ValidityCheck":
        flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
        flag.copy_(changed.view(1), non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(changed.device))
        return cls(flag, landed)

    def changed(self) -> bool:
        if not self.landed.query():  # (by the next check it has landed: it was queued a layer or a step before)
            self.landed.synchronize()
        return bool(self.flag)


class A2ATSCache(Cache):
    """KV cache for A2ATS decoding: use with a model loaded with ``attn_implementation="a2ats"``.

    Args:
        codebooks: the model's :class:`Codebooks`.
        topk: far tokens retrieved per step, a fraction in (0, 1] of each row's far tokens or a positive int budget.
        window: most recent tokens always attended exactly (default: the codebooks' window).
        sink: first tokens always attended exactly (default: the codebooks' sink).
        budget: "query_head" (top-K per query head, united over the KV group, as in the paper) or "kv_head".
        scoring: how far tokens are scored before the top-K: "distance" (the default: A2ATS's codes scored by
            one table per distance bucket, an octave each, so a token scores its expected q . k over its bucket's
            distances), "wrope" (the paper's windowed RoPE: one table, every token scored as if at distance b; same
            codebooks) or, as baselines for evaluation, "oracle" (exact logits),
            "quest" (page bounds), "random", "window" (none retrieved), "postrope" (needs codebooks calibrated with
            ``keys="post_rope"``); or a :class:`~a2ats_hf.scoring.Scorer` (e.g. ``DistanceBuckets(per_octave=2)``).
        max_length: the longest sequence (prompt + new tokens) expected; when given, a batch whose K/V cannot fit
            fails at the first forward instead of midway through generation (and ``offload="none"`` allocates
            its buffers whole).
        offload: where the full K/V lives: "cpu" (the paper's layout: CPU memory, the selected rows attended
            there), "none" (the layer's device; the selected rows are attended there, so decoding reads a few
            percent of the K/V instead of all of it) or "auto" (layer by layer, on the device while the layers so
            far fit in ``gpu_kv_budget``, in CPU memory beyond).
        gpu_kv_budget: bytes of device memory the K/V may take with ``offload="auto"`` (default: 90% of what is
            free when the first layer stores its prompt, less 2 GiB for activations; 0 on a CPU), the offloaded
            layers' ``row_cache`` slots included.
        dense_below: a layer whose K/V is on the device attends every token exactly while its rows hold fewer
            than this many tokens (one attention over the stored K/V), where selecting a few percent would cost
            more than it saves; 0 retrieves always. The CPU store always retrieves.
        rerank: R > 1 re-ranks where a layer's K/V is on the device: the scorer picks R times the budget a KV
            head by the table of the KV group's summed query, and each query head's exact ``q . k`` of those
            candidates keeps its budget (the group's summed one under ``budget="kv_head"``; one more gather of
            R x the selected keys), moving the selection towards the exact top-K (1: off). Layers whose K/V is
            in CPU memory select as with 1; offload="cpu" (where no layer could) refuses R > 1. None (the
            default): RERANK[budget] for the codebooks' scorers (6 per query head, 4 per KV head), 1 for the
            baselines (see :attr:`rerank`).
        gpu_share: a fraction in [0, 1] of each offloaded layer's selected rows that the GPU attends itself,
            reading them in place from the pinned CPU store over PCIe (zero-copy) while the CPU attends the rest, so
            PCIe's bandwidth adds to the CPU's; 1: the GPU attends every row and the CPU only holds the K/V (no CPU
            attention, no host wait: a decode step is one CUDA graph). Needs ``max_length``: each offloaded layer's
            K/V is then one pinned buffer for ``max_length`` tokens. 0 (the default): the CPU attends every row.
        row_cache: R >= 2 keeps, for each offloaded layer, R budgets of the rows it picked most recently on the
            device (per row and KV head; the selection's whole width under the per-query-head rule): picked again,
            the device attends them from there and only the misses cross from CPU memory (consecutive steps pick
            mostly the same rows), attended by the CPU, or with ``gpu_share=1`` read by the GPU into the slots.
            Needs ``max_length`` (the slots are sized once); with ``gpu_share`` 0 or 1 only. 0: none. None (the
            default): 2 where the cache offloads layers from a GPU with ``max_length`` and ``gpu_share`` 0 or 1,
            and every layer's slots fit the device's budget beside the codes and windows (``gpu_kv_budget``'s;
            checked at each prompt), else none; ``row_cache`` then says which.
    """

    def __init__(
        self,
        codebooks: Codebooks,
        topk: float | int = 0.03,
        window: int | None = None,
        sink: int | None = None,
        budget: str = "query_head",
        max_length: int | None = None,
        scoring: str | Scorer = "distance",
        offload: str = "cpu",
        gpu_kv_budget: int | None = None,
        dense_below: int = 4096,
        rerank: int | None = None,
        gpu_share: float = 0.0,
        row_cache: float | None = None,
    ):
        if not isinstance(codebooks, Codebooks):
            hint = (f" To load codebooks from {codebooks!r}, use A2ATSCache.from_pretrained({codebooks!r}) or "
                    f"Codebooks.from_pretrained({codebooks!r})."
                    if isinstance(codebooks, (str, bytes)) or hasattr(codebooks, "__fspath__") else "")
            raise TypeError(f"A2ATSCache takes a Codebooks object as its first argument, got "
                            f"{type(codebooks).__name__}.{hint}")
        self.config = A2ATSConfig(codebooks.window if window is None else window,
                                  codebooks.sink if sink is None else sink, topk, budget, max_length, offload,
                                  gpu_kv_budget, dense_below, rerank, gpu_share, row_cache)
        self.scorer = scorer_of(scoring)
        if self.scorer.keys not in (None, codebooks.keys):
            raise ValueError(f'scoring="{self.scorer.name}" reads codes of {self.scorer.keys} keys, but these '
                             f'codebooks quantize {codebooks.keys} keys')
        self.codebooks = codebooks
        self.rope: RoPE | None = None
        self.pass_memo = PassMemo()  # what the layers of one forward pass share (masks, rotations, distance tables)
        self.stats = AttendedStats()
        self.validity: torch.Tensor | None = None  # [B, N] keys valid so far, as the first layer last saw them
        self.validity_check: ValidityCheck | None = None  # a decode step's comparison of the mask, queued on a GPU
        self.validated: set[int] = set()  # layers whose weights were checked against the codebooks
        self.static = None  # a capture-ready decode step's StaticStep, set by the graph runner around its forward
        self.lane = 0  # which hand-off buffers an offloaded layer uses: a part of a pipelined step has its own
        self.edits = 0  # counts the edits of rows and lengths besides decoding (beam search, crop, reset)
        # Called after each eager decode step of a layer with (layer, query, position_ids, masks, scaling, out): a
        # measurement (the fidelity probe) watches the step instead of replacing it. A cache with observers is not
        # captured in CUDA graphs (a replay runs no Python).
        self.observers: list = []
        served = {idx: book for book, idx in enumerate(codebooks.layers)}
        n_layers = codebooks.fingerprint.get("num_hidden_layers", codebooks.num_layers)
        window = codebooks.fingerprint.get("sliding_window")
        super().__init__(layers=[
            A2ATSLayer(self, idx, served[idx]) if idx in served else DynamicSlidingWindowLayer(sliding_window=window)
            for idx in range(n_layers)
        ])
        self.a2ats_layers = [layer for layer in self.layers if isinstance(layer, A2ATSLayer)]
        self.placement = Placement(self.config, len(self.a2ats_layers), self.slots_for_rows())

    # The settings, read-only, as attributes of the cache too (they live in its immutable config).
    topk = property(lambda self: self.config.topk)
    window = property(lambda self: self.config.window)
    sink = property(lambda self: self.config.sink)
    budget = property(lambda self: self.config.budget)
    max_length = property(lambda self: self.config.max_length)
    offload = property(lambda self: self.config.offload)
    gpu_kv_budget = property(lambda self: self.config.gpu_kv_budget)
    dense_below = property(lambda self: self.config.dense_below)
    gpu_share = property(lambda self: self.config.gpu_share)

    @property
    def rerank(self) -> int:
        """How many times the budget a layer whose K/V is on the device picks before exact ``q . k`` keeps the
        budget: ``rerank`` as given, or by default RERANK[budget] for the scorers that re-ranking sharpens (the
        codebooks' "distance" and "wrope") and 1 for the others and with offload="cpu" (no layer's K/V on the
        device)."""
        if self.config.rerank is not None:
            return self.config.rerank
        return RERANK[self.config.budget] if self.scorer.reranks and self.offload != "cpu" else 1

    @property
    def row_cache(self) -> float:
        """Budgets of recent picks each offloaded layer keeps on the device: ``row_cache`` as given, or by default
        2 or 0 as the placement settled it (what it wants until the first prompt is placed)."""
        return self.config.rows_wanted if self.placement.row_slots else 0.0

    @property
    def row_slots(self) -> int:
        """An offloaded layer's row-cache slots per (row, KV head), as the placement settled them."""
        return self.placement.row_slots

    @property
    def row_cache_hits(self) -> float:
        """The share of the offloaded layers' selected rows found in their row caches so far (nan without one)."""
        found, sought = self.row_cache_counts()
        return found / sought if sought else float("nan")

    def row_cache_counts(self) -> tuple[int, int]:
        """(rows found in the offloaded layers' row caches, rows selected there) so far."""
        held = [layer.row_cache for layer in self.a2ats_layers if layer.row_cache is not None]
        return sum(int(rows.found.sum()) for rows in held), sum(int(rows.sought.sum()) for rows in held)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: "str | nn.Module",
        subfolder: str = "a2ats",
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        cuda_graphs: bool = True,
        compile_layers: bool = False,
        **cache_kwargs,
    ) -> "A2ATSCache":
        """A cache with the codebooks stored next to a model (``a2ats/`` in its folder or Hub repository).

        Given the model itself (loaded with ``attn_implementation="a2ats"``), the codebooks come from where it was
        loaded from, and on a CUDA model its decode steps run as captured CUDA graphs
        (:func:`a2ats_hf.graphs.capture_decoding`, installed on the model once; steps the graphs cannot serve run
        its own forward): ``cuda_graphs=False`` leaves the model as it is; ``compile_layers=True`` also fuses the
        model's norms and MLPs with torch.compile (faster at small batches; see ``capture_decoding``). The Hub
        arguments go to ``Codebooks.from_pretrained``; ``cache_kwargs`` (topk, window, sink, budget, max_length,
        scoring, offload, gpu_kv_budget, dense_below) to the constructor.
        """
        model = model_id_or_path if isinstance(model_id_or_path, nn.Module) else None
        if compile_layers and not (model is not None and cuda_graphs and next(model.parameters()).is_cuda):
            raise ValueError("compile_layers=True goes with the graph runner: pass the CUDA model itself, with "
                             "cuda_graphs=True (or call a2ats_hf.graphs.compile_around_attention(model) yourself)")
        if model is not None:
            model_id_or_path = getattr(model.config, "_name_or_path", "")
            if not model_id_or_path:
                raise ValueError("This model does not say where it was loaded from (config._name_or_path is empty): "
                                 "load its codebooks with Codebooks.from_pretrained(path) and pass them to A2ATSCache.")
        books = Codebooks.from_pretrained(model_id_or_path, subfolder, revision, cache_dir, local_files_only, token)
        cache = cls(books, **cache_kwargs)
        if model is not None and cuda_graphs and next(model.parameters()).is_cuda:
            capture_decoding(model, compile_layers=compile_layers)
        return cache

    def __bool__(self) -> bool:
        """Empty until the first forward: Phi-3's generation drops a non-empty cache (to recompute it) when a
        sequence first crosses its longrope switch, and checks for one by truth value."""
        return self.get_seq_length() > 0

    def bind(self, attention: nn.Module) -> RoPE:
        """Check the codebooks against each layer's weights on its first use and build the model's RoPE helper."""
        if attention.layer_idx not in self.validated:
            self.codebooks.validate(attention.config, attention)
            self.validated.add(attention.layer_idx)
        if self.rope is None:
            self.rope = RoPE.for_attention(attention, self.pass_memo)
        return self.rope

    def record_validity(self, valid: torch.Tensor, deferred: bool = False) -> None:
        """Keep which keys [B, N] the first layer's pass may see, refusing a mask that changed for tokens already
        stored: their sinks, first real token and code histograms were derived from it. ``deferred`` (a decode
        step): on a GPU the comparison is queued and its answer read at the next :meth:`check_validity` (after the
        pass's first wait for an offloaded layer's selection, or at the next step) instead of waiting for the GPU
        here."""
        self.check_validity()
        old = self.validity
        if old is not None:
            changed = (valid[:, : old.shape[1]] != old.to(valid.device)).any()
            if deferred and valid.is_cuda:
                self.validity_check = ValidityCheck.queue(changed)
            elif changed:
                raise ValueError(MASK_CHANGED)
        self.validity = valid.clone()

    def check_validity(self) -> None:
        """Raise where a queued comparison of :meth:`record_validity` found the mask changed."""
        if self.validity_check is not None:
            check, self.validity_check = self.validity_check, None
            if check.changed():
                raise ValueError(MASK_CHANGED)

    def slots_for_rows(self) -> int:
        """An offloaded layer's row-cache slots per (row, KV head) as the config wants them (its
        :attr:`~a2ats_hf.config.A2ATSConfig.rows_wanted` budgets of the widest selection a step reads up to
        ``max_length`` tokens: each query head's pick, united over the KV group, under the per-query-head rule);
        0 without a row cache."""
        config, shape = self.config, self.codebooks.fingerprint
        if not config.rows_wanted:
            return 0
        width = self.budget_for(max(config.max_length - config.window - config.sink, 1))
        if config.budget == "query_head":
            width *= shape["num_attention_heads"] // shape["num_key_value_heads"]
        return math.ceil(config.rows_wanted * width)

    def budget_for(self, n_far: torch.Tensor | int) -> torch.Tensor | int:
        """Tokens to retrieve per row from its number of far tokens (a tensor [B], or one int on the host)."""
        topk = self.config.topk
        if isinstance(n_far, int):
            return min(math.ceil(n_far * topk), n_far) if isinstance(topk, float) else min(n_far, topk)
        if isinstance(topk, float):
            return torch.ceil(n_far.double() * topk).long().clamp(max=n_far)
        return n_far.clamp(max=topk)

    def rows(self, start: int, stop: int, lane: int) -> "A2ATSCache":
        """Rows [start, stop) of this cache as a cache of their own, for one part of a pipelined decode step
        (:class:`~a2ats_hf.graphs.GraphRunner`): every layer's per-row tensors are row slices of this cache's, so
        the part's capture-ready steps read and write them in place; the part has its own pass memo, hand-off
        buffers (``lane``) and scorer state, and its device counts add into this cache's statistics."""
        part = copy.copy(self)
        part.lane, part.pass_memo, part.static, part.validity_check = lane, PassMemo(), None, None
        if self.rope is not None:
            part.rope = copy.copy(self.rope)
            part.rope.memo = part.pass_memo
        if self.validity is not None:
            part.validity = self.validity[start:stop]
        layer = self.a2ats_layers[0]
        part.stats = self.stats.rows(start, stop, (layer.store.shape[0], layer.store.shape[1]), layer.device)
        part.layers = [layer.rows(start, stop, part) for layer in self.layers]
        part.a2ats_layers = [layer for layer in part.layers if isinstance(layer, A2ATSLayer)]
        return part

    def reset(self) -> None:
        self.edits += 1
        for layer in self.layers:
            layer.reset()
        self.stats = AttendedStats()
        self.placement.reset()
        self.validity = self.validity_check = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.edits += 1
        self.select_validity(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.edits += 1
        self.stats.new_batch()
        if self.validity is not None:
            self.select_validity(torch.arange(self.validity.shape[0]).repeat_interleave(repeats))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.edits += 1
        self.stats.new_batch()
        self.select_validity(row_index(indices))
        super().batch_select_indices(indices)

    def select_validity(self, index: torch.Tensor) -> None:
        if self.validity is not None:
            self.validity = self.validity.index_select(0, index.to(self.validity.device))

    def crop(self, tokens: int) -> None:
        self.edits += 1
        super().crop(tokens)
        if self.validity is not None:
            self.validity = self.validity[:, : self.get_seq_length()]

    def __deepcopy__(self, memo: dict) -> "A2ATSCache":
        """An independent copy (its own K/V, codes and statistics) whose layers refer to it; the read-only
        codebooks and their per-layer device copies are shared."""
        memo[id(self.codebooks)] = self.codebooks
        memo[id(self.observers)] = []  # a copy is not watched
        memo[id(self.validity_check)] = None  # nor does it answer for the mask of a step it did not run
        for layer in self.a2ats_layers:
            if hasattr(layer, "store"):  # the store's copies from a GPU land, so no event is copied with it
                layer.store.wait()
            for name in ("whitener", "whitened_centroids", "centroid_norms", "centroids"):
                if hasattr(layer, name):
                    memo[id(getattr(layer, name))] = getattr(layer, name)
        new = copy.copy(self)
        memo[id(self)] = new
        new.__dict__.update({name: copy.deepcopy(value, memo) for name, value in self.__dict__.items()})
        for layer in new.a2ats_layers:
            layer.cache_ref = weakref.ref(new)
        return new

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held on the device (codes, sinks, window; the full K/V of layers kept there) and on the CPU
        (the full K/V)."""
        device, cpu = map(sum, zip(*(layer.nbytes() for layer in self.a2ats_layers)))
        return {"device_bytes": device, "cpu_bytes": cpu}
