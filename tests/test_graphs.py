"""The capture-ready decode step (graphs.py): on the CPU it runs eagerly (``capture=False``) and must select exactly
what the eager step selects, token for token, across width buckets and the window's wrap, with left-padded rows;
on a GPU the same run is captured and replayed."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf import A2ATSCache, cache_argument, kernels
from a2ats_hf.graphs import Captured, capture_decoding, compile_around_attention, release_decoding, replay
from a2ats_hf.store import kv_bytes

from conftest import DEVICE, ids_of


def run(model, books, ids, mask, graphs: bool, new: int = 40, sample: bool = False, halves: bool = True, **options):
    """(tokens, [per step and layer: selected indices per (row, KV head)], cache, runner) of a greedy run; with
    ``halves``, a step over offloaded layers runs as two halves of the batch, whose selections are joined again
    here."""
    selections = []
    select = kernels.select_topk

    def spy(*args, **kwargs):  # (re-ranking's candidates where it is on)
        chosen = select(*args, **kwargs)
        indices, counts = chosen[:2]
        if not (DEVICE.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # replays run no Python
            selections.append([row[:c].tolist() for row, c in zip(indices.flatten(0, 1), counts.flatten().tolist())])
        return chosen

    cache = A2ATSCache(books, **{"topk": 0.1, "offload": "none", "dense_below": 0, "max_length": 300, "row_cache": 0,
                                 **options})  # (a row cache only where a case names one)
    kernels.select_topk = spy
    if graphs:
        capture_decoding(model, capture=DEVICE.type == "cuda", bucket=32, halves=halves)
    try:
        torch.manual_seed(0)
        out = model.generate(ids, attention_mask=mask, **cache_argument(model, cache), max_new_tokens=new,
                             min_new_tokens=new, do_sample=sample, top_k=None, top_p=None, pad_token_id=0)
        runner = model.forward if graphs else None
    finally:
        kernels.select_topk = select
        release_decoding(model)
    if graphs and runner.split is not None and DEVICE.type == "cpu":  # each step: the first half's layers, then
        # the second's (a GPU's replayed steps run no Python to spy on: its selections are not compared)
        layers = len(cache.a2ats_layers)
        steps = [selections[i : i + 2 * layers] for i in range(0, len(selections), 2 * layers)]
        selections = [step[i] + step[layers + i] for step in steps for i in range(layers)]
    return out, selections, cache, runner


ONE_LAYER = 2 * kv_bytes(3, 2, 16, torch.float32, 300, 1) - 1  # "auto": the first of the tiny model's two layers on
# the device (short of room for both, with room for the other's row-cache slots where there are some)


@pytest.mark.parametrize("budget, sample, scoring, options", [
    ("query_head", False, "wrope", {}), ("kv_head", True, "wrope", {}), ("query_head", False, "distance", {}),
    ("query_head", False, "distance", {"offload": "cpu"}),
    ("query_head", False, "distance", {"offload": "cpu", "halves": False}),
    ("kv_head", False, "wrope", {"offload": "cpu", "gpu_share": 0.4}),
    ("kv_head", False, "wrope", {"offload": "auto", "gpu_kv_budget": ONE_LAYER}),
    ("query_head", False, "distance", {"offload": "cpu", "row_cache": 2}),
    ("kv_head", False, "wrope", {"offload": "auto", "gpu_kv_budget": ONE_LAYER, "row_cache": 3, "halves": False}),
    ("query_head", False, "distance", {"offload": "cpu", "gpu_share": 1.0}),
    ("kv_head", False, "distance", {"offload": "auto", "gpu_kv_budget": ONE_LAYER, "gpu_share": 1.0, "row_cache": 2})],
    ids=["greedy", "sampling", "distance-buckets", "offloaded-halves", "offloaded-one-batch", "offloaded-gpu-share",
         "auto-halves", "offloaded-row-cache", "auto-row-cache", "offloaded-gpu-reads", "auto-gpu-reads-misses"])
def test_static_step_selects_what_the_eager_step_selects(tiny, budget, sample, scoring, options):
    """Three prompts, two of them left-padded, 200 new tokens from 90: seven width buckets of 32 and twelve wraps of
    the 16-token window; the same selections, tokens (greedy, or sampled from the same seed) and statistics, with
    the K/V on the device, in CPU memory (graph pieces around the CPU attention; by default as two halves of the
    batch, rows 0-1 and row 2, each over a view of its rows of the cache; a share of the rows attended by the
    device), or both."""
    model, books = tiny
    ids = ids_of(3, 90, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :7], mask[2, :30] = 0, 0
    offered = options.pop("halves", True)
    # halves where the CPU attends an offloaded layer's rows (with gpu_share=1 it attends none: one batch)
    halves = offered and options.get("offload") in ("cpu", "auto") and options.get("gpu_share") != 1
    settings = {"new": 200, "sample": sample, "budget": budget, "scoring": scoring, **options}
    if halves:  # what the halves must reproduce: each half decoded alone (a batch's matmuls round by its size), its
        # device budget scaled to its rows, so the same layers keep their K/V on the device (and re-rank)
        first, second = (run(model, books, ids[rows], mask[rows], graphs=False,
                             **{**settings, **({"gpu_kv_budget": ONE_LAYER * (rows.stop - rows.start) // 3}
                                               if "gpu_kv_budget" in options else {})})
                         for rows in (slice(0, 2), slice(2, 3)))
        if options.get("offload") == "auto":
            assert [layer.store.resident for layer in first[2].a2ats_layers] == [True, False]
            assert [layer.store.resident for layer in second[2].a2ats_layers] == [True, False]
        eager = (torch.cat([first[0], second[0]]), [a + b for a, b in zip(first[1], second[1])], None)
        stats = [first[2].stats, second[2].stats]
    else:
        eager = run(model, books, ids, mask, graphs=False, **settings)
        stats = [eager[2].stats]
    static = run(model, books, ids, mask, graphs=True, halves=offered, **settings)
    if options.get("offload") == "auto":
        assert [layer.store.resident for layer in static[2].a2ats_layers] == [True, False]
    runner = static[3]
    assert (runner.split is not None) == halves
    assert runner.counts["static eager"] + runner.counts["replayed"] == 199  # every decode step took the static path
    assert torch.equal(eager[0], static[0])
    if DEVICE.type == "cpu":
        assert eager[1] == static[1]
    else:  # replayed steps run no Python to spy on: what they selected shows in the counts
        assert runner.counts["replayed"] > 180
    assert sum(s.far_selected for s in stats) == static[2].stats.far_selected
    assert sum(s.far_tokens for s in stats) == static[2].stats.far_tokens
    assert all(s.steps == static[2].stats.steps for s in stats)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_topk_one_in_the_static_step_is_full_attention(tiny, offload):
    """topk=1.0 through the capture-ready path gives sdpa's greedy tokens, with the K/V on the device or in CPU
    memory (graph pieces around the CPU attention)."""
    model, books = tiny
    ids = ids_of(2, 70, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    static = run(model, books, ids, mask, graphs=True, topk=1.0, new=20, offload=offload)
    assert static[3].counts["static eager"] + static[3].counts["replayed"] == 19
    model.set_attn_implementation("sdpa")
    try:
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    finally:
        model.set_attn_implementation("a2ats")
    assert torch.equal(static[0], reference)


def test_steps_the_static_path_cannot_serve_go_to_the_model(tiny):
    """A scorer with no capture-ready step: the model's own forward runs, with the same tokens."""
    model, books = tiny
    ids = ids_of(1, 60, seed=5)
    mask = torch.ones_like(ids)
    for options in ({"scoring": "oracle"}, {"scoring": "quest", "offload": "cpu"}):
        eager = run(model, books, ids, mask, graphs=False, new=6, **options)
        routed = run(model, books, ids, mask, graphs=True, new=6, **options)
        assert (torch.equal(eager[0], routed[0])
                and routed[3].counts["replayed"] == routed[3].counts["static eager"] == 0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs and the sync debug mode need a GPU")
def test_replayed_steps_issue_no_host_sync(tiny):
    """Once a width is captured, a decode step is input copies, one replay and a logits copy: torch's sync debug
    mode raises on any host synchronisation."""
    model, books = tiny
    ids = ids_of(2, 70, seed=6)
    cache = A2ATSCache(books, topk=0.1, offload="none", dense_below=0, max_length=200)
    runner = capture_decoding(model, bucket=64).forward
    try:
        out = model.generate(ids, **cache_argument(model, cache), max_new_tokens=5, do_sample=False, pad_token_id=0)
        replayed = runner.counts["replayed"]
        assert replayed >= 1
        token, position = out[:, -1:], torch.full((2, 1), out.shape[1] - 1, device=DEVICE)
        static_steps = runner.counts["static eager"] + replayed
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # other keywords than generate's: a new graph, whose first (eager) step must not sync either
            for step in range(4):
                logits = model(token, position_ids=position + step, use_cache=True,
                               **cache_argument(model, cache)).logits
                token = logits[:, -1:].argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert runner.counts["static eager"] + runner.counts["replayed"] == static_steps + 4
        assert runner.counts["replayed"] >= replayed + 2
    finally:
        release_decoding(model)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_a_failed_capture_warns_and_decodes_without_a_graph(tiny, monkeypatch):
    """Where CUDA cannot capture what a model runs, the runner says so once and decodes through the capture-ready
    path eagerly, with the same tokens."""
    model, books = tiny
    ids = ids_of(2, 70, seed=7)
    mask = torch.ones_like(ids)
    eager = run(model, books, ids, mask, graphs=False, new=12)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", refuse)
    with pytest.warns(UserWarning, match="capturing the decode step failed"):
        static = run(model, books, ids, mask, graphs=True, new=12)
    assert torch.equal(eager[0], static[0]) and static[3].counts["replayed"] == 0


@pytest.mark.parametrize("case", ["past-max-length", "auto-all-resident", "beam-search", "beam-search-offloaded",
                                  "rerank"])
def test_static_step_in_other_generation_modes(tiny, case):
    """Decoding past ``max_length`` (the buffers grow eagerly, then the static path resumes over the new ones),
    offload="auto" with every layer resident, beam search (rows reordered in place every step; offloaded, the
    halves' views are made again after each reorder) and exact re-ranking: the same tokens as the eager step, and
    the static path served most steps."""
    model, books = tiny
    ids = ids_of(2, 60, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    options = {"past-max-length": {"max_length": 70},
               "auto-all-resident": {"offload": "auto", "gpu_kv_budget": 2**30},
               "beam-search": {}, "beam-search-offloaded": {"offload": "cpu"}, "rerank": {"rerank": 3}}[case]
    extra = {"num_beams": 3} if case.startswith("beam-search") else {}
    outputs = []
    for graphs in (False, True):
        cache = A2ATSCache(books, **{"topk": 0.1, "offload": "none", "dense_below": 0, "max_length": 300, **options})
        if graphs:
            runner = capture_decoding(model, capture=DEVICE.type == "cuda", bucket=32).forward
        try:
            outputs.append(model.generate(ids, attention_mask=mask, **cache_argument(model, cache), max_new_tokens=30,
                                          do_sample=False, pad_token_id=0, **extra))
        finally:
            release_decoding(model)
    assert torch.equal(outputs[0], outputs[1])
    assert runner.counts["static eager"] + runner.counts["replayed"] >= 20
    assert (runner.split is not None) == (case == "beam-search-offloaded")


def test_compiled_layers_decode_the_same_tokens(tiny):
    """compile_layers fuses every decoder layer's norms and MLP and the final norm (not the attention); the same
    greedy tokens as the eager model, and release_decoding gives the modules their own forward back."""
    model, books = tiny
    ids = ids_of(2, 60, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    eager = run(model, books, ids, mask, graphs=False, new=12)
    names = compile_around_attention(model)
    assert names == [f"model.layers.{i}.{name}" for i in range(2)
                     for name in ("mlp", "input_layernorm", "post_attention_layernorm")] + ["norm"]
    assert compile_around_attention(model) == names  # again (a second cache for the model): nothing new, no error
    compiled = run(model, books, ids, mask, graphs=True, new=12)  # run() releases the model at its end
    assert torch.equal(eager[0], compiled[0]) and compiled[3].counts["static eager"] + compiled[3].counts["replayed"]
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_compile_layers_needs_the_graph_runner():
    with pytest.raises(ValueError, match="compile_layers=True goes with the graph runner"):
        A2ATSCache.from_pretrained("some/model", compile_layers=True)


def test_replay_interleaves_two_halves(monkeypatch):
    """Two halves' pieces replay in turn, each offloaded layer's CPU part of one half between the other half's
    pieces (so the GPU runs one half while the CPU attends the other), each piece's selection marked ready."""
    log = []

    class Logged:
        def __init__(self, name):
            self.name = name

        def replay(self):
            log.append(self.name)

        def record(self, stream):
            log.append(f"{self.name} ready")

    def captured(name: str, layers: int) -> Captured:
        between = [lambda i=i: log.append(f"{name} cpu{i}") for i in range(layers)]
        return Captured([Logged(f"{name}{i}") for i in range(layers + 1)], between, {}, None, (), Logged(name))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    replay([captured("A", 2), captured("B", 2)], torch.device("cpu"))
    assert log == ["A0", "A ready", "B0", "B ready", "A cpu0", "A1", "A ready", "B cpu0", "B1", "B ready",
                   "A cpu1", "A2", "B cpu1", "B2"]


def test_halves_follow_a_new_cache(tiny):
    """One runner, two offloaded caches in turn (the first one freed), the second's prompt as long as the first
    cache's last length: the second decodes over views of its own rows, as its halves decoded alone would."""
    import gc

    model, books = tiny
    first, second = ids_of(2, 80, seed=11), ids_of(2, 99, seed=12)
    expected = [run(model, books, second[rows], torch.ones_like(second[rows]), graphs=False, new=20,
                    offload="cpu")[0] for rows in (slice(0, 1), slice(1, 2))]
    runner = capture_decoding(model, capture=DEVICE.type == "cuda", bucket=32).forward
    try:
        for ids in (first, second):
            cache = A2ATSCache(books, topk=0.1, offload="cpu", max_length=300)
            out = model.generate(ids, **cache_argument(model, cache), max_new_tokens=20, do_sample=False,
                                 pad_token_id=0)
            del cache
            gc.collect()
    finally:
        release_decoding(model)
    assert runner.split is not None and torch.equal(out, torch.cat(expected))
