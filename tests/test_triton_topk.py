"""The Triton top-K kernel against the torch reference: same selected sets and counts, on random inputs of awkward
sizes (under TRITON_INTERPRET=1 without a GPU) and on real SmolLM2 queries and codes."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from a2ats_hf import A2ATSCache, cache_argument, kernels
from a2ats_hf.kernels import code_histogram, reference, triton_topk

from conftest import DEVICE, compile_for_hopper, ids_of

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"),
    reason="needs a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)",
)
KERNEL_DEVICE = DEVICE if DEVICE.type == "cuda" else torch.device("cpu")


def assert_same_selection(lut, codes, candidates, k, budget, **kwargs):
    expected, expected_counts = reference.select_topk(lut, codes, candidates, k, budget,
                                                      key_bits=kwargs.get("key_bits", 32))
    got, counts = triton_topk.select_topk(lut, codes, candidates, k, budget, **kwargs)
    assert got.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(counts.cpu().long(), expected_counts.cpu().long())
    width = torch.arange(got.shape[-1], device=got.device)
    assert (got.masked_fill(width >= counts[..., None], 0) == got).all(), "entries past the count must be 0"
    for row in range(codes.shape[0]):
        for head in range(codes.shape[1]):
            n = int(counts[row, head])
            assert torch.equal(got[row, head, :n].cpu().long(), expected[row, head, :n].cpu().long()), (row, head)


def count_digits(bits: int, monkeypatch) -> int:
    """Split selects of 16-bit keys count ``bits`` of the key a round: 16 (within COUNT16_BYTES) or 8 (past it).
    Returns the key width for a test of ``bits``: 16, or 32 where 8-bit digits are tested."""
    monkeypatch.setattr(triton_topk, "COUNT16_BYTES", 0 if bits == 8 else 1 << 30)
    return 16 if bits == 16 else 32


@pytest.mark.parametrize("budget", ["query_head", "kv_head"])
@pytest.mark.parametrize(
    "b, hq, hkv, n, m",
    [(3, 6, 2, 67, 3), (2, 9, 3, 700, 50), (1, 4, 4, 130, 1000), (2, 12, 2, 333, 17), (1, 12, 1, 150, 9),
     (1, 2, 1, 9000, 7), (3, 4, 2, 6000, 20000), (2, 4, 1, 3000, 40000)],
    ids=["many-ties", "group3", "mha-big-M", "group6", "group12-bytes", "parts-past-a-look-back", "wide-table",
         "wide-sparse"],
)
def test_matches_reference_on_random_inputs(budget, b, hq, hkv, n, m):
    """Random LUTs (with repeated values), codes and candidate masks; k from 0 to every candidate; several blocks.
    The wide tables (16384 columns and more, as the distance scorer's) take the split select (k = 0 and every
    candidate included)."""
    g = torch.Generator().manual_seed(n + m)
    lut = torch.randn(b, hq, m, generator=g)
    lut[:, :, ::5] = lut[:, :, :1]  # equal scores across centroids
    codes = torch.randint(0, m, (b, hkv, n), generator=g).to(torch.uint16)
    candidates = torch.rand(b, n, generator=g) > 0.3
    k = torch.randint(0, int(candidates.sum(-1).min()) + 1, (b,), generator=g)
    k[0] = candidates[0].sum()
    if b > 1:
        k[1] = 0
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    assert_same_selection(to(lut), to(codes), to(candidates), to(k), budget, block_n=64)


@pytest.mark.parametrize("key_bits,digit_bits", [(8, 8), (16, 16), (16, 8), (24, 8)])
@pytest.mark.parametrize("budget,m", [("query_head", 1000), ("kv_head", 1000), ("query_head", 20000),
                                      ("kv_head", 20000)], ids=["narrow-group", "narrow", "wide-group", "wide"])
def test_scores_keyed_by_their_top_bits(key_bits, digit_bits, budget, m, monkeypatch):
    """Ranked by the top 8, 16 or 24 bits of their order (re-ranking's candidates take 16), scores equal in those
    bits tie and go to the lower token index, narrow tables and split selects alike (this one's one round of 16
    bits or two of 8 for 16-bit keys); the scores spread over a few octaves, so many share their top bits."""
    if key_bits == 16:
        count_digits(digit_bits, monkeypatch)
    g = torch.Generator().manual_seed(key_bits + m)
    b, hkv, n = 2, 2, 5000
    lut = torch.rand(b, 2 * hkv, m, generator=g) * 4 - 1
    codes = torch.randint(0, m, (b, hkv, n), generator=g)
    candidates = torch.rand(b, n, generator=g) > 0.2
    k = torch.tensor([150, 1700])
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    assert_same_selection(to(lut), to(codes), to(candidates), to(k), budget, key_bits=key_bits)


@pytest.mark.parametrize("digit_bits", [16, 8])
@pytest.mark.parametrize("span", [True, False], ids=["span", "no-span"])
@pytest.mark.parametrize("scores", ["nine-in-ten-tie", "all-equal", "narrow-range", "far-apart"])
def test_wide_table_with_mostly_one_score(scores, span, digit_bits, monkeypatch):
    """Wide tables whose keys crowd (nine columns in ten one value; every column one value; every score within
    1e-6 of 1, so the keys share their top 20 bits; both signs and magnitudes 1e-30 to 1e30, so 16-bit digits'
    picks read many chunks down from the largest): the split select, which counts the keys less the head's
    lowest, shifted by their span's leading zeros (or as they are), 16-bit keys in one round or 32-bit keys 8 bits
    a round, finds the reference's threshold and ties."""
    monkeypatch.setattr(triton_topk, "KEY_SPAN", span)
    key_bits = count_digits(digit_bits, monkeypatch)
    g = torch.Generator().manual_seed(7)
    m, n = 40000, 30000
    lut = torch.randn(1, 2, m, generator=g)
    if scores == "nine-in-ten-tie":
        lut[:, :, : int(0.9 * m)] = 0.5
    elif scores == "all-equal":
        lut[:] = -0.25
    elif scores == "narrow-range":
        lut = 1 + 1e-6 * lut
    else:
        lut = lut * 10.0 ** torch.randint(-30, 31, lut.shape, generator=g)
    codes = torch.randint(0, m, (1, 1, n), generator=g).to(torch.uint16)
    candidates = torch.rand(1, n, generator=g) > 0.1
    k = torch.tensor([2000])
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    assert_same_selection(to(lut), to(codes), to(candidates), to(k), "query_head", k_max=2000, key_bits=key_bits)


@pytest.mark.parametrize("copies,span,digit_bits", [(1, True, 8), (4, True, 8), (1, False, 8), (1, True, 16),
                                                    (1, False, 16)])
def test_wide_table_with_heavy_columns(copies, span, digit_bits, monkeypatch):
    """Columns holding thousands of candidates (one of 20000, three of ~2200): the split select counts them exactly,
    8-bit digits (of 32-bit keys) into one set of counters per split or several, 16-bit ones (of 16-bit keys) into
    a set for every split, with the keys shifted by their span or as they are."""
    monkeypatch.setattr(triton_topk, "COUNT_COPIES", copies)
    monkeypatch.setattr(triton_topk, "KEY_SPAN", span)
    key_bits = count_digits(digit_bits, monkeypatch)
    g = torch.Generator().manual_seed(3)
    m, n = 9000, 40000
    lut = torch.randn(1, 2, m, generator=g)
    codes = torch.randint(0, m, (1, 1, n), generator=g)
    codes[..., : 2 * n // 3] = torch.randint(0, 3, (1, 1, 2 * n // 3), generator=g)
    codes[..., :20000] = 11  # column 11: 20000 candidates; columns 0-2: the other ~6700
    candidates = torch.ones(1, n, dtype=torch.bool)
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    for k in (25000, 30000):
        assert_same_selection(to(lut), to(codes.to(torch.int32)), to(candidates), to(torch.tensor([k])), "kv_head",
                              key_bits=key_bits)


def test_codes_view_histogram_and_k_bound():
    """A view of a longer code buffer, a given histogram and a host bound k_max give the same selection."""
    g = torch.Generator().manual_seed(1)
    buffer = torch.randint(0, 40, (2, 2, 300), generator=g).to(torch.uint16).to(KERNEL_DEVICE)
    codes = buffer[:, :, :211]
    candidates = (torch.rand(2, 211, generator=g) > 0.2).to(KERNEL_DEVICE)
    lut = torch.randn(2, 4, 40, generator=g).to(KERNEL_DEVICE)
    k = torch.tensor([9, 30], device=KERNEL_DEVICE)
    hist = code_histogram(codes, candidates, 40)
    assert_same_selection(lut, codes, candidates, k, "query_head", histogram=hist, k_max=30, block_n=64)


def capture_selections(model, cache, ids) -> list[tuple]:
    """(lut, codes, candidates, k, histogram) of every top-K call while ``model`` generates 3 tokens after ``ids``
    (2 decode steps)."""
    captured = []
    original = kernels.select_topk

    def spy(lut, codes, candidates, k, budget="query_head", **kwargs):
        hist = kwargs.get("histogram")
        captured.append((lut, codes.clone(), candidates, k, None if hist is None else hist.clone()))
        return original(lut, codes, candidates, k, budget, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "select_topk", spy)
        model.to(DEVICE).generate(ids, **cache_argument(model, cache), max_new_tokens=3, do_sample=False)
    return captured


def test_matches_reference_on_distance_scores(tiny):
    """The distance scorer's tables (bucket x centroid columns, int32 codes, no kept histogram) select the same."""
    model, books = tiny
    captured = capture_selections(model, A2ATSCache(books, topk=0.1, scoring="distance"), ids_of(1, 600))
    for lut, codes, candidates, k, _ in captured:
        assert codes.dtype == torch.int32 and lut.shape[-1] > books.whitened_centroids.shape[2]
        to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
        assert_same_selection(to(lut), to(codes), to(candidates), to(k), "query_head")


@pytest.mark.slow
def test_matches_reference_on_smollm2(smollm2, austen):
    """Real LUTs, codes and candidates captured from SmolLM2 decoding Persuasion (a 1.2K-token prompt, all layers of
    the first two decode steps): the kernel selects exactly what the reference selects."""
    from a2ats_eval.assets import demo_codebooks

    model, tokenizer = smollm2
    books = demo_codebooks(model, tokenizer, austen)
    ids = tokenizer(austen["Persuasion"][50000:56000], return_tensors="pt")["input_ids"].to(DEVICE)
    captured = capture_selections(model, A2ATSCache(books, topk=0.03), ids)
    assert len(captured) == 2 * model.config.num_hidden_layers
    for lut, codes, candidates, k, hist in captured[:: 7 if DEVICE.type == "cpu" else 1]:  # interpreter is slow
        to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
        assert torch.equal(hist, code_histogram(codes, candidates, lut.shape[-1])), "incremental histogram drifted"
        assert_same_selection(to(lut), to(codes), to(candidates), to(k), "query_head", histogram=to(hist))


@pytest.mark.parametrize("budget", ["query_head", "kv_head"])
@pytest.mark.parametrize("split_from", [None, 256], ids=["narrow", "split-select"])
def test_matches_reference_on_scores_as_a_table(budget, split_from, monkeypatch):
    """A table of one candidate a column: exact scores (some tied) with -inf past each head's candidates, each
    candidate's position as its code (one arange broadcast over rows and heads: stride 0), every position a
    candidate; with a table this wide taken as wide, by a split select."""
    if split_from:  # (three splits of 256 columns)
        monkeypatch.setattr(triton_topk, "WIDE_TABLE", split_from)
        monkeypatch.setattr(triton_topk, "SPLIT_COLUMNS", split_from)
    g = torch.Generator().manual_seed(5)
    b, hkv, group, c = 2, 2, 3, 700
    counts = torch.tensor([[700, 412], [133, 650]])
    lut = torch.randn(b, hkv, group, c, generator=g)
    lut[..., 100:160] = lut[..., 99:100]  # ties
    lut = lut.masked_fill(torch.arange(c) >= counts[:, :, None, None], float("-inf")).reshape(b, hkv * group, c)
    positions = torch.arange(c, dtype=torch.int32).expand(b, hkv, c)
    ones = torch.ones(c, dtype=torch.int32).expand(b, hkv, c)
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    for k in (torch.tensor([90, 133]), torch.tensor([700, 0]), torch.tensor([1, 5])):
        assert_same_selection(to(lut), to(positions), to(torch.ones(b, c, dtype=torch.bool)), to(k), budget,
                              k_max=int(k.max()), histogram=to(ones))


@pytest.mark.parametrize("unit,round_,bits", [(False, 0, 8), (False, 1, 8), (False, 3, 8), (True, 0, 8), (True, 3, 8),
                                             (False, 0, 16)])
def test_digit_counts_compile_for_hopper(unit, round_, bits):
    """The split select's digit counts, in each way of counting (8-bit digits by atomic additions or, over
    re-ranking's scores, a histogram; 16-bit ones by atomic additions), compile to PTX for sm_90 without a GPU."""
    constants = {"ROUND": round_, "HEADS": 8, "GROUP": 1, "S_PAD": 2, "BITS": bits, "COLUMNS": 4096, "COPIES": 1,
                 "UNIT": unit, "SPAN": True, "KEY_BITS": 32 if bits == 8 else 16}
    pointers = {"lut_ptr": "*fp32", "k_ptr": "*i64", "state_ptr": "*i64", "span_ptr": "*i64"}
    compile_for_hopper("triton_topk", "_digit_count_kernel", constants, pointers)


def test_key_range_and_classes_compile_for_hopper():
    """The split select's key span and its classes compile to PTX for sm_90 without a GPU."""
    compile_for_hopper("triton_topk", "_key_range_kernel",
                       {"HEADS": 8, "GROUP": 1, "COLUMNS": 4096, "KEY_BITS": 32},
                       {"lut_ptr": "*fp32", "span_ptr": "*i64"})
    for bits in (8, 16):
        compile_for_hopper("triton_topk", "_classify_kernel",
                           {"HEADS": 8, "GROUP": 4, "G_PAD": 4, "S_PAD": 16, "BITS": bits, "COLUMNS": 4096,
                            "SPAN": True, "KEY_BITS": 16},
                           {"lut_ptr": "*fp32", "k_ptr": "*i64", "state_ptr": "*i64", "span_ptr": "*i64",
                            "class_ptr": "*u8"})


@pytest.mark.parametrize("key_bits", [32, 16])
def test_threshold_compiles_for_hopper(key_bits):
    """The narrow select, its widest table held in registers, compiles to PTX for sm_90 without a GPU, its keys
    whole or cut to their top 16 bits (re-ranking's candidates)."""
    constants = {"HEADS": 8, "GROUP": 1, "G_PAD": 1, "TABLE": 8192, "BLOCK_M": 2048, "KEY_BITS": key_bits}
    pointers = {"lut_ptr": "*fp32", "k_ptr": "*i64", "class_ptr": "*u8"}
    compile_for_hopper("triton_topk", "_threshold_kernel", constants, pointers)


@pytest.mark.parametrize("group", [1, 4, 6])
def test_scans_compile_for_hopper(group):
    """The one-pass scan over the codes compiles to PTX for sm_90 without a GPU, its atomics relaxed, for a group
    of one head (a word of one byte), of four (four bytes, counted packed) and of six (a word of eight)."""
    g_pad = {1: 1, 4: 4, 6: 8}[group]
    constants = {"HKV": 8, "G": group, "G_PAD": g_pad, "BLOCK_N": 512, "WORDS": True, "PACKED": g_pad <= 4,
                 "HEAD_BYTES": (1 << 8 * group) - 1, **triton_topk._windows(g_pad, 4)}
    pointers = {"class_ptr": {1: "*u8", 4: "*i32", 8: "*i64"}[g_pad], "codes_ptr": "*u16", "cand_ptr": "*i1",
                "k_ptr": "*i64"}
    compile_for_hopper("triton_topk", "_scan_kernel", constants, pointers)


@pytest.mark.parametrize("group", [1, 4])
def test_scoring_compiles_for_hopper(group):
    """Re-ranking's scoring of the chosen tokens compiles to PTX for sm_90 without a GPU, by one query or four a
    KV head (a pool for the query heads)."""
    compile_for_hopper("triton_topk", "_score_kernel", {"G": group, "D": 128, "D_PAD": 128, "ROWS": 32},
                       {"q_ptr": "*bf16", "key_ptr": "*bf16", "score_ptr": "*fp32"})


@pytest.mark.parametrize("budget", ["query_head", "kv_head", "pool"])
@pytest.mark.parametrize("b, hq, hkv, d, n, m, dtype",
                         [(2, 6, 2, 24, 700, 50, torch.float32), (3, 3, 3, 64, 300, 9000, torch.bfloat16),
                          (1, 4, 1, 80, 3000, 20, torch.float16)],
                         ids=["group3", "mha-wide-table-bf16", "group4-d80-segments"])
@pytest.mark.parametrize("keep", ["whole", "scans"])
def test_select_scores_its_choice_exactly(budget, b, hq, hkv, d, n, m, dtype, keep, monkeypatch):
    """With ``exact``, the select scores the tokens it chose: the reference's indices and counts, and
    up to each count their exact q . k by the table's query heads (or the group's summed query; or, as a "pool"
    for the query heads, the group's summed table choosing and each query head scoring) against a store
    buffer wider than the tokens; the keep keeps what the reference keeps of those scores (many tied in 16 bits;
    budgets up to past every count): in one program, or by scans over parts of 32 candidates after a split select
    of 64 candidates a program (past KEEP_TABLE)."""
    if keep == "scans":
        monkeypatch.setattr(triton_topk, "KEEP_TABLE", 16)
        monkeypatch.setattr(triton_topk, "KEEP_SCAN_BLOCK", 32)
        if m < triton_topk.WIDE_TABLE:  # (the wide table's own split select left at its width: interpreter time)
            monkeypatch.setattr(triton_topk, "SPLIT_COLUMNS", 64)
    g = torch.Generator().manual_seed(d + n)
    lut = torch.randn(b, hq, m, generator=g)
    codes = torch.randint(0, m, (b, hkv, n), generator=g).to(torch.uint16)
    candidates = torch.rand(b, n, generator=g) > 0.3
    k = torch.randint(1, int(candidates.sum(-1).min()) // 3, (b,), generator=g)
    heads = hkv if budget == "kv_head" else hq
    chooser, budget = ("kv_head", "query_head") if budget == "pool" else (budget, budget)  # (select's, keep's rule)
    query, keys = torch.randn(b, heads, d, generator=g), torch.randn(b, hkv, n + 17, d, generator=g).to(dtype)
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    expected, expected_counts, expected_scores = reference.select_topk(lut, codes, candidates, k, chooser,
                                                                       exact=(query, keys))
    got, counts, scores = triton_topk.select_topk(to(lut), to(codes), to(candidates), to(k), chooser, block_n=64,
                                                  exact=(to(query), to(keys)))
    assert torch.equal(counts.cpu().long(), expected_counts.long()) and scores.dtype == torch.float32
    assert scores.shape == (b, heads, got.shape[-1])
    group = heads // hkv
    for row in range(b):
        for head in range(hkv):
            c = int(counts[row, head])
            assert torch.equal(got[row, head, :c].cpu().long(), expected[row, head, :c].long())
            rows = slice(head * group, (head + 1) * group)
            torch.testing.assert_close(scores[row, rows, :c].cpu(), expected_scores[row, rows, :c], atol=1e-4,
                                       rtol=1e-4)
    for top in (torch.div(k, 2, rounding_mode="floor"), k, torch.full_like(k, n)):  # (n: past every count)
        kept, kept_counts = reference.keep_top(got.cpu(), counts.cpu(), scores.cpu(), top, int(top.max()), budget, 16)
        got_kept, got_counts = triton_topk.keep_top(got, counts, scores, to(top), int(top.max()), budget, 16)
        assert torch.equal(got_counts.cpu().long(), kept_counts.long())
        for row in range(b):
            for head in range(hkv):
                c = int(got_counts[row, head])
                assert torch.equal(got_kept[row, head, :c].cpu().long(), kept[row, head, :c].long())
    # the select and the keep at once (by scans, the keep's zeroed words come with the select's)
    top = torch.div(k + 1, 2, rounding_mode="floor")
    keep = reference.Keep(top, int(top.max()), budget, 16)
    kept, kept_counts = reference.select_topk(lut, codes, candidates, k, chooser, exact=(query, keys), keep=keep)
    got_kept, got_counts = triton_topk.select_topk(to(lut), to(codes), to(candidates), to(k), chooser, block_n=64,
                                                   exact=(to(query), to(keys)),
                                                   keep=reference.Keep(to(top), keep.k_max, budget, 16))
    assert torch.equal(got_counts.cpu().long(), kept_counts.long())
    for row in range(b):
        for head in range(hkv):
            c = int(got_counts[row, head])
            assert torch.equal(got_kept[row, head, :c].cpu().long(), kept[row, head, :c].long())


@pytest.mark.parametrize("budget", ["query_head", "kv_head"])
@pytest.mark.parametrize("keep_table,digit_bits,key_bits", [(None, 4, 32), (None, 2, 32), (None, 8, 32), (256, 4, 32),
                                                            (None, 4, 16), (None, 8, 24), (256, 4, 16)],
                         ids=["in-registers", "2-bit-digits", "8-bit-digits", "by-scans", "16-bit-keys",
                              "24-bit-keys", "16-bit-keys-by-scans"])
@pytest.mark.parametrize("spread", [1.0, 1e-6], ids=["random", "narrow-range"])
def test_keep_top_matches_reference(budget, keep_table, digit_bits, key_bits, spread, monkeypatch):
    """Re-ranking's keep: exact scores (some tied, garbage past each head's count, which the keep must not use; or
    all within 1e-6 of 1, so only the keys' last digits tell them apart) over candidate rows with padding past the
    counts; the rows kept, ascending, 0 after them, as the reference keeps them, whether the candidates fit one
    program's registers or go by scans (past ``KEEP_TABLE``: a split select of 256 candidates a program, parts of
    128), by digits of any width the register select takes, on keys of any width (16 bits: scores equal in
    bfloat16 tie, to the lower position)."""
    monkeypatch.setattr(triton_topk, "KEEP_DIGIT_BITS", digit_bits)
    if keep_table:
        monkeypatch.setattr(triton_topk, "KEEP_TABLE", keep_table)
        monkeypatch.setattr(triton_topk, "SPLIT_COLUMNS", 256)
        monkeypatch.setattr(triton_topk, "KEEP_SCAN_BLOCK", 128)
    g = torch.Generator().manual_seed(6)
    b, hkv, group, c, n = 2, 2, 3, 700, 5000
    counts = torch.tensor([[700, 412], [133, 650]])
    scores = 1 + spread * torch.randn(b, hkv, group, c, generator=g)
    scores[..., 100:160] = scores[..., 99:100]  # ties
    past = torch.arange(c) >= counts[..., None]
    scores = scores.masked_fill(past[:, :, None], float("inf")).reshape(b, hkv * group, c)  # not written, not used
    indices = torch.stack([torch.randperm(n, generator=g)[:c].sort().values for _ in range(b * hkv)]).view(b, hkv, c)
    indices = indices.masked_fill(past, 10**6).to(torch.int32)  # garbage past the counts
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    for k in (torch.tensor([90, 133]), torch.tensor([700, 0]), torch.tensor([1, 5])):
        expected, expected_counts = reference.keep_top(indices, counts, scores, k, int(k.max()), budget, key_bits)
        got, got_counts = triton_topk.keep_top(to(indices), to(counts), to(scores), to(k), int(k.max()), budget,
                                               key_bits)
        assert torch.equal(got_counts.cpu().long(), expected_counts.long())
        width = torch.arange(got.shape[-1])
        assert not got.cpu().masked_fill(width < got_counts.cpu()[..., None], 0).any(), "0 past each count"
        for row in range(b):
            for head in range(hkv):
                kept = int(got_counts[row, head])
                assert torch.equal(got[row, head, :kept].cpu(), expected[row, head, :kept].to(torch.int32))


def test_keep_top_rejects_a_digit_width_that_would_skip_bits(monkeypatch):
    """A keep's digit width (a tuning knob) that does not divide every key width is refused, not run short."""
    monkeypatch.setattr(triton_topk, "KEEP_DIGIT_BITS", 3)
    indices, counts = torch.zeros(1, 1, 4, dtype=torch.int32), torch.tensor([[4]])
    with pytest.raises(ValueError, match="KEEP_DIGIT_BITS must be 2, 4 or 8, got 3"):
        triton_topk.keep_top(indices, counts, torch.randn(1, 1, 4), torch.tensor([2]), 2)


@pytest.mark.parametrize("digit_bits,group", [(2, 4), (4, 4), (8, 4), (4, 1)])
def test_keep_top_compiles_for_hopper(digit_bits, group):
    """Re-ranking's keep over the widest table it holds in registers compiles to PTX for sm_90 without a GPU,
    selecting by digits of each width."""
    compile_for_hopper("triton_topk", "_keep_top_kernel",
                       {"HKV": 8, "G": group, "TABLE": 8192, "DIGIT_BITS": digit_bits,
                        "KEY_BITS": 32 if digit_bits < 8 else 16},
                       {"score_ptr": "*fp32", "k_ptr": "*i64"})


@triton.jit
def _look_back_probe(state_ptr, own_ptr, part, WORDS: tl.constexpr, LOOK: tl.constexpr):
    w = tl.arange(0, WORDS)
    tl.store(own_ptr + w, triton_topk._prefix(state_ptr, part, tl.load(own_ptr + w), WORDS, LOOK, LOOK * WORDS))


@pytest.mark.parametrize("look", [4, 32])
def test_look_back_sums_earlier_parts_as_they_stand(look):
    """The scans' look-back, with the earlier parts caught mid-flight: some have published only their own counts
    (flag 1), some their inclusive sums (flag 2), each word on its own. It returns the sum of every earlier part's
    counts, read back to each word's nearest inclusive sum across windows of ``look`` parts, and publishes this
    part's inclusive sums."""
    g = torch.Generator().manual_seed(3)
    parts, words = 11, 2
    counts = torch.randint(0, 1000, (parts, words), generator=g, dtype=torch.int32)
    inclusive = counts.cumsum(0).to(torch.int32)
    flags = torch.ones(parts, words, dtype=torch.int32)
    flags[0], flags[5, 0], flags[8, 1] = 2, 2, 2
    state = torch.where(flags == 2, inclusive, counts) * 4 + flags
    state = torch.cat([state, torch.zeros(1, words, dtype=torch.int32)]).to(KERNEL_DEVICE)
    own = torch.tensor([7, 9], dtype=torch.int32, device=KERNEL_DEVICE)
    _look_back_probe[(1,)](state, own, parts, WORDS=words, LOOK=look)
    assert own.cpu().tolist() == inclusive[-1].tolist()
    assert state[parts].cpu().tolist() == [((int(inclusive[-1, i]) + o) << 2) | 2 for i, o in enumerate((7, 9))]


@pytest.mark.parametrize("group", [1, 4, 6])
def test_keep_by_scans_compiles_for_hopper(group):
    """The keep by scans' one pass (groups of one, four and six heads; each program picking its heads' thresholds
    from the split select's 16 sets of counts, its two look-backs' windows a word a thread at least) compiles to PTX for
    sm_90 without a GPU, its atomics relaxed."""
    g_pad = {1: 1, 4: 4, 6: 8}[group]
    compile_for_hopper("triton_topk", "_keep_scan_kernel",
                       {"HEADS": 32, "G": group, "G_PAD": g_pad, "S_PAD": 16, "BLOCK": 1024, "ROUNDS": 2, "BITS": 8,
                        "KEY_BITS": 16, **triton_topk._windows(g_pad, 4)},
                       {"score_ptr": "*fp32", "count_ptr": "*i32", "k_ptr": "*i64", "state_ptr": "*i64"})
