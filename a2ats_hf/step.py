"""One decode step of an :class:`~a2ats_hf.cache.A2ATSCache` layer, in one place: the pass's masks, the far tokens'
selection (scorer, then top-K), the attention over sinks + window and the selected rows where the store keeps them
(the device, or the CPU in the paper's layout), and their merge.

The step runs two ways. Eagerly, the host knows the length and every mask is cut to it (the reference, and what a
CPU or an offloaded layer runs). Capture-ready (a :class:`StaticStep` set on the cache by
:class:`~a2ats_hf.graphs.GraphRunner`), every read and write has a fixed address and shape: the new token's column
and the length are device tensors, the masks are computed over a fixed width (the stored tokens rounded up to
:data:`BUCKET`) from the device's length, so one CUDA graph serves every step until the length crosses the bucket's
edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from . import kernels
from .handoff import hand_off
from .store import BLOCK_SIZE, DeviceKVStore

if TYPE_CHECKING:
    from .cache import A2ATSLayer


def key_validity(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[B, N] bool: which keys the last query may see (False for padding), from a 4D bool or additive mask."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, -length:]
    valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return valid.expand(batch, length)


BUCKET = BLOCK_SIZE  # width granularity: a new graph every 4096 tokens
CANDIDATE_KEY_BITS = 16  # re-ranking's candidates ranked by their scores' top 16 bits (bfloat16's precision): the
# exact scores order them after, and a split select of 16-bit keys takes 1 round where 32 bits take 4
KEEP_KEY_BITS = 16  # the keep ranks the candidates' exact scores by their top 16 bits too: it picks its threshold
# from the select's counts of those keys, at the same accuracy as 32 bits (perplexity, recall and mass to the third
# decimal at 3%, 4K)


@dataclass
class StaticStep:
    """What a capture-ready decode step reads besides the layers: the new token's ``column`` [1] (tokens stored
    before it) and ``length`` [1] (column + 1), device tensors written before each replay; the bucket's ``width``;
    ``prompt_valid`` [B, capacity] the keys' validity as the cache last recorded it (padding), True past it."""

    column: torch.Tensor
    length: torch.Tensor
    width: int
    prompt_valid: torch.Tensor
    source: torch.Tensor  # the cache's validity record prompt_valid was built from
    columns: torch.Tensor = field(init=False)
    breaks: Callable[[Callable[[], None]], None] | None = None  # set by the graph runner while it captures

    def __post_init__(self):
        self.columns = torch.arange(self.width, device=self.column.device)

    def on_cpu(self, work: Callable[[], None]) -> None:
        """An offloaded layer's CPU part of the step (wait for its selection, attend the selected rows): run now,
        or, while the step is captured, handed to :attr:`breaks`, which ends the graph piece there (the runner runs
        ``work`` between that piece's replay and the next's)."""
        if self.breaks is None:
            work()
        else:
            self.breaks(work)

    def validity(self) -> torch.Tensor:
        """[B, width] bool: the keys a decode token may see (not padding, already stored)."""
        return self.prompt_valid[:, : self.width] & (self.columns < self.length)


def bucket_width(tokens: int, capacity: int, bucket: int = BUCKET) -> int:
    """The width a step over ``tokens`` stored tokens (the new one included) reads: rounded up to ``bucket``."""
    return min(capacity, -(-tokens // bucket) * bucket)


@dataclass
class StepMasks:
    """What every layer of one decode pass shares (the same keys are valid, sinks and window, at every layer), so
    the first layer computes it: ``valid`` [B, N] keys the token may see, ``far`` [B, N] retrieval candidates
    (``far_counts`` [B] of them per row), ``budget`` [B] tokens to retrieve per row, ``candidates`` [B] the
    lookup table's picks per row where re-ranking keeps ``budget`` of them (R x budget, at most every far token;
    ``budget`` itself without re-ranking), ``local_valid`` [B, sink + window] and ``totals`` [3] (far candidates,
    locally attended and past tokens, summed over rows) for the cache's statistics."""

    valid: torch.Tensor
    far: torch.Tensor
    far_counts: torch.Tensor
    budget: torch.Tensor
    candidates: torch.Tensor
    local_valid: torch.Tensor
    totals: torch.Tensor


def step_masks(layer: "A2ATSLayer", attention_mask: torch.Tensor | None) -> StepMasks:
    """The pass's :class:`StepMasks` for one decode token, computed once per pass and device."""
    cache, n, device = layer.cache, layer.store.length, layer.device

    def compute() -> StepMasks:
        if cache.static is not None:  # a capture-ready step: the validity follows from the device's length
            valid = cache.static.validity()
        else:
            valid = key_validity(attention_mask, layer.store.shape[0], n, device)
            if layer.first:
                cache.record_validity(valid, deferred=True)
        far = layer.far_candidates(valid)
        n_far = far.sum(-1)
        local_valid = layer.local_validity(valid)
        totals = torch.stack([n_far.sum(), local_valid.sum(), valid.sum()])
        budget, rerank = cache.budget_for(n_far), cache.rerank
        candidates = budget if rerank == 1 else torch.minimum(budget * rerank, n_far)
        return StepMasks(valid, far, n_far, budget, candidates, local_valid, totals)

    return cache.pass_memo(("masks", attention_mask, n, device), compute)


def decode_attention(
    layer: "A2ATSLayer",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    masks: StepMasks,
    scaling: float,
) -> torch.Tensor:
    """One decode token: exact attention over sinks + window on the device, and over the top-K far tokens where the
    store keeps them (the CPU, or the device with ``offload="none"``); a device store shorter than the cache's
    ``dense_below`` is attended whole instead.

    query [B, Hq, D] post-RoPE; key/value [B, Hkv, 1, D] the new token's; ``masks`` the pass's key validity,
    candidates and budget. Returns [B, Hq, D] (float32).
    """
    cache, hkv = layer.cache, key.shape[1]
    layer.advance(key, value, masks.far)
    if not layer.store.resident:
        out, selected = _offloaded(layer, query, position_ids, masks, scaling)
    elif layer.width < layer.config.dense_below and cache.scorer.retrieves:  # too short for retrieval to pay
        valid = masks.valid[:, None].expand(-1, hkv, -1)
        out, _ = kernels.attention_with_lse(query, *layer.store.to_tensors(end=layer.width), valid, scaling)
        selected = masks.far_counts[:, None].expand(-1, hkv)  # every far token
    else:
        selection = _select(layer, query, position_ids, masks, scaling)
        far = None if selection is None else kernels.FarRows(layer.store, *selection)
        out, _ = kernels.attention_with_lse(query, layer.local_keys, layer.local_values, _local_valid(layer, masks),
                                            scaling, far)
        selected = 0 if selection is None else selection[1]  # counts [B, Hkv], which stay on the device
    cache.stats.add(selected, masks.totals, hkv, layer.first)
    for observe in cache.observers:
        observe(layer, query, position_ids, masks, scaling, out)
    return out


def _local_valid(layer: "A2ATSLayer", masks: StepMasks) -> torch.Tensor:
    """[B, Hkv, sink + window]: the pass's local validity for each KV head (an expanded view)."""
    return masks.local_valid[:, None].expand(-1, layer.store.shape[1], -1)


def _select(
    layer: "A2ATSLayer", query: torch.Tensor, position_ids: torch.Tensor, masks: StepMasks, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The far tokens to attend, (indices [B, Hkv, K], counts [B, Hkv]) on the device, or None where there is
    nothing to retrieve (a short context, or a scorer that retrieves nothing)."""
    cache = layer.cache
    far_max = max(layer.width - layer.config.window - layer.config.sink, 0)  # the host's bound on a row's candidates
    k_max = cache.budget_for(far_max)  # host-side: nothing waits
    if k_max == 0 or not cache.scorer.retrieves:
        return None
    rerank, rule = layer.rerank, layer.config.budget
    # re-ranking's candidates are one pool a KV group: R x the budget by the table of the group's summed query
    # (the union of each query head's own R x budget holds no more of their exact top-K, and costs G tables)
    inputs = layer.score_inputs(query, position_ids, scaling, masks.far, layer.table_rule)
    lut, codes, histogram = layer.scorer.scores(inputs)
    if rerank == 1:
        return kernels.select_topk(lut, codes, masks.far, masks.budget, rule, histogram=histogram, k_max=k_max,
                                   key_bits=layer.scorer.key_bits)
    # scored exactly where the select writes them, by each query head (or the group's summed query), which then
    # keeps its budget's best (or the group keeps one budget by the sum)
    return kernels.select_topk(
        lut, codes, masks.far, masks.candidates, "kv_head", histogram=histogram,
        k_max=min(k_max * rerank, far_max), key_bits=CANDIDATE_KEY_BITS,
        exact=(inputs.table_query if rule == "kv_head" else query, layer.store.keys),
        keep=kernels.Keep(masks.budget, k_max, rule, KEEP_KEY_BITS))


def _offloaded(
    layer: "A2ATSLayer", query: torch.Tensor, position_ids: torch.Tensor, masks: StepMasks, scaling: float
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """The paper's layout: the device selects the far tokens and hands their indices to the CPU, then attends its
    sinks and window while the CPU attends the selected rows of its store; the two merge by log-sum-exp. From a GPU
    every copy goes through the pinned buffers of :mod:`a2ats_hf.handoff`, and the host waits once: for the
    selection. In a capture-ready step the CPU's part is :meth:`StaticStep.on_cpu`'s (between two graph pieces).
    With ``gpu_share``, the device attends the first share of each selection itself, reading the rows in place
    from the pinned store over PCIe, beside the window; the CPU the rest. With a ``row_cache``, the device attends
    the selected rows its slots hold, beside the window, the CPU the misses, and the first misses the CPU copies
    out take slots after the merge. With ``gpu_share=1`` the device attends them all (:func:`_read_in_place`).
    Returns the output and the tokens selected (a host count; the device's counts in a capture-ready step, with a
    device share or a row cache)."""
    selection = _select(layer, query, position_ids, masks, scaling)
    if selection is not None and layer.attended_on_device():
        return _read_in_place(layer, query, selection, masks, scaling), selection[1]
    static, on_gpu = layer.cache.static, query.is_cuda
    far = None  # the device's share of the selected rows (``gpu_share``), read in place from the pinned store
    rows, split = layer.row_cache, None
    if selection is not None:
        indices, counts, cpu_query = selection[0], selection[1], query
        if rows is not None:  # the rows the slots hold are attended on the device, the misses on the CPU
            split = rows.split(indices, counts, layer.length)
            far = kernels.FarRows(DeviceKVStore.over(rows.keys, rows.values, rows.slots), split.hit_slots,
                                  split.hit_counts)
            indices, counts = split.miss_indices, split.miss_counts
            filled = rows.fill_width(indices.shape[-1])
        mapped = layer.store.mapped() if layer.config.gpu_share else None
        if mapped is not None:
            share = math.ceil(layer.config.gpu_share * indices.shape[-1])
            far = kernels.FarRows(mapped, indices[..., :share], counts.clamp(max=share))
            indices, counts = indices[..., share:].contiguous(), (counts - share).clamp(min=0)
        if on_gpu:  # hand the selection to the CPU without stalling the queue behind it
            hand = hand_off(query.device, layer.cache.lane)
            indices, counts, cpu_query = hand.send(indices, counts, query)
            outputs = hand.outputs(query)
        else:
            outputs = kernels.output_buffers(query)
        if rows is not None:  # where the CPU copies the misses that will take slots, key and value side by side
            shape, dtype = (*indices.shape[:2], filled, 2, rows.keys.shape[-1]), layer.store.dtype
            incoming = hand.buffer("incoming rows", shape, dtype) if on_gpu else torch.empty(shape, dtype=dtype)
    out, lse = kernels.attention_with_lse(query, layer.local_keys, layer.local_values, _local_valid(layer, masks),
                                          scaling, far)
    if selection is None:
        return out, 0

    def attend_on_cpu() -> None:
        if on_gpu:
            hand.ready.synchronize()  # the GPU goes on with the window attention meanwhile
            if layer.first and static is None:
                layer.cache.check_validity()  # the pass's comparison of the mask was queued before: it has landed
        if static is not None:
            layer.store.place_written()
        kernels.sparse_attention(cpu_query, layer.store, indices, counts, scaling, outputs,
                                 incoming if rows is not None else None)

    if static is None:
        attend_on_cpu()
    else:
        static.on_cpu(attend_on_cpu)
    out = kernels.merge_attention(out, lse, *outputs)  # the kernel reads the CPU's outputs in place (pinned)
    if rows is not None:  # the kernel reads the rows that come in place from the pinned buffer
        rows.fill(split, incoming, layer.length)
    if static is None and far is None:
        return out, int(counts.sum())  # on the host already
    return out, selection[1]  # the device's counts


def _read_in_place(
    layer: "A2ATSLayer", query: torch.Tensor, selection: tuple[torch.Tensor, torch.Tensor], masks: StepMasks,
    scaling: float,
) -> torch.Tensor:
    """``gpu_share=1``: the device attends every selected row beside the window, reading them in place from the
    store's one pinned block over PCIe; with a row cache, it reads only the misses, into the slots of the rows
    picked longest ago, then attends the whole selection from the slots. Nothing goes to the CPU and nothing
    waits."""
    store, rows = layer.store, layer.row_cache
    if store.staged > layer.config.window:  # an eager step's staged tokens leave the window: into the block first
        store.wait()
    if rows is None:
        far = kernels.FarRows(store.mapped(), *selection)
    else:
        split = rows.split(*selection, layer.length)
        rows.fill(split, store.one_block(), layer.length, from_store=True)
        far = kernels.FarRows(DeviceKVStore.over(rows.keys, rows.values, rows.slots), split.hit_slots,
                              split.hit_counts)
    out, _ = kernels.attention_with_lse(query, layer.local_keys, layer.local_values, _local_valid(layer, masks),
                                        scaling, far)
    return out
