"""transformers' own cache and generation tests, ported to tiny seeded Llamas and run against A2ATSCache.

Upstream: huggingface/transformers v5.24.0, tests/utils/test_cache_utils.py (test_dynamic_cache of the synthetic
tests, test_cache_batched, test_cache_beam_search, test_cache_extra_left_padding, test_cache_copy,
test_dynamic_cache_hard) and the cache-related parts of tests/generation/test_utils.py (GenerationTesterMixin:
test_greedy_generate_dict_outputs_use_cache, test_beam_search_generate_dict_outputs_use_cache,
test_assisted_decoding_matches_greedy_search, test_prompt_lookup_decoding_matches_greedy_search,
test_generate_continue_from_past_key_values, test_past_key_values_format / _check_past_key_values_for_generate), and
the Cache API they rely on (reorder_cache, crop, batch_repeat_interleave, batch_select_indices, layers' keys/values,
deepcopy, reset). The 5.24.0 sdist ships no tests/utils or tests/generation, so the tests are reconstructed from
upstream's (their names and what they assert), with hub checkpoints and tokenizers replaced by the seeded tiny Llama
of conftest and random token ids.

Every test is parametrized over the cache kinds: DynamicCache (the reference: sdpa, the same seeded weights), and
A2ATSCache at topk=1.0 (every far token retrieved: the same tokens as DynamicCache, and the same layer keys/values)
and topk=0.03 (a lossy retrieval: the contract is shapes, lengths and running without error, plus what holds for any
deterministic cache, e.g. a copy continues like its original), each with offload "cpu", "none" (dense_below=0, so the
device store retrieves instead of attending whole) and "auto" (a device budget that holds the first layer's prompt
only: the first layer on the device, the second in CPU memory). Prompts (40-64 tokens) are longer than the
codebooks' sink + window (4 + 16), so decoding retrieves far tokens.

The oldest supported transformers (5.4) differs from the newest in ways these tests follow: the cache argument's
name (``cache_argument``), ``crop(n)`` with n >= 0 (5.4 keeps the first n tokens; newer releases refuse n > 0 and
read 0 as nothing to remove; A2ATSCache takes n > 0 as a length under both), ``DynamicCache.reset()`` (5.4 zeroes
the keys but keeps the length) and ``Cache.is_croppable`` (newer releases only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from a2ats_hf import A2ATSCache, cache_argument
from a2ats_hf.store import DeviceKVStore, KVStore, kv_bytes

from conftest import DEVICE, ids_of, tiny_model

HEADS, HEAD_DIM, LAYERS = 2, 16, 2  # the tiny Llama's KV heads, head dim and layers
def legacy_crop() -> bool:
    """Whether this transformers' DynamicLayer.crop(n > 0) keeps the first n tokens (5.4, and deprecated up to 5.17)
    rather than refusing it (newer)."""
    layer = DynamicLayer()
    layer.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    try:
        layer.crop(2)
    except ValueError:
        return False
    return layer.get_seq_length() == 2


LEGACY_CROP = legacy_crop()
# 5.4's DynamicLayer.reset zeroes its keys in place (CacheLayerMixin's, meant for static layers), so a reset
# DynamicCache keeps its length and cannot be reused; newer releases drop them
DYNAMIC_RESET_EMPTIES = "reset" in DynamicLayer.__dict__
DYNAMIC_RESET_KEEPS = "transformers 5.4's DynamicCache.reset() zeroes its keys but keeps its length (fixed later)"


@dataclass(frozen=True)
class Kind:
    """A cache to test: DynamicCache (``topk`` None) or A2ATSCache at ``topk`` with ``offload`` (``gpu_reads``: the
    device attends the offloaded rows itself, misses of a row cache read from the pinned store)."""

    topk: float | None = None
    offload: str | None = None
    gpu_reads: bool = False

    @property
    def a2ats(self) -> bool:
        return self.topk is not None

    @property
    def exact(self) -> bool:
        """Whether the cache must give DynamicCache's tokens and keys/values (every far token retrieved)."""
        return self.topk is None or self.topk == 1.0

    def __str__(self) -> str:
        return ("dynamic" if self.topk is None
                else f"a2ats-{self.topk}-{self.offload}" + ("-gpu-reads" if self.gpu_reads else ""))


DYNAMIC = Kind()
KINDS = [DYNAMIC] + [Kind(topk, offload) for topk in (1.0, 0.03) for offload in ("cpu", "none", "auto")] + [
    Kind(topk, "cpu", gpu_reads=True) for topk in (1.0, 0.03)]
kinds = pytest.mark.parametrize("kind", KINDS, ids=str)
NOT_EXACT = "exact equality with DynamicCache is not part of topk=0.03's contract (a lossy retrieval)"


class Runner:
    """A kind's model (the "a2ats" tiny Llama for A2ATSCache, the same weights with sdpa for DynamicCache) and its
    caches."""

    def __init__(self, kind: Kind, models: dict):
        self.kind, self.books = kind, models["books"]
        self.model = models["a2ats"] if kind.a2ats else models["sdpa"]

    def cache(self, batch: int = 1, tokens: int = 64) -> Cache:
        """A new empty cache; ``batch`` x ``tokens`` is the first forward's size (offload="auto" gets room for the
        first layer's K/V of it, so the second layer goes to CPU memory)."""
        kind = self.kind
        if not kind.a2ats:
            return DynamicCache(config=self.model.config)
        # Windowed RoPE: the tiny model's codebooks hold near-duplicate centroids, so a key's code can flip with
        # batch-size-dependent rounding (a repeated batch against one refilled at its size), and the distance
        # scorer's finer tables turn such a flip into another selection; its state under row edits is tested in
        # test_scoring.py, at one batch size.
        options = dict(topk=kind.topk, offload=kind.offload, dense_below=0, scoring="wrope")
        if kind.offload == "auto":
            options["gpu_kv_budget"] = kv_bytes(batch, HEADS, HEAD_DIM, torch.float32, tokens, 1)
        if kind.gpu_reads:  # (a store grown past max_length goes back to the CPU attention)
            options.update(gpu_share=1, row_cache=2, max_length=max(256, tokens))
        return A2ATSCache(self.books, **options)

    def cache_for(self, ids: torch.Tensor, rows: int | None = None) -> Cache:
        return self.cache(rows or ids.shape[0], ids.shape[1])

    def generate(self, ids: torch.Tensor, cache: Cache | None, new: int = 6, **kwargs) -> torch.Tensor:
        args = {} if cache is None else cache_argument(self.model, cache)
        kwargs.setdefault("do_sample", False)
        return self.model.generate(ids, **args, max_new_tokens=new, pad_token_id=0, **kwargs)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: Cache, **kwargs) -> torch.Tensor:
        """Logits [B, T, V] of ``ids`` appended to ``cache``."""
        return self.model(ids, **cache_argument(self.model, cache), use_cache=True, **kwargs).logits

    def teacher_forced(self, cache: Cache, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of decoding ``tokens`` [B, T] one at a time into ``cache``."""
        return torch.cat([self.forward(tokens[:, i : i + 1], cache) for i in range(tokens.shape[1])], dim=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for this module's tiny tensors: on a small shared machine torch's thread pool only contends
    (the same tests take several times longer with it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny):
    return {"a2ats": tiny[0], "books": tiny[1], "sdpa": tiny_model("sdpa")}


@pytest.fixture(scope="module")
def assistants():
    """Assistant models for assisted decoding: the main model's weights ("same": every draft is accepted) and a
    one-layer truncation of them ("other": drafts are partly rejected, so the main cache is cropped)."""
    return {"same": tiny_model("sdpa"), "other": tiny_model("sdpa", num_hidden_layers=1)}


def runners(kind: Kind, models: dict) -> tuple[Runner, Runner]:
    return Runner(kind, models), Runner(DYNAMIC, models)


def layer_kv(cache: Cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s stored keys and values [B, Hkv, N, D], on the CPU (wherever the layer keeps them)."""
    layer = cache.layers[i]
    keys, values = layer.keys, layer.values
    assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor), type(layer).__name__
    return keys.cpu(), values.cpu()


def assert_same_kv(cache: Cache, expected: Cache, exact_columns: int | None = None, close: bool = True) -> None:
    """Every layer's keys/values have ``expected``'s shape; the first ``exact_columns`` (default all) are equal
    bit for bit (what a prompt stored), the rest close (decoded tokens: their keys went through attention, whose
    float rounding differs between kernels) where ``close``."""
    assert len(cache.layers) == len(expected.layers)
    for i in range(len(expected.layers)):
        (keys, values), (ref_keys, ref_values) = layer_kv(cache, i), layer_kv(expected, i)
        assert keys.shape == ref_keys.shape and values.shape == ref_values.shape, (i, keys.shape, ref_keys.shape)
        n = ref_keys.shape[2] if exact_columns is None else exact_columns
        assert torch.equal(keys[:, :, :n], ref_keys[:, :, :n]) and torch.equal(values[:, :, :n], ref_values[:, :, :n])
        if close:
            torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-4)


def assert_kv_shape(cache: Cache, batch: int, length: int) -> None:
    """``_check_past_key_values_for_generate``: each layer holds [batch, KV heads, length, head dim]."""
    assert len(cache) == LAYERS and cache.get_seq_length() == length
    for i in range(LAYERS):
        keys, values = layer_kv(cache, i)
        assert keys.shape == values.shape == (batch, HEADS, length, HEAD_DIM), (i, keys.shape)


def assert_retrieved(cache: Cache, kind: Kind) -> None:
    """Decoding retrieved far tokens: all of them at topk=1.0, a few at topk=0.03."""
    if kind.a2ats:
        stats = cache.stats
        assert stats.far_tokens > 0 and stats.far_selected > 0
        if kind.exact:
            assert stats.far_fraction == pytest.approx(1.0)
        else:
            assert stats.far_fraction < 0.2


def record_edits(cache: Cache) -> list[tuple]:
    """Log the crops ("crop", length before, length after) and reorders ("reorder", beam_idx) generation makes on
    ``cache``, so a test can check it exercised them (instance attributes wrapping the cache's own methods)."""
    log, crop, reorder = [], cache.crop, cache.reorder_cache

    def logged_crop(tokens: int) -> None:
        before = cache.get_seq_length()
        crop(tokens)
        log.append(("crop", before, cache.get_seq_length()))

    def logged_reorder(beam_idx: torch.Tensor) -> None:
        log.append(("reorder", beam_idx.tolist()))
        reorder(beam_idx)

    cache.crop, cache.reorder_cache = logged_crop, logged_reorder
    return log


# --- tests/utils/test_cache_utils.py -----------------------------------------------------------------------------


@kinds
def test_synthetic_updates_are_stored_as_given(kind, models):
    """SyntheticCacheTest.test_dynamic_cache: states written with ``cache.update`` (a prefill of 2, then 1 and 1)
    read back from every layer in order, with the sequence length and mask sizes they imply.

    A2ATSCache diverges by design: its layers need the "a2ats" attention to read each update (it encodes the keys'
    codes and fills sinks), so a second update the attention never read is refused with an error naming
    attn_implementation (what a model not loaded with "a2ats" would do). The states of the first read back."""
    cache = Runner(kind, models).cache(1, 2)

    def states(values: list[float], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor(values, device=DEVICE)[None, None, :, None] + 10 * layer
        t = t.expand(1, HEADS, -1, HEAD_DIM).contiguous()
        return t, -t

    chunks = ([1.0, 2.0], [3.0], [4.0])
    if kind.a2ats:
        chunks = chunks[:1]
    for layer in range(LAYERS):
        for chunk in chunks:
            cache.update(*states(chunk, layer), layer)
    n = sum(map(len, chunks))
    for layer in range(LAYERS):
        keys, values = layer_kv(cache, layer)
        assert keys[0, 0, :, 0].tolist() == [i + 1.0 + 10 * layer for i in range(n)]
        assert torch.equal(values, -keys) and keys.shape == (1, HEADS, n, HEAD_DIM)
        assert cache.get_seq_length(layer) == n and cache.get_mask_sizes(1, layer) == (n + 1, 0)
    if kind.a2ats:
        with pytest.raises(RuntimeError, match="attn_implementation"):
            cache.update(*states(chunks[0], 0), 0)


@kinds
def test_greedy_generation_matches_dynamic_cache(kind, models):
    """test_dynamic_cache_hard / test_greedy_generate_dict_outputs_use_cache: greedy tokens with the cache are
    DynamicCache's (and, for the reference, those of generating without a cache); decoding retrieves far tokens."""
    run, ref = runners(kind, models)
    ids = ids_of(1, 60, seed=1)
    cache = run.cache_for(ids)
    out = run.generate(ids, cache, new=8)
    expected = ref.generate(ids, ref.cache_for(ids), new=8)
    assert out.shape == expected.shape and torch.equal(out[:, :60], ids)
    assert cache.get_seq_length() == out.shape[1] - 1
    assert_retrieved(cache, kind)
    if kind.exact:
        assert torch.equal(out, expected)
    if kind == DYNAMIC:
        assert torch.equal(ref.generate(ids, None, new=8, use_cache=False), expected)
    if kind.offload == "auto":  # the budget held the first layer's prompt only
        assert [type(layer.store) for layer in cache.layers] == [DeviceKVStore, KVStore]


@kinds
def test_cache_batched_with_left_padding(kind, models):
    """test_cache_batched / test_past_key_values_format: a left-padded batch of two prompts generates DynamicCache's
    tokens, each layer holding [batch, KV heads, length - 1, head dim]; the padded row generates what it generates
    alone (exact kinds)."""
    run, ref = runners(kind, models)
    ids = ids_of(2, 56, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :12], mask[1, :12] = 0, 0
    cache = run.cache_for(ids)
    out = run.generate(ids, cache, new=6, attention_mask=mask)
    assert out.shape == (2, 62)
    assert_kv_shape(cache, 2, 61)
    assert_retrieved(cache, kind)
    if kind.exact:
        dyn = ref.cache_for(ids)
        assert torch.equal(out, ref.generate(ids, dyn, new=6, attention_mask=mask))
        assert_same_kv(cache, dyn, exact_columns=56)
        alone = run.generate(ids[1:, 12:], run.cache_for(ids[1:, 12:]), new=6)
        assert torch.equal(out[1:, 12:], alone)


@kinds
def test_cache_extra_left_padding(kind, models):
    """test_cache_extra_left_padding: more left padding generates the same tokens."""
    if not kind.exact:
        pytest.skip(NOT_EXACT)
    run, _ = runners(kind, models)
    ids = ids_of(2, 50, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :8], mask[1, :8] = 0, 0
    out = run.generate(ids, run.cache_for(ids), new=6, attention_mask=mask)
    padded = torch.cat([torch.zeros(2, 7, dtype=ids.dtype, device=DEVICE), ids], dim=1)
    padded_mask = torch.cat([torch.zeros_like(mask[:, :7]), mask], dim=1)
    out_padded = run.generate(padded, run.cache_for(padded), new=6, attention_mask=padded_mask)
    assert torch.equal(out_padded[:, 7:], out)


@kinds
def test_cache_beam_search(kind, models):
    """test_cache_beam_search / test_beam_search_generate_dict_outputs_use_cache: ``num_beams=3`` (the cache holds
    batch x beams rows, reordered by ``reorder_cache`` every step) gives DynamicCache's beams at topk=1.0."""
    run, ref = runners(kind, models)
    ids = ids_of(2, 48, seed=4)
    cache = run.cache_for(ids, rows=6)
    edits = record_edits(cache)
    out = run.generate(ids, cache, new=5, num_beams=3)
    assert any(op == "reorder" and idx != list(range(6)) for op, idx in edits)  # beams did move
    assert out.shape[0] == 2 and torch.equal(out[:, :48], ids)
    assert_kv_shape(cache, 6, cache.get_seq_length())
    assert cache.get_seq_length() == out.shape[1] - 1
    assert_retrieved(cache, kind)
    if kind.exact:
        dyn = ref.cache_for(ids, rows=6)
        assert torch.equal(out, ref.generate(ids, dyn, new=5, num_beams=3))
        assert_same_kv(cache, dyn, exact_columns=48)
    beams = run.generate(ids, run.cache_for(ids, rows=6), new=5, num_beams=3, num_return_sequences=3)
    assert beams.shape[0] == 6 and torch.equal(beams[::3], out)


def check_rows_op(kind: Kind, models: dict, op, rows: torch.Tensor, batch: int = 3) -> None:
    """A batch operation of the Cache API (``op(cache)``) keeps rows ``rows`` of a filled cache (a prompt, then three
    decoded tokens): its layer keys/values are DynamicCache's after the same operation, and decoding on from it is
    decoding on from a cache filled with those rows to begin with (for any kind: the operation moves every row's
    state, codes, sinks and window with it)."""
    run, ref = runners(kind, models)
    ids, first, then = ids_of(batch, 44, seed=5), ids_of(batch, 3, seed=6), ids_of(len(rows), 3, seed=7)
    rows = rows.to(DEVICE)
    cache, dyn = run.cache_for(ids), ref.cache_for(ids)
    for r, c in ((run, cache), (ref, dyn)):
        r.forward(ids, c)
        r.teacher_forced(c, first)
        op(c)
    assert_kv_shape(cache, len(rows), 47)
    assert_same_kv(cache, dyn, exact_columns=44, close=kind.exact)
    logits = run.teacher_forced(cache, then)
    refilled = run.cache_for(ids[rows])
    run.forward(ids[rows], refilled)
    run.teacher_forced(refilled, first[rows])
    # a GPU's matmuls may round a batch of 6 unlike one of 3 (another kernel): there the refilled cache is only close
    same_rounding = DEVICE.type == "cpu"
    tolerance = dict(atol=1e-5, rtol=1e-4) if same_rounding else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(logits, run.teacher_forced(refilled, then), **tolerance)
    assert_same_kv(cache, refilled, exact_columns=44 if same_rounding else 0, close=same_rounding)
    if kind.exact:
        torch.testing.assert_close(logits, ref.teacher_forced(dyn, then), atol=1e-4, rtol=1e-4)


@kinds
def test_reorder_cache(kind, models):
    """Cache.reorder_cache(beam_idx), as beam search calls it: rows 2, 0, 0 of three."""
    rows = torch.tensor([2, 0, 0])
    check_rows_op(kind, models, lambda c: c.reorder_cache(rows.to(DEVICE)), rows)


@kinds
def test_batch_repeat_interleave(kind, models):
    """Cache.batch_repeat_interleave(2): every row twice, in place."""
    check_rows_op(kind, models, lambda c: c.batch_repeat_interleave(2), torch.arange(3).repeat_interleave(2))


@kinds
def test_batch_select_indices(kind, models):
    """Cache.batch_select_indices(indices): rows 2 and 0 of three."""
    rows = torch.tensor([2, 0])
    check_rows_op(kind, models, lambda c: c.batch_select_indices(rows.to(DEVICE)), rows)


@kinds
@pytest.mark.parametrize("remove", [3, 17])
def test_crop_negative_then_continue(kind, models, remove):
    """Cache.crop(-n) removes the last n tokens (3; 17: more than the window, so every ring slot is rewritten): the
    length drops by n and generation continues from the cropped cache as DynamicCache cropped the same way does.
    crop(0), which newer transformers' generation calls, removes nothing first (5.4 reads 0 as a length instead)."""
    run, ref = runners(kind, models)
    ids = ids_of(2, 44, seed=8)
    caches, outs = {}, {}
    for r in (run, ref):
        cache = r.cache_for(ids)
        out = r.generate(ids, cache, new=18)
        if not LEGACY_CROP:
            cache.crop(0)
        assert cache.get_seq_length() == 61
        cache.crop(-remove)
        assert_kv_shape(cache, 2, 61 - remove)
        resumed = out[:, : 62 - remove]  # the cache holds all but its last token
        outs[r] = r.generate(resumed, cache, new=4)
        assert outs[r].shape == (2, 66 - remove) and torch.equal(outs[r][:, : 62 - remove], resumed)
        caches[r] = cache, out
    if kind.exact:
        assert torch.equal(caches[run][1], caches[ref][1])
        assert torch.equal(outs[run], outs[ref])
        assert_same_kv(caches[run][0], caches[ref][0], exact_columns=44)


@kinds
def test_crop_to_a_length(kind, models):
    """Cache.crop(n) with n > 0 keeps the first n tokens, the legacy ``max_length`` form that transformers 5.4's
    DynamicCache takes (and its assisted decoding passes); newer transformers' DynamicCache refuses it with
    ValueError, and there the reference crops by the equivalent negative count. Continuing generation then gives
    DynamicCache's tokens; n at or above the length changes nothing."""
    run, ref = runners(kind, models)
    ids = ids_of(1, 48, seed=9)
    cache, dyn = run.cache_for(ids), ref.cache_for(ids)
    out = run.generate(ids, cache, new=6)
    ref.generate(ids, dyn, new=6)

    def crop_dynamic(c: DynamicCache) -> None:
        if LEGACY_CROP:
            c.crop(50)
        else:
            with pytest.raises(ValueError):
                c.crop(50)
            c.crop(50 - c.get_seq_length())

    crop_dynamic(dyn)
    if kind.a2ats:
        cache.crop(53)  # its length: nothing to do
        assert cache.get_seq_length() == 53
        cache.crop(50)
    else:
        crop_dynamic(cache)
    assert cache.get_seq_length() == dyn.get_seq_length() == 50
    assert_kv_shape(cache, 1, 50)
    resumed = run.generate(out[:, :51], cache, new=4)
    assert resumed.shape == (1, 55)
    if kind.exact:
        assert torch.equal(resumed, ref.generate(out[:, :51], dyn, new=4))


@kinds
def test_layers_expose_keys_and_values(kind, models):
    """``cache.layers[i].keys`` / ``.values`` are tensors [B, Hkv, N, D] like transformers' layers: a prompt's are
    DynamicCache's bit for bit (for every kind: prefill attends exactly), decoded tokens' close at topk=1.0."""
    run, ref = runners(kind, models)
    ids = ids_of(2, 40, seed=10)
    cache, dyn = run.cache_for(ids), ref.cache_for(ids)
    run.forward(ids, cache)
    ref.forward(ids, dyn)
    assert_kv_shape(cache, 2, 40)
    assert_same_kv(cache, dyn)
    steps = ids_of(2, 4, seed=11)
    run.teacher_forced(cache, steps)
    ref.teacher_forced(dyn, steps)
    assert_kv_shape(cache, 2, 44)
    assert_same_kv(cache, dyn, exact_columns=40, close=kind.exact)


@kinds
def test_deepcopy_of_an_unused_cache(kind, models):
    """copy.deepcopy of a fresh cache is a fresh cache of its own: generating with it leaves the original empty,
    which then generates the same tokens."""
    run, _ = runners(kind, models)
    ids = ids_of(1, 50, seed=12)
    cache = run.cache_for(ids)
    clone = copy.deepcopy(cache)
    out = run.generate(ids, clone, new=5)
    assert cache.get_seq_length() == 0 and clone.get_seq_length() == 54
    assert torch.equal(run.generate(ids, cache, new=5), out)


@kinds
def test_deepcopy_of_a_used_cache_continues_like_the_original(kind, models):
    """copy.deepcopy of a filled cache: continuing generation on the copy gives the tokens continuing on the original
    gives, and neither touches the other's state."""
    run, ref = runners(kind, models)
    ids = ids_of(2, 52, seed=13)
    cache = run.cache_for(ids)
    out = run.generate(ids, cache, new=5)
    clone = copy.deepcopy(cache)
    more = torch.cat([out, ids_of(2, 3, seed=14)], dim=1)
    from_copy = run.generate(more, clone, new=5)
    assert cache.get_seq_length() == 56 and clone.get_seq_length() == 64
    from_original = run.generate(more, cache, new=5)
    assert torch.equal(from_copy, from_original)
    assert_same_kv(clone, cache)
    if kind.exact:
        dyn = ref.cache_for(ids)
        ref.generate(ids, dyn, new=5)
        assert torch.equal(from_copy, ref.generate(more, copy.deepcopy(dyn), new=5))


@kinds
def test_deepcopy_then_reset(kind, models):
    """A copy reset to empty serves a new prompt like a new cache, and the original, untouched, continues as an
    untouched copy of it does."""
    if kind == DYNAMIC and not DYNAMIC_RESET_EMPTIES:
        pytest.skip(DYNAMIC_RESET_KEEPS)
    run, _ = runners(kind, models)
    ids, other = ids_of(1, 52, seed=15), ids_of(1, 52, seed=16)
    cache = run.cache_for(ids)
    out = run.generate(ids, cache, new=4)
    keep, clone = copy.deepcopy(cache), copy.deepcopy(cache)
    clone.reset()
    assert clone.get_seq_length() == 0 and cache.get_seq_length() == 55
    assert torch.equal(run.generate(other, clone, new=4), run.generate(other, run.cache_for(other), new=4))
    assert torch.equal(run.generate(out, cache, new=4), run.generate(out, keep, new=4))


@kinds
def test_prompt_cache_copied_per_request(kind, models):
    """test_cache_copy: a cache filled with a shared prefix, deep-copied for each of two requests that extend it,
    generates DynamicCache's tokens, and the prefix cache stays as it was."""
    run, ref = runners(kind, models)
    prefix = ids_of(1, 40, seed=17)
    suffixes = [ids_of(1, 6, seed=18), ids_of(1, 9, seed=19)]
    prompt_caches = {}
    for r in (run, ref):
        prompt_caches[r] = r.cache_for(prefix)
        r.forward(prefix, prompt_caches[r])
    for suffix in suffixes:
        ids = torch.cat([prefix, suffix], dim=1)
        cache = copy.deepcopy(prompt_caches[run])
        out = run.generate(ids, cache, new=5)
        assert out.shape == (1, ids.shape[1] + 5) and cache.get_seq_length() == ids.shape[1] + 4
        if kind.exact:
            assert torch.equal(out, ref.generate(ids, copy.deepcopy(prompt_caches[ref]), new=5))
    assert prompt_caches[run].get_seq_length() == 40
    assert_same_kv(prompt_caches[run], prompt_caches[ref])


@kinds
def test_cache_api(kind, models):
    """get_seq_length, get_mask_sizes, the maximum length (none), is_compileable (False: nothing static),
    is_croppable (newer transformers), len(cache) (the layers), and reset then reuse."""
    run, _ = runners(kind, models)
    ids = ids_of(1, 50, seed=20)
    cache = run.cache_for(ids)
    assert len(cache) == LAYERS and cache.get_seq_length() == 0 and cache.is_compileable is False
    assert cache.get_mask_sizes(7, 0) == (7, 0)
    first = run.generate(ids, cache, new=5)
    assert len(cache) == LAYERS and cache.get_seq_length() == 54
    for layer in range(LAYERS):
        assert cache.get_seq_length(layer) == 54 and cache.get_mask_sizes(1, layer) == (55, 0)
        assert cache.get_mask_sizes(3, layer) == (57, 0)
    max_length = getattr(cache, "get_max_length", None) or cache.get_max_cache_shape
    assert max_length() == -1
    assert cache.is_compileable is False
    if hasattr(Cache, "is_croppable"):
        assert cache.is_croppable is True
    if kind == DYNAMIC and not DYNAMIC_RESET_EMPTIES:
        pytest.skip(f"reset and reuse: {DYNAMIC_RESET_KEEPS}")
    cache.reset()
    assert cache.get_seq_length() == 0 and len(cache) == LAYERS
    assert torch.equal(run.generate(ids, cache, new=5), first)


# --- tests/generation/test_utils.py ------------------------------------------------------------------------------


@kinds
def test_generate_continue_from_past_key_values(kind, models):
    """test_generate_continue_from_past_key_values: generating 3 tokens, then 3 more from the returned sequences
    with the same cache, gives the 6 tokens of one call (the same decode steps, for any kind)."""
    run, _ = runners(kind, models)
    ids = ids_of(2, 48, seed=21)
    whole = run.generate(ids, run.cache_for(ids), new=6)
    cache = run.cache_for(ids)
    part = run.generate(ids, cache, new=3)
    assert cache.get_seq_length() == 50
    rest = run.generate(part, cache, new=3)
    assert torch.equal(rest, whole) and cache.get_seq_length() == 53


@kinds
@pytest.mark.parametrize("assistant", ["same", "other"])
def test_assisted_decoding_matches_greedy_search(kind, models, assistants, assistant):
    """test_assisted_decoding_matches_greedy_search: with an assistant model (drafts of 2 tokens, verified in one
    forward, rejected ones cropped from the cache) greedy decoding gives DynamicCache's plain greedy tokens; the
    cache ends holding all but the last token."""
    run, ref = runners(kind, models)
    helper = assistants[assistant]
    helper.generation_config.num_assistant_tokens = 2
    helper.generation_config.num_assistant_tokens_schedule = "constant"
    ids = ids_of(1, 56, seed=22)
    cache = run.cache_for(ids)
    edits = record_edits(cache)
    out = run.generate(ids, cache, new=8, assistant_model=helper)
    lengths = [after for op, _, after in edits if op == "crop"]
    if assistant == "other":  # some drafts were rejected: their tokens cropped from the cache
        assert any(before > after for op, before, after in edits if op == "crop")
    elif kind.exact:  # drafts were accepted: several tokens verified in one forward
        assert max(b - a for a, b in zip(lengths, lengths[1:])) >= 2
    assert out.shape == (1, 64) and torch.equal(out[:, :56], ids)
    assert cache.get_seq_length() == 63
    assert_kv_shape(cache, 1, 63)
    if kind.exact:
        assert torch.equal(out, ref.generate(ids, ref.cache_for(ids), new=8))


@kinds
def test_prompt_lookup_decoding_matches_greedy_search(kind, models):
    """test_prompt_lookup_decoding_matches_greedy_search: drafts copied from the prompt's n-grams
    (``prompt_lookup_num_tokens=3``; the prompt repeats a phrase, so drafts are proposed) give DynamicCache's greedy
    tokens."""
    run, ref = runners(kind, models)
    phrase = ids_of(1, 8, seed=23)
    ids = torch.cat([ids_of(1, 10, seed=24), phrase.repeat(1, 6)], dim=1)
    cache = run.cache_for(ids)
    edits = record_edits(cache)
    out = run.generate(ids, cache, new=8, prompt_lookup_num_tokens=3)
    assert any(before > after for op, before, after in edits if op == "crop")  # drafts were verified and rejected
    assert out.shape == (1, 66) and cache.get_seq_length() == 65
    assert_kv_shape(cache, 1, 65)
    if kind.exact:
        assert torch.equal(out, ref.generate(ids, ref.cache_for(ids), new=8))


# --- upstream tests that do not apply ----------------------------------------------------------------------------

NOT_APPLICABLE = {
    "test_static_cache_* / test_sliding_window_cache / test_hybrid_cache (StaticCache, static sliding layers)":
        "StaticCache's preallocated layers; A2ATSCache is a dynamic cache (its own layers are tested above)",
    "test_*_exportability / test_generate_compile_model_forward* / test_generate_with_static_cache":
        "torch.export and torch.compile need a compileable (static) cache; A2ATSCache.is_compileable is False",
    "test_quantized_cache_* / test_generate_with_quant_cache":
        "quanto/HQQ QuantizedCache; A2ATSCache keeps its own codes beside full-precision K/V",
    "test_cache_offloading / test_offloaded_cache_equivalent_to_dynamic_cache":
        "transformers' CUDA-stream layer offloading (Cache(offloading=True)); A2ATSCache's own offload modes are "
        "the offload parameter of every test here",
    "test_data_parallel_dynamic_cache":
        "torch.nn.DataParallel over several GPUs rebuilding a DynamicCache from gathered (keys, values)",
    "test_contrastive_generate* / test_dola_decoding_sample":
        "contrastive search moved to Hub custom_generate in transformers 5; the batch operations it used "
        "(batch_repeat_interleave, batch_select_indices) are tested directly above",
}


@pytest.mark.parametrize("upstream", list(NOT_APPLICABLE))
def test_upstream_not_applicable(upstream):
    pytest.skip(NOT_APPLICABLE[upstream])
