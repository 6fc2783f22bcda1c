"""Reference kernels against brute-force loops: top-K selection, re-ranking's keep, attention with LSE, sparse
attention, merge."""

from __future__ import annotations

import math

import pytest
import torch

from a2ats_hf import kernels
from a2ats_hf.kernels import reference
from a2ats_hf.store import KVStore


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_select(lut, codes, candidates, k, budget):
    """Python loops: per head, the top-k candidates by score (ties -> lower index), united per KV head."""
    b, hq, _ = lut.shape
    hkv, n = codes.shape[1:]
    group = hq // hkv
    sets = [[set() for _ in range(hkv)] for _ in range(b)]
    for row in range(b):
        for kv in range(hkv):
            heads = [lut[row, kv * group + g] for g in range(group)]
            tables = [sum(heads)] if budget == "kv_head" else heads
            for table in tables:
                cand = [j for j in range(n) if candidates[row, j]]
                cand.sort(key=lambda j: (-table[codes[row, kv, j]].item(), j))
                sets[row][kv] |= set(cand[: int(k[row])])
    return sets


@pytest.mark.parametrize("budget", ["query_head", "kv_head"])
@pytest.mark.parametrize("centroids", [3, 50])  # 3 centroids: many ties
def test_select_topk_matches_brute_force(budget, centroids):
    """Same selected sets, ascending indices, zero padding and counts as the brute-force reference."""
    b, hq, hkv, n = 3, 6, 2, 67
    lut = torch.randn(b, hq, centroids, generator=gen(0))
    codes = torch.randint(0, centroids, (b, hkv, n), generator=gen(1)).to(torch.uint16)
    candidates = torch.rand(b, n, generator=gen(2)) > 0.3
    k = torch.stack([torch.tensor(0), candidates[1].sum(), torch.tensor(5)])
    indices, counts = kernels.select_topk(lut, codes, candidates, k, budget)
    expected = brute_select(lut, codes.long(), candidates, k, budget)
    for row in range(b):
        for kv in range(hkv):
            count = int(counts[row, kv])
            got = indices[row, kv, :count].tolist()
            assert got == sorted(expected[row][kv]), (row, kv)
            assert (indices[row, kv, count:] == 0).all()


def test_select_topk_rejects_unknown_budget():
    with pytest.raises(ValueError, match="budget"):
        kernels.select_topk(torch.zeros(1, 2, 3), torch.zeros(1, 1, 4, dtype=torch.long), torch.ones(1, 4, dtype=bool),
                            torch.tensor([1]), "layer")


def test_select_topk_keyed_by_top_bits_ties_what_they_cannot_tell_apart():
    """With ``key_bits=16`` scores equal in their top 16 bits (bfloat16's precision, rounded down) tie, and ties go
    to the lower token index; with 32 the larger float wins. Other widths are refused by name."""
    lut = torch.tensor([[[1.0, 1.0 + 2**-10, 0.5]]])  # 1 + 2**-10 rounds down to 1 in bfloat16
    codes = torch.tensor([[[0, 1, 2]]])
    candidates, k = torch.ones(1, 3, dtype=torch.bool), torch.tensor([1])
    assert kernels.select_topk(lut, codes, candidates, k, key_bits=16)[0].flatten().tolist() == [0]
    assert kernels.select_topk(lut, codes, candidates, k)[0].flatten().tolist() == [1]
    assert kernels.select_topk(-lut, codes, candidates, k, key_bits=16)[0].flatten().tolist() == [2]
    with pytest.raises(ValueError, match="key_bits"):
        kernels.select_topk(lut, codes, candidates, k, key_bits=12)


def dense_reference(query, keys, values, valid, scaling):
    b, hq, d = query.shape
    hkv = keys.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq), -math.inf, dtype=torch.float64)
    for row in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            mask = valid[row, kv]
            if mask.any():
                s = (keys[row, kv][mask].double() @ query[row, h].double()) * scaling
                lse[row, h] = torch.logsumexp(s, 0)
                out[row, h] = torch.softmax(s, 0) @ values[row, kv][mask].double()
    return out, lse


def test_attention_with_lse_matches_dense_softmax():
    """Output and log-sum-exp equal a float64 loop, including a row with no valid key (lse -inf, output 0)."""
    q = torch.randn(2, 9, 24, generator=gen(3))
    k, v = torch.randn(2, 3, 31, 24, generator=gen(4)), torch.randn(2, 3, 31, 24, generator=gen(5))
    valid = torch.rand(2, 3, 31, generator=gen(6)) > 0.4
    valid[1, 2] = False
    out, lse = kernels.attention_with_lse(q, k, v, valid, 0.2)
    ref_out, ref_lse = dense_reference(q, k, v, valid, 0.2)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_sparse_attention_over_the_store_and_merge():
    """Sparse attention over store rows, merged with the rest by LSE, equals attention over everything."""
    b, hq, hkv, n, d = 2, 4, 2, 23, 16
    keys, values = torch.randn(b, hkv, n, d, generator=gen(7)), torch.randn(b, hkv, n, d, generator=gen(8))
    store = KVStore(b, hkv, d, torch.float32, block_size=6)
    store.append(keys, values)
    q = torch.randn(b, hq, d, generator=gen(9))
    chosen = torch.rand(b, hkv, n, generator=gen(10)) > 0.5
    chosen[0, 1] = False  # one head retrieves nothing
    counts = chosen.sum(-1)
    indices = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., : int(counts.max())]
    far_out, far_lse = kernels.sparse_attention(q, store, indices, counts, 0.25)
    ref_out, ref_lse = dense_reference(q, keys, values, chosen, 0.25)
    torch.testing.assert_close(far_out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(far_lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    near_out, near_lse = kernels.attention_with_lse(q, keys, values, ~chosen, 0.25)
    merged = kernels.merge_attention(near_out, near_lse, far_out, far_lse)
    full_out, _ = dense_reference(q, keys, values, torch.ones_like(chosen), 0.25)
    torch.testing.assert_close(merged.double(), full_out, atol=1e-5, rtol=1e-5)


def test_backend_is_chosen_once_per_device_kind():
    """A CPU tensor gets the torch references (the same object every time); a GPU with Triton the Triton kernels,
    field for field."""
    from dataclasses import fields

    from a2ats_hf.kernels import TORCH, backend, reference

    assert backend(torch.device("cpu")) is TORCH
    assert all(getattr(TORCH, f.name) is getattr(reference, f.name) for f in fields(TORCH))
    if torch.cuda.is_available() and kernels.HAS_TRITON:
        gpu = backend(torch.device("cuda"))
        assert gpu is backend(torch.device("cuda")) and gpu is not TORCH
        assert all(getattr(gpu, f.name).__module__.startswith("a2ats_hf.kernels.triton_") for f in fields(gpu))


def test_watchers_see_every_kernel_call_by_name():
    """Inside ``kernels.watching``, each kernel call runs in the watcher's context, named (how the benchmarks time
    a step's phases); outside it, nothing is watched."""
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def watcher(name):
        seen.append(name)
        yield

    out_a, out_b = torch.randn(2, 2, 3, 8, generator=gen(0))
    lse_a, lse_b = torch.randn(2, 2, 3, generator=gen(1))
    with kernels.watching(watcher):
        kernels.merge_attention(out_a, lse_a, out_b, lse_b)
    kernels.merge_attention(out_a, lse_a, out_b, lse_b)
    assert seen == ["merge_attention"]


def test_select_topk_keeps_only_after_exact_scores():
    """A keep without exact scores has nothing to rank: a clear error, not a keep of the LUT's order."""
    lut, codes = torch.randn(1, 2, 8), torch.randint(0, 8, (1, 2, 20))
    with pytest.raises(ValueError, match="keep needs exact scores"):
        kernels.select_topk(lut, codes, torch.ones(1, 20, dtype=torch.bool), torch.tensor([4]),
                            keep=kernels.Keep(torch.tensor([2]), 2))


@pytest.mark.parametrize("budget", ["query_head", "kv_head"])
def test_keep_top_keeps_the_exact_top_k_of_the_candidates(budget):
    """Re-ranking's keep of candidates scored exactly, against a loop over rows and heads: each query head's top k
    of its KV head's candidates by q . k, united over the group (or one top k of the group's summed scores),
    ascending, padded with 0; awkward sizes, rows with fewer candidates than k, and garbage in the padding of the
    indices and the scores (the select leaves the scores past each count unwritten)."""
    torch.manual_seed(0)
    b, hkv, group, d, n, c = 3, 2, 3, 24, 97, 41
    query, keys = torch.randn(b, hkv * group, d), torch.randn(b, hkv, n, d)
    counts = torch.tensor([[41, 30], [7, 0], [25, 41]])
    indices = torch.stack([torch.stack([torch.randperm(n)[:c].sort().values for _ in range(hkv)]) for _ in range(b)])
    indices = torch.where(torch.arange(c) < counts[..., None], indices, 10**6)  # padding out of range
    k = torch.tensor([5, 9, 12])
    table_query = query.view(b, hkv, group, d).sum(2) if budget == "kv_head" else query
    scores = reference.candidate_scores(table_query, keys, indices, counts)
    scores = scores.masked_fill(scores.isinf(), 1e30)  # past the counts: not to be read
    got, got_counts = kernels.keep_top(indices, counts, scores, k, 12, budget)
    for row in range(b):
        for h in range(hkv):
            tokens = indices[row, h, : counts[row, h]]
            scores = query[row, h * group : (h + 1) * group] @ keys[row, h, tokens].T  # [G, count]
            if budget == "kv_head":
                scores = scores.sum(0, keepdim=True)
            keep = min(int(k[row]), len(tokens))
            chosen = sorted({int(tokens[j]) for head in scores for j in head.topk(keep).indices})
            assert got_counts[row, h] == len(chosen)
            assert got[row, h, : len(chosen)].tolist() == chosen and not got[row, h, len(chosen):].any()
