"""Micro-benchmarks of the fast offloaded path, each beside its physical bound and the baseline a user would pick.

1. Top-K scoring (Triton) over uint16 codes: GB/s over the bytes it must read vs HBM bandwidth measured here;
   beside it, scores by ``gather`` + ``torch.topk`` (what one would write in torch).
2. CPU sparse attention (C++), 3% of N rows per (row, KV head), head dim 128, bf16 store: GB/s over the bytes it
   gathers vs the CPU copy bandwidth measured here (all cores); beside it, the torch reference and
   ``index_select`` + matmul on a contiguous tensor.
3. Attention over the selected rows where the K/V stays on the GPU (Triton, one launch plus the splits' combine):
   GB/s over the rows it gathers vs HBM bandwidth, beside sdpa over the whole K/V (a single call, so small shapes
   show its launch; its launch settings are tuned on the captured step by ``bench/tune_step.py``).
4. Re-ranking's keep (``keep_top``, one program per (row, KV head) over 2 x 3% of N candidates) beside its parts
   alone: the radix select, and the scores' load (the launch and read it cannot go below): where its time goes.
5. Re-ranking's select and keep as a decode step runs them (the pool of R x 3% by the table, scored exactly, then
   the budget kept), per query head (the default) and per KV head, on random keys and on crowded ones (the exact
   scores of a head share a few 16-bit keys, as real keys' do): the kernels' GPU time, by kernel.
6. One decode step of one Llama-3.1-8B-shaped layer (32 query / 8 KV heads, head dim 128, 4096 centroids), its time
   split by phase (each phase timed alone, with syncs) and the real overlapped step; beside it, sdpa over the full
   K/V on the GPU (DynamicCache) and the offloaded-cache way (copy the layer's K/V to the GPU, then sdpa).

Run on the GPU box:  python -m bench.kernels_bench [--quick]   (writes bench/results/kernels/<date>-<commit>-<gpu>.json;
``--parts cpu``, the CPU attention alone, runs on any machine)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from a2ats_hf import A2ATSCache, Codebooks, kernels
from a2ats_hf import step as step_module
from a2ats_hf.cache import RERANK
from a2ats_hf.codebooks import fingerprint
from a2ats_hf.kernels import code_histogram, cpu_attention, reference, triton_topk
from a2ats_hf.kernels.triton_topk import _order_key, _top_bits, _unit_select
from a2ats_hf.rope import RoPE
from a2ats_hf.store import DeviceKVStore, KVStore, hugetlb_pool, meminfo
from bench.common import cuda_time, environment, gpu_profile, results_path, wall_time
from bench.report import CPU_ATTENTION, DECODE_LAYER, DEVICE_ATTENTION, KEEP, RERANK_STEP, TOPK, table

HKV, GROUP, D, M = 8, 4, 128, 4096
LLAMA8B = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      num_hidden_layers=1, rope_theta=500000.0, max_position_embeddings=1 << 20)


def bandwidths() -> dict:
    """HBM copy, CPU copy (all cores) and pinned PCIe bandwidth, GB/s (copy = read + write bytes); the GPU's are
    None without one (the CPU attention's part runs anywhere)."""
    source = torch.ones(2**31, dtype=torch.uint8)
    target = torch.empty_like(source)
    cpu = 2 * source.numel() / wall_time(lambda: target.copy_(source), 5) / 1e9
    result = {"hbm_gbs": None, "cpu_copy_gbs": round(cpu, 1), "pcie_h2d_gbs": None,
              "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        p = torch.ones(2**29, dtype=torch.uint8, pin_memory=True)
        result["hbm_gbs"] = round(2 * x.numel() / cuda_time(lambda: x.clone(), 10) / 1e9)
        result["pcie_h2d_gbs"] = round(p.numel() / cuda_time(lambda: x[: p.numel()].copy_(p, non_blocking=True),
                                                             10) / 1e9, 1)
    return result


def bench_topk(n: int, b: int, hbm: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n + b)
    codes = torch.randint(0, M, (b, HKV, n), device="cuda", generator=g, dtype=torch.int32).to(torch.uint16)
    cand = torch.ones(b, n, dtype=torch.bool, device="cuda")
    cand[:, -64:] = False
    lut = torch.randn(b, HKV * GROUP, M, device="cuda", generator=g)
    k = torch.full((b,), int(0.03 * (n - 64)), device="cuda")
    hist = code_histogram(codes, cand, M)
    k_max = int(k[0])
    got, counts = kernels.select_topk(lut, codes, cand, k, histogram=hist, k_max=k_max)
    expected, expected_counts = reference.select_topk(lut, codes, cand, k)  # exact at full size, on the GPU
    width = expected.shape[-1]
    same = torch.equal(counts.long(), expected_counts) and torch.equal(got[..., :width].long(), expected)
    del expected
    fast = cuda_time(lambda: kernels.select_topk(lut, codes, cand, k, histogram=hist, k_max=k_max))

    def torch_topk():
        scores = lut.view(b, HKV, GROUP, M).gather(-1, codes.long()[:, :, None].expand(-1, -1, GROUP, -1))
        return scores.masked_fill(~cand[:, None, None], float("-inf")).topk(k_max, dim=-1)

    baseline = cuda_time(torch_topk, 5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            kernels.select_topk(lut, codes, cand, k, histogram=hist, k_max=k_max)
        torch.cuda.synchronize()
    device_us = {}  # GPU time per call by kernel (scans by pass, in launch order): where the time goes
    kernels_run = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    scans = 0
    for event in sorted(kernels_run, key=lambda e: e.time_range.start):
        if "scan" in event.name:
            name, scans = f"scan pass {scans % 3}", scans + 1
        else:
            name = "threshold" if "threshold" in event.name else "other"
        device_us[name] = round(device_us.get(name, 0.0) + event.time_range.elapsed_us() / 5, 1)
    must_read = codes.numel() * 2 + cand.numel() + lut.numel() * 4 + hist.numel() * 4
    return {"n": n, "batch": b, "mb_read": round(must_read / 1e6, 1), "triton_us": round(fast * 1e6, 1),
            "triton_gbs": round(must_read / fast / 1e9), "pct_hbm": round(100 * must_read / fast / 1e9 / hbm, 1),
            "bound_us": round(must_read / hbm / 1e3, 1), "torch_topk_us": round(baseline * 1e6, 1),
            "device_us": device_us, "matches_reference": same}


def bench_device_attention(n: int, b: int, rows: int, hbm: float) -> dict:
    """The selected rows' attention on the GPU: ``rows`` random rows per (row, KV head) of an N-token K/V, plus a
    68-key window, as the per-KV-head rule selects them (the per-query-head rule's union is up to GROUP x wider)."""
    g = torch.Generator(device="cuda").manual_seed(n + b)
    store = DeviceKVStore(b, HKV, D, torch.bfloat16, "cuda", n)
    store.append(*(torch.randn(2, b, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)))
    indices = torch.rand(b, HKV, n, device="cuda", generator=g).argsort(-1)[..., :rows].sort(-1).values.int()
    counts = torch.full((b, HKV), rows, dtype=torch.int32, device="cuda")
    far = kernels.FarRows(store, indices, counts)
    query = torch.randn(b, HKV * GROUP, D, device="cuda", dtype=torch.bfloat16, generator=g)
    local = torch.randn(2, b, HKV, 68, D, device="cuda", dtype=torch.bfloat16, generator=g)
    valid = torch.ones(b, HKV, 68, dtype=torch.bool, device="cuda")
    run = lambda: kernels.attention_with_lse(query, local[0], local[1], valid, D**-0.5, far)  # noqa: E731
    expected, _ = reference.local_and_far_attention(query, local[0], local[1], valid, D**-0.5, far)
    error = float((run()[0] - expected).abs().max())
    gathered = b * HKV * (rows + 68) * D * 2 * 2 + indices.numel() * 4
    result = {"n": n, "batch": b, "rows": rows, "mb_gathered": round(gathered / 1e6, 1),
              "triton_us": round(cuda_time(run) * 1e6, 1), "bound_us": round(gathered / hbm / 1e3, 1),
              "max_error": error}
    result["gbs"] = round(gathered / result["triton_us"] / 1e3)
    keys = store.keys[:, :, :n]
    result["sdpa_full_us"] = round(cuda_time(lambda: F.scaled_dot_product_attention(
        query[:, :, None], keys, store.values[:, :, :n], enable_gqa=True)) * 1e6, 1)
    return result


@triton.jit
def _keep_part_kernel(score_ptr, k_ptr, out_ptr, c, TABLE: tl.constexpr, SELECT: tl.constexpr,
                      DIGIT_BITS: tl.constexpr, KEY_BITS: tl.constexpr):
    """One of keep_top's parts alone, a program per (row, KV head): its scores loaded as order keys (their top
    KEY_BITS), then its select (SELECT, :func:`_unit_select`'s threshold) or only their largest (the floor: a launch
    and a read), one word stored."""
    pid = tl.program_id(0)
    j = tl.arange(0, TABLE)
    inside = j < c
    key = _top_bits(_order_key(tl.load(score_ptr + pid.to(tl.int64) * c + j, mask=inside, other=0.0)), KEY_BITS)
    if SELECT:
        thr = _unit_select(key, inside, tl.load(k_ptr).to(tl.int32), DIGIT_BITS, KEY_BITS)[0]
        word = thr + tl.zeros([1], dtype=tl.uint32)
    else:
        word = tl.max(key, axis=0) + tl.zeros([1], dtype=tl.uint32)
    tl.store(out_ptr + pid + tl.arange(0, 1), word)


def kernel_us(fn, calls: int = 20) -> dict[str, float]:
    """GPU microseconds a call of ``fn`` spends in each kernel it launches (after a call that compiles them)."""
    fn()
    profile = gpu_profile(fn, torch.device("cuda"), steps=calls, top=None)
    return {name: round(1e3 * ms, 1) for name, ms, _ in profile["kernels_ms"]}


def bench_keep(n: int, b: int) -> dict:
    """keep_top over ``rerank=2``'s candidates at N tokens (2 x 3% of N a (row, KV head), scores summed per KV head
    as the per-KV-head rule hands them), also at 8 warps (fewer instructions issued in all, by its SASS), beside its
    select alone and its floor, each the kernel's GPU time."""
    k_max = int(0.03 * n)
    c = 2 * k_max
    g = torch.Generator(device="cuda").manual_seed(n + b)
    scores = torch.randn(b, HKV, c, device="cuda", generator=g)
    indices = torch.arange(c, dtype=torch.int32, device="cuda").expand(b, HKV, c).contiguous()
    counts = torch.full((b, HKV), c, dtype=torch.int32, device="cuda")
    k = torch.full((b,), k_max, device="cuda")
    table = max(16, triton.next_power_of_2(c))
    warps = min(triton_topk.KEEP_WARPS, max(4, table // 512))
    out = torch.empty(b * HKV, dtype=torch.int32, device="cuda")

    def part(select: bool):
        return lambda: _keep_part_kernel[(b * HKV,)](scores, k, out, c, TABLE=table, SELECT=select,
                                                     DIGIT_BITS=triton_topk.KEEP_DIGIT_BITS,
                                                     KEY_BITS=step_module.KEEP_KEY_BITS, num_warps=warps)

    def keep_us(most_warps: int, digit_bits: int, key_bits: int = step_module.KEEP_KEY_BITS) -> float:
        with mock.patch.multiple(triton_topk, KEEP_WARPS=most_warps, KEEP_DIGIT_BITS=digit_bits):
            spent = kernel_us(lambda: triton_topk.keep_top(indices, counts, scores, k, k_max, "kv_head", key_bits))
        return sum(us for name, us in spent.items() if "keep_top" in name)

    most, digits = triton_topk.KEEP_WARPS, triton_topk.KEEP_DIGIT_BITS
    return {"n": n, "batch": b, "candidates": c, "warps": warps, "keep_top_us": keep_us(most, digits),
            "keep_top_8_warps_us": keep_us(8, digits),
            **{f"keep_top_{bits}_bit_digits_us": keep_us(most, bits) for bits in (2, 4, 8) if bits != digits},
            **{f"keep_top_{bits}_bit_keys_us": keep_us(most, digits, bits) for bits in (16, 32)
               if bits != step_module.KEEP_KEY_BITS},
            "select_us": sum(kernel_us(part(True)).values()), "floor_us": sum(kernel_us(part(False)).values())}


def bench_rerank(n: int, b: int, rule: str, crowded: bool) -> dict:
    """Re-ranking's select (R x 3% a KV head from the table, scored exactly) and keep (3%), as ``step._select``
    calls them, at N tokens with the last 1,024 local; ``crowded`` keys share a direction (the exact scores of a head
    then crowd a few 16-bit keys, as real keys' do), else they are random. Each kernel's GPU time."""
    g = torch.Generator(device="cuda").manual_seed(n + b)
    rerank, far_max = RERANK[rule], n - 1024
    k_max = math.ceil(0.03 * far_max)
    codes = torch.randint(0, M, (b, HKV, n), device="cuda", generator=g).to(torch.uint16)
    keys = torch.randn(b, HKV, n, D, device="cuda", generator=g)
    keys = (0.05 * keys + 1 if crowded else keys).to(torch.bfloat16)
    query = torch.randn(b, HKV * GROUP, D, device="cuda", generator=g, dtype=torch.bfloat16)
    far = torch.zeros(b, n, dtype=torch.bool, device="cuda")
    far[:, :far_max] = True
    budget = torch.full((b,), k_max, device="cuda")
    lut = torch.randn(b, HKV, M, device="cuda", generator=g)  # the group's summed table: the pool's
    histogram = code_histogram(codes, far, M)
    exact = reference.group_query(query, HKV) if rule == "kv_head" else query  # as the step sums it: float32

    def step() -> None:
        kernels.select_topk(lut, codes, far, budget * rerank, "kv_head", histogram=histogram, k_max=k_max * rerank,
                            key_bits=step_module.CANDIDATE_KEY_BITS, exact=(exact, keys),
                            keep=kernels.Keep(budget, k_max, rule, step_module.KEEP_KEY_BITS))

    spent = kernel_us(step)
    return {"n": n, "batch": b, "rule": rule, "rerank": rerank, "keys": "crowded" if crowded else "random",
            "gpu_us": round(sum(spent.values()), 1), "kernels_us": spent}


def random_store(b: int, n: int, dtype=torch.bfloat16, pinned: bool = False) -> KVStore:
    """An N-token store of random K/V, pageable unless ``pinned`` (as decoding from a GPU pins it: registered huge
    pages; pinning 30 GiB only slows the set-up where it makes no difference)."""
    store = KVStore(b, HKV, D, dtype)
    store.pin = pinned
    chunk = torch.empty(b, HKV, store.block_size, D, dtype=dtype).normal_()  # values do not change the speed
    for start in range(0, n, store.block_size):
        t = min(store.block_size, n - start)
        store.append(chunk[:, :, :t], chunk[:, :, :t])
    return store


ROWS = {  # which 3% of the rows a call gathers, per (row, KV head): where the gather's time goes
    "random": lambda g, b, n, k: torch.randint(0, n, (b, HKV, k), generator=g),  # as decoding: a page walk each
    "near": lambda g, b, n, k: torch.randint(0, min(n, 8192), (b, HKV, k), generator=g),  # 4 MB: few TLB misses
    "consecutive": lambda g, b, n, k: torch.randint(0, n - k, (b, HKV, 1), generator=g) + torch.arange(k),
}


def bench_cpu_attention(n: int, b: int, cpu_bw: float, baselines: bool, threads: int | None = None,
                        rows: str = "random", pinned: bool = False, stores: int = 1, pause_ms: float = 0.0) -> dict:
    """The C++ kernel over 3% of the rows of an N-token store (``rows``: random by default, as decoding selects),
    each call a new selection of four in turn (one repeated would be served by the last-level cache where it fits
    there); ``threads``: torch's, for the call; ``pinned``: the store's blocks pinned as decoding pins them;
    ``stores``: that many stores, one per call in turn, as a decode step's layers take theirs (each call then
    finds a store whose pages the last calls did not touch, as decoding does); ``pause_ms``: the host idle that
    long before each call, as it waits on a layer's GPU part between two calls in a decode step (the threads and
    caches then start cold)."""
    pool, huge = hugetlb_pool()[0], meminfo("AnonHugePages") or 0
    layers = [random_store(b, n, pinned=pinned) for _ in range(stores)]
    store = layers[0]
    pool_gib = round((pool - hugetlb_pool()[0]) / 2**30, 2)  # the store's blocks from the hugetlb pool
    huge_gib = round(((meminfo("AnonHugePages") or 0) - huge) / 2**30, 2)  # and on transparent huge pages
    g = torch.Generator().manual_seed(n)
    k = int(0.03 * n)
    selections = [ROWS[rows](g, b, n, k).sort(-1).values.to(torch.int32) for _ in range(4)]  # ascending
    indices = selections[0]
    counts = torch.full((b, HKV), k, dtype=torch.int32)
    query = torch.randn(b, HKV * GROUP, D, generator=g).bfloat16().float()  # a bfloat16 model's, as decoding
    gathered = 2 * b * HKV * k * D * 2  # K and V rows, bf16
    turn = itertools.count()
    every = torch.get_num_threads()
    torch.set_num_threads(threads or every)
    try:
        def call():
            t = next(turn)
            return cpu_attention.sparse_attention(query, layers[t % stores], selections[t % 4], counts, D**-0.5)

        fast = wall_time(call, max(8, 2 * stores), (lambda: time.sleep(pause_ms / 1e3)) if pause_ms else None)
    finally:
        torch.set_num_threads(every)
    row = {"n": n, "batch": b, "threads": threads or every, "rows": rows, "pinned": pinned, "stores": stores,
           "pause_ms": pause_ms,
           "hugetlb_gib": pool_gib,
           "huge_pages_gib": huge_gib,
           "mb_gathered": round(gathered / 1e6, 1),
           "cpp_ms": round(fast * 1e3, 2), "cpp_gbs": round(gathered / fast / 1e9, 1),
           "pct_cpu_bw": round(100 * gathered / fast / 1e9 / cpu_bw, 1), "bound_ms": round(gathered / cpu_bw / 1e6, 2)}
    if baselines:
        row["reference_ms"] = round(1e3 * wall_time(
            lambda: reference.sparse_attention(query, store, indices, counts, D**-0.5), 2), 2)
        keys, values = store.to_tensors()
        flat_k, flat_v = keys.reshape(-1, D), values.reshape(-1, D)
        offsets = (torch.arange(b * HKV) * n).view(b, HKV, 1)

        def index_select_matmul():
            flat = (indices.long() + offsets).reshape(-1)
            kk = flat_k.index_select(0, flat).view(b, HKV, k, D).float()
            vv = flat_v.index_select(0, flat).view(b, HKV, k, D).float()
            q = query.view(b, HKV, GROUP, D)
            w = torch.softmax(q @ kk.transpose(-1, -2) * D**-0.5, -1)
            return w @ vv

        row["index_select_ms"] = round(1e3 * wall_time(index_select_matmul, 3), 2)
    return row


PHASES = {"select_topk": "top-K", "sparse_attention": "CPU attention", "attention_with_lse": "GPU window attention",
          "local_and_far_attention": "GPU attention", "merge_attention": "merge", "rotated_lookup_table": "LUT",
          "encode_keys": "encode"}


def phase_timers(totals: dict):
    """Time the decode step's phases with synced timers, through the kernels' watcher hook (serialises them: the
    split, not the overlapped time); seconds per phase add up in ``totals``."""

    @contextmanager
    def timed(name: str):
        torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        torch.cuda.synchronize()
        label = PHASES.get(name, name)
        totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

    return kernels.watching(timed)


def decode_layer(n: int, b: int, profile: bool = False, scoring: str = "wrope", offload: str = "cpu") -> dict:
    """One layer's decode step over an N-token random cache (K/V in CPU memory, or on the GPU with offload="none"),
    against sdpa on the GPU and the offloaded way. The step is a pass of its own, so a per-pass cost (the distance
    scorer's bucket rotations) is charged to it whole."""
    g = torch.Generator(device="cuda").manual_seed(0)
    whitener = torch.eye(D, device="cuda").expand(1, HKV, D, D).contiguous()
    books = Codebooks(whitener.cpu(), torch.randn(1, HKV, M, D, generator=g, device="cuda").cpu(), fingerprint(LLAMA8B))
    cache = A2ATSCache(books, topk=0.03, scoring=scoring, offload=offload, dense_below=0)
    cache.rope = RoPE(LlamaRotaryEmbedding(LLAMA8B), memo=cache.pass_memo)
    layer = cache.layers[0]
    new = torch.randn(b, HKV, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    layer.lazy_initialization(new, new)
    if offload == "none":
        store = DeviceKVStore(b, HKV, D, torch.bfloat16, "cuda", 2 * n)
        store.append(*(torch.randn(2, b, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)))
    else:
        store = random_store(b, n)
        store.pin = True  # new tokens arrive by asynchronous copies as in real decoding
    layer.store = store
    layer.code_buffer = torch.randint(0, M, (b, HKV, 2 * n), device="cuda", generator=g,
                                      dtype=torch.int32).to(torch.uint16)
    layer.local_keys.normal_(), layer.local_values.normal_()
    local = torch.randn(b, HKV, cache.sink, D, device="cuda", dtype=torch.bfloat16)  # the first tokens: the sinks
    layer.set_first_tokens(torch.ones(b, n, dtype=torch.bool, device="cuda"), local, local)
    query = torch.randn(b, HKV * GROUP, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        cache.pass_memo.clear()
        layer.update(new, new)
        layer.awaiting_attention = False  # the attention's part, done by hand below
        pos = torch.full((1, 1), layer.store.length - 1, device="cuda")
        layer.append_codes(new, pos, cache.rope)
        return step_module.decode_attention(layer, query[:, :, 0], new, new, pos, step_module.step_masks(layer, None),
                                           D**-0.5)

    step_s = wall_time(step, 10)
    split: dict = {}
    with phase_timers(split):
        reps = 5
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
        serial = (time.perf_counter() - t) / reps
    split = {k: round(v / reps * 1e3, 3) for k, v in split.items()}
    host_ops = None
    if profile:  # where the host time of a step goes, by PyTorch operation
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        table = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
        host_ops = {e.key: [e.count // 5, round(e.self_cpu_time_total / 5 / 1e3, 3)] for e in table}
        print("host ms per step by op (calls, self ms):", json.dumps(host_ops, indent=0), flush=True)
    split["transfers, bookkeeping"] = round(serial * 1e3 - sum(split.values()), 3)

    keys = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    full = cuda_time(lambda: F.scaled_dot_product_attention(query, keys, keys, enable_gqa=True), 20)
    host = keys.cpu().pin_memory()
    staging = torch.empty_like(keys)

    def offloaded():  # the layer's K and V come over PCIe, then sdpa
        staging.copy_(host, non_blocking=True)
        staging.copy_(host, non_blocking=True)
        return F.scaled_dot_product_attention(query, staging, staging, enable_gqa=True)

    off = cuda_time(offloaded, 5)
    return {"n": n, "batch": b, "scoring": scoring, "offload": offload, "a2ats_ms": round(step_s * 1e3, 3),
            "serial_ms": round(serial * 1e3, 3),
            "overlap_ms": round((serial - step_s) * 1e3, 3), "split_ms": split,
            "gpu_sdpa_ms": round(full * 1e3, 3), "offloaded_ms": round(off * 1e3, 3), "host_ops": host_ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    parser.add_argument("--parts", default="topk,cpu,attention,keep,rerank,decode",
                        help="comma-separated subset of topk,cpu,attention,keep,rerank,decode")
    parser.add_argument("--scoring", default="wrope", help="comma-separated scorers for the decode step")
    parser.add_argument("--offload", default="cpu", help="comma-separated offload modes for the decode step (cpu,none)")
    parser.add_argument("--profile", action="store_true", help="profile the host side of the first decode step")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="the CPU attention also with these thread counts (latency- or bandwidth-bound?)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=["random"],
                        help="the CPU attention's row patterns: random (as decoding), near (random within 4 MB of "
                             "each (row, KV head): few TLB misses), consecutive (no page walks)")
    parser.add_argument("--pinned", action="store_true", help="the CPU attention's store pinned, as decoding pins it")
    parser.add_argument("--stores", type=int, default=1,
                        help="the CPU attention over this many stores in turn, one a call, as a step's layers")
    parser.add_argument("--pause", type=float, nargs="+", default=[0.0], metavar="MS",
                        help="the CPU attention timed after the host idled this long, as between a step's layers")
    parser.add_argument("--lengths", type=int, nargs="+", help="N of the top-K and CPU attention (default: by --quick)")
    parser.add_argument("--batches", type=int, nargs="+", help="their batch sizes (default: by --quick)")
    parser.add_argument("--out", type=Path, help="default: bench/results/kernels/<date>-<commit>-<gpu>.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"cpu"} and not torch.cuda.is_available():
        parser.error(f"--parts {','.join(sorted(parts - {'cpu'}))} need a GPU; --parts cpu runs anywhere")
    torch.manual_seed(0)
    cpu_attention.extension()  # build once, outside the timings
    bw = bandwidths()
    print(bw, flush=True)
    lengths = args.lengths or ([32768] if args.quick else [32768, 131072, 524288])
    batches = args.batches or ([1, 4] if args.quick else [1, 4, 16])
    results = {"environment": environment(), "quick": args.quick, "bandwidth": bw, "topk": [], "cpu_attention": [],
               "device_attention": [], "keep": [], "rerank": [], "decode_layer": []}
    for n in lengths if "topk" in parts else []:
        for b in batches:
            results["topk"].append(bench_topk(n, b, bw["hbm_gbs"]))
            print(results["topk"][-1], flush=True)
    for n in lengths if "cpu" in parts else []:
        for b in batches:
            for rows in args.rows:
                for threads, pause in [(None, 0.0), *((t, 0.0) for t in args.threads or []),
                                       *((None, p) for p in args.pause if p)]:
                    baselines = threads is None and not pause and rows == "random" and n * b <= 131072 * 4
                    results["cpu_attention"].append(bench_cpu_attention(n, b, bw["cpu_copy_gbs"], baselines,
                                                                        threads, rows, args.pinned,
                                                                        args.stores, pause))
                    print(results["cpu_attention"][-1], flush=True)
    for n in ([32768] if args.quick else [32768, 131072]) if "attention" in parts else []:
        for b in [1, 7]:
            for share in [0.03, 0.12]:  # the per-KV-head rule's 3%, and a per-query-head union of 4 heads' 3%
                results["device_attention"].append(
                    bench_device_attention(n, b, int(share * n), bw["hbm_gbs"]))
                print(results["device_attention"][-1], flush=True)
    for n in lengths if "keep" in parts else []:
        for b in batches if 2 * int(0.03 * n) <= triton_topk.KEEP_TABLE else []:  # in one program's registers
            results["keep"].append(bench_keep(n, b))
            print(results["keep"][-1], flush=True)
    for n in lengths if "rerank" in parts else []:
        for b, rule, crowded in itertools.product(batches, RERANK, (False, True)):
            results["rerank"].append(bench_rerank(n, b, rule, crowded))
            print(results["rerank"][-1], flush=True)
    for n in ([32768] if args.quick else [32768, 131072]) if "decode" in parts else []:
        for b in [1, 4]:
            for scoring in args.scoring.split(","):
                for offload in args.offload.split(","):
                    results["decode_layer"].append(decode_layer(
                        n, b, profile=args.profile and not results["decode_layer"], scoring=scoring, offload=offload))
                    print(results["decode_layer"][-1], flush=True)
    out = args.out or results_path("kernels")
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}\n")
    for part, columns in (("keep", KEEP), ("rerank", RERANK_STEP), ("topk", TOPK), ("cpu_attention", CPU_ATTENTION),
                          ("device_attention", DEVICE_ATTENTION), ("decode_layer", DECODE_LAYER)):
        if results[part]:
            print(f"{part}:\n{table(results[part], columns)}\n")


if __name__ == "__main__":
    main()
