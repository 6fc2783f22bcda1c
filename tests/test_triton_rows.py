"""The row cache's fused split and fill against the torch references (under TRITON_INTERPRET=1 without a GPU):
random selections drifting over many steps, widths that are not powers of two and span several of a program's
blocks, empty selections, a head dimension that is not a power of two, the step's length on the host or the
device, and row views of a batch (the pipelined halves)."""

from __future__ import annotations

import os

import pytest
import torch

from a2ats_hf.kernels import reference, triton_rows
from a2ats_hf.rowcache import RowCache

from conftest import DEVICE, compile_for_hopper

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not os.environ.get("TRITON_INTERPRET"),
    reason="needs a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)",
)
KERNEL_DEVICE = DEVICE if DEVICE.type == "cuda" else torch.device("cpu")


def host(tensor: torch.Tensor) -> torch.Tensor:
    """CPU memory a GPU kernel reads in place: pinned where there is a GPU."""
    return tensor.pin_memory() if KERNEL_DEVICE.type == "cuda" else tensor


@pytest.mark.parametrize("b, h, slots, d, tokens, width, steps, now_on_device, view", [
    (2, 3, 40, 24, 300, 19, 30, False, False), (1, 2, 1500, 80, 4000, 1100, 4, True, False),
    (3, 1, 64, 16, 200, 30, 12, True, True)],
    ids=["small", "wide", "halves-view"])
@pytest.mark.parametrize("from_store", [False, True], ids=["cpu-copies", "from-store"])
def test_split_and_fill_match_reference(b, h, slots, d, tokens, width, steps, now_on_device, view, from_store):
    """Step after step, the fused kernels leave the cache exactly as the references do: the same hits, misses and
    counts, the same victims (ties by slot number, ages capped), the same slots, map, stamps and K/V; filled from
    the CPU's copies of the first misses, or from the store's block (every miss, listed after the hits)."""
    g = torch.Generator().manual_seed(slots)
    caches = [RowCache.empty(b, h, slots, d, tokens, torch.bfloat16, device) for device in
              (torch.device("cpu"), KERNEL_DEVICE)]
    block = host(torch.randn(b, h, tokens, 2, d, generator=g).bfloat16())  # the store's, read in place
    fill, now = max(1, width // 8), 1000
    for step in range(steps):
        pool = torch.randperm(tokens // 3, generator=g) + (step % 4) * (tokens // 40)  # overlapping, drifting picks
        indices = torch.stack([torch.stack([pool[torch.randperm(len(pool), generator=g)[:width]].sort().values
                                            for _ in range(h)]) for _ in range(b)]).int()
        counts = torch.randint(0, width + 1, (b, h), generator=g).int()
        counts[0, 0] = width if step % 2 else 0
        incoming = host(torch.randn(b, h, fill, 2, d, generator=g).bfloat16())  # the CPU's copies, read in place
        now += int(torch.randint(1, 90, (1,), generator=g))  # the step's length: gaps past the age cap too
        results = []
        for cache in caches:
            device = cache.keys.device
            part = cache.rows(1, b) if view else cache  # a half's row views write through to the cache
            rows = slice(1, b) if view else slice(None)
            at = torch.tensor([now], device=device) if now_on_device else now
            kernels = triton_rows if device == KERNEL_DEVICE and cache is caches[1] else reference
            split = kernels.split_rows(part.slot, part.stamp, part.sought, part.found, indices[rows].to(device),
                                       counts[rows].to(device), at)
            source = block[rows] if from_store else incoming[rows]
            kernels.fill_rows(part.keys, part.values, part.token, part.stamp, part.slot, split[2], split[3],
                              source, at, by_token=from_store, hits=split[:2] if from_store else None)
            results.append([t.cpu() for t in split])
        for want, got in zip(results[0], results[1]):
            assert torch.equal(want, got)
        for want, got in zip(caches[0].tensors(), caches[1].tensors()):
            assert torch.equal(want, got.cpu())
        if from_store:  # every selected row is in the slots the hit list names
            listed = caches[1].token[rows].gather(-1, results[1][0].to(KERNEL_DEVICE).long()).cpu()
            for r, c in enumerate(range(b)[rows]):
                for head in range(h):
                    n = int(counts[c, head])
                    assert int(results[1][1][r, head]) == n
                    assert sorted(listed[r, head, :n].tolist()) == indices[c, head, :n].tolist()
    held = caches[1].token >= 0
    assert held.any() and caches[1].found.sum() > 0  # the caches did fill and find


POINTERS = {"stamp_ptr": "*i64", "sought_ptr": "*i64", "found_ptr": "*i64", "keys_ptr": "*bf16", "values_ptr": "*bf16",
            "in_ptr": "*bf16"}  # the rest are int32


@pytest.mark.parametrize("kernel, constants", [
    ("_split_kernel", {"H": 8, "BLOCK": 1024}),
    ("_fill_kernel", {"H": 8, "D": 128, "D_PAD": 128, "BLOCK": 1024, "BLOCK_F": 64, "AGE_CAP": 255,
                      "BY_TOKEN": False, "APPEND": False}),
    ("_fill_kernel", {"H": 8, "D": 128, "D_PAD": 128, "BLOCK": 1024, "BLOCK_F": 64, "AGE_CAP": 255,
                      "BY_TOKEN": True, "APPEND": True})], ids=["split", "fill", "fill-from-store"])
@pytest.mark.parametrize("now_on_device", [False, True])
def test_kernels_compile_for_hopper(kernel, constants, now_on_device):
    """The kernels compile to PTX for an H100/H200 (sm_90), here without a GPU."""
    pointers = {**POINTERS, "now_ptr": "*i64" if now_on_device else "*i32"}
    compile_for_hopper("triton_rows", kernel, {**constants, "NOW_ON_DEVICE": now_on_device}, pointers)
