"""Kernels behind A2ATS decode: encoding new keys, the lookup table of a turned query (and in its launch the distance
scorer's columns moving on), a capture-ready step's writes, top-K selection over codes (with re-ranking's
candidates' exact scores), attention with log-sum-exp over the local window (and, where the K/V stays on the GPU,
the selected rows), sparse attention over the CPU store, LSE merge.

Every kernel has a plain torch reference in :mod:`.reference`; the rest of the package calls only the names
exported here, which pick the fast implementation where it applies (Triton top-K, attention and merge on a GPU, the
C++ CPU kernel for sparse attention) and the reference otherwise.
On a GPU a decode step is bound by host time (a torch operation costs ~10 us to issue), so the Triton kernels fuse
what the references spell out in many operations.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import cpu_attention, reference
from .cpu_attention import output_buffers
from .reference import ColumnMove, FarRows, Keep, code_histogram

HAS_TRITON = importlib.util.find_spec("triton") is not None
FUSED_ENCODE_TOKENS = 16  # new keys per row up to which one Triton program per key encodes (a prompt: the matmul)


@dataclass(frozen=True)
class Backend:
    """One device kind's implementation of every device-side kernel, each with its :mod:`.reference` contract."""

    encode_keys: Callable
    rotated_lookup_table: Callable
    write_token: Callable
    count_leaving: Callable
    attention_with_lse: Callable
    local_and_far_attention: Callable
    merge_attention: Callable
    select_topk: Callable
    keep_top: Callable
    split_rows: Callable
    fill_rows: Callable


TORCH = Backend(reference.encode_keys, reference.rotated_lookup_table, reference.write_token, reference.count_leaving,
                reference.attention_with_lse, reference.local_and_far_attention, reference.merge_attention,
                reference.select_topk, reference.keep_top, reference.split_rows, reference.fill_rows)


@functools.cache
def _triton() -> Backend:
    from . import triton_attention, triton_codes, triton_rows, triton_step, triton_topk  # Triton compiles on import

    return Backend(triton_codes.encode_keys, triton_codes.rotated_lookup_table, triton_step.write_token,
                   triton_step.count_leaving, triton_attention.attention_with_lse, triton_attention.attention_with_lse,
                   triton_attention.merge_attention, triton_topk.select_topk, triton_topk.keep_top,
                   triton_rows.split_rows, triton_rows.fill_rows)


def backend(device: torch.device) -> Backend:
    """The kernels for ``device``: Triton's on a GPU where Triton is installed (imported once), the torch
    references elsewhere."""
    return _triton() if device.type == "cuda" and HAS_TRITON else TORCH


_watchers: list[Callable[[str], AbstractContextManager]] = []


@contextmanager
def watching(watcher: Callable[[str], AbstractContextManager]) -> Iterator[None]:
    """Within the block, every kernel call runs inside ``watcher(name)`` (a context manager): how a benchmark times
    a step's phases without replacing the kernels. Unwatched, a call costs one list check more."""
    _watchers.append(watcher)
    try:
        yield
    finally:
        _watchers.remove(watcher)


def _call(name: str, kernel: Callable, *args, **kwargs):
    """``kernel(*args, **kwargs)``, inside every watcher's context when some are set (see :func:`watching`)."""
    if not _watchers:
        return kernel(*args, **kwargs)
    with ExitStack() as stack:
        for watcher in _watchers:
            stack.enter_context(watcher(name))
        return kernel(*args, **kwargs)


def _on(tensor: torch.Tensor, name: str, *args, **kwargs):
    """Backend kernel ``name`` run for ``tensor``'s device: Triton launches on the current GPU, and a layer may sit
    on another (the usual case, the current one, spares the switch's host time)."""
    kernel = getattr(backend(tensor.device), name)
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        with torch.cuda.device(tensor.device):
            return _call(name, kernel, *args, **kwargs)
    return _call(name, kernel, *args, **kwargs)


def encode_keys(
    keys: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None, whitener: torch.Tensor,
    whitened_centroids: torch.Tensor, norms: torch.Tensor, out: torch.Tensor, column: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes of new keys written into ``out`` (at a device ``column`` of it, if given); see
    :func:`.reference.encode_keys`. Two Triton launches on a GPU for up to ``FUSED_ENCODE_TOKENS`` keys per row,
    the reference's batched matmul for a prompt."""
    args = (keys, rotation, whitener, whitened_centroids, norms, out, column)
    if keys.shape[2] > FUSED_ENCODE_TOKENS:
        return _call("encode_keys", reference.encode_keys, *args)
    return _on(keys, "encode_keys", *args)


def rotated_lookup_table(
    query: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None, centroids: torch.Tensor,
    move: ColumnMove | None = None, summed: bool = False,
) -> torch.Tensor:
    """LUT of a turned query (``summed``: each KV group's queries summed) against the centroids, and with ``move``
    the distance scorer's columns moved on to ``move.n`` tokens (on the host, or on the device in a capture-ready
    step), in place; see :func:`.reference.rotated_lookup_table` and :func:`.reference.move_bucket_columns`. One
    Triton launch on a GPU."""
    return _on(query, "rotated_lookup_table", query, rotation, centroids, move, summed)


def write_token(
    key: torch.Tensor, value: torch.Tensor, store_keys: torch.Tensor | None, store_values: torch.Tensor | None,
    local_keys: torch.Tensor, local_values: torch.Tensor, column: torch.Tensor, sink: int, window: int,
) -> None:
    """A capture-ready step's new token written into the device store (where given) and the window ring at its
    device ``column``; see
    :func:`.reference.write_token`. One Triton launch on a GPU."""
    _on(key, "write_token", key, value, store_keys, store_values, local_keys, local_values, column, sink, window)


def count_leaving(histogram: torch.Tensor, codes: torch.Tensor, far: torch.Tensor, column: int | torch.Tensor,
                  offset: int) -> None:
    """The code of the token at ``column + offset`` (a host int, or a device tensor in a capture-ready step)
    counted into ``histogram`` where it is a far candidate; see :func:`.reference.count_leaving`. One Triton launch
    on a GPU."""
    _on(histogram, "count_leaving", histogram, codes, far, column, offset)


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float,
    far: FarRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp over the sinks + window (see :func:`.reference.attention_with_lse`) and,
    where the K/V stays on the device, the selected ``far`` rows too (:func:`.reference.local_and_far_attention`).
    One Triton launch on a GPU (two when the keys are split over programs), the torch reference elsewhere."""
    if far is None:
        return _on(query, "attention_with_lse", query, keys, values, valid, scaling)
    return _on(query, "local_and_far_attention", query, keys, values, valid, scaling, far)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Two attentions over disjoint key sets merged by their log-sum-exps; see :func:`.reference.merge_attention`.
    One Triton launch on a GPU (``out_b`` and ``lse_b`` may be pinned host memory: read in place), the torch
    reference elsewhere."""
    return _on(out_a, "merge_attention", out_a, lse_a, out_b, lse_b)


def keep_top(
    indices: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, k_max: int,
    budget: str = "query_head", key_bits: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranking's keep, the candidates with the top exact scores; see :func:`.reference.keep_top`. One Triton
    launch on a GPU for up to ``KEEP_TABLE`` candidates; past it, a split select of each head's threshold and
    one scan."""
    return _on(indices, "keep_top", indices, counts, scores, k, k_max, budget, key_bits)


def split_rows(
    slot: torch.Tensor, stamp: torch.Tensor, sought: torch.Tensor, found: torch.Tensor, indices: torch.Tensor,
    counts: torch.Tensor, now: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A selection split by a row cache into its hits and misses; see :func:`.reference.split_rows`. One Triton
    launch on a GPU."""
    return _on(indices, "split_rows", slot, stamp, sought, found, indices, counts, now)


def fill_rows(
    keys: torch.Tensor, values: torch.Tensor, token: torch.Tensor, stamp: torch.Tensor, slot: torch.Tensor,
    miss_indices: torch.Tensor, miss_counts: torch.Tensor, source: torch.Tensor, now: int | torch.Tensor,
    by_token: bool = False, hits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """A split's misses brought into a row cache's oldest slots, their rows read from the CPU's copies or from the
    store (``by_token``); see :func:`.reference.fill_rows`. One Triton launch on a GPU, which reads a pinned
    ``source`` in place over PCIe."""
    _on(keys, "fill_rows", keys, values, token, stamp, slot, miss_indices, miss_counts, source, now, by_token, hits)


def sparse_attention(
    query: torch.Tensor, store, indices: torch.Tensor, counts: torch.Tensor, scaling: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None, copies: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the selected rows of a CPU store, copying the first rows into ``copies`` where given; see
    :func:`.cpu_attention.sparse_attention` (the C++ kernel, or the torch reference without a compiler)."""
    return _call("sparse_attention", cpu_attention.sparse_attention, query, store, indices, counts, scaling, out,
                 copies)


def select_topk(
    lut: torch.Tensor,
    codes: torch.Tensor,
    candidates: torch.Tensor,
    k: torch.Tensor,
    budget: str = "query_head",
    histogram: torch.Tensor | None = None,
    k_max: int | None = None,
    key_bits: int = 32,
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep: Keep | None = None,
) -> tuple[torch.Tensor, ...]:
    """Top-K far tokens per (row, KV head) from LUT scores, and with ``exact`` (query, keys) their exact scores
    (re-ranking's candidates), or with ``keep`` too what re-ranking keeps of them; see
    :func:`.reference.select_topk` for the contract.

    On a GPU with Triton, the fused kernel runs (``histogram`` of the candidates' codes and a host-side bound
    ``k_max`` on ``k`` spare it a pass over the codes and a device sync; the exact scores come from a launch
    after the pass that writes the indices, and a keep's zeroed words come with the select's own); indices may
    then be int32 and padded wider than the largest count.
    """
    return _on(codes, "select_topk", lut, codes, candidates, k, budget, histogram=histogram, k_max=k_max,
               key_bits=key_bits, exact=exact, keep=keep)


__all__ = ["Backend", "ColumnMove", "FarRows", "Keep", "attention_with_lse", "backend", "code_histogram",
           "count_leaving", "encode_keys", "keep_top", "merge_attention", "output_buffers", "rotated_lookup_table",
           "select_topk", "sparse_attention", "split_rows", "fill_rows", "watching", "write_token"]
