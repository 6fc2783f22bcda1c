"""The evaluation suite: tasks put their needles where asked and score by exact match; the runner fits prompts to
the asked length and answers them with every method (a smoke run of the suite, on the tiny model)."""

from __future__ import annotations

import pytest
import torch

from a2ats_eval import TASKS, Method, evaluate, evaluate_perplexity, make_sample, score, tail_nll
from a2ats_eval.suite import fitted_prompt

from conftest import CharTokenizer, ids_of

PROSE = " ".join(f"Sentence {i} tells of Anne and the captain at Kellynch." for i in range(400))


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_hold_their_answers(task):
    """Each task's expected strings are in its context (or derivable: variable names, common words), the sample is
    reproducible for a seed, and a perfect answer scores 1, an empty one 0."""
    a, b = make_sample(task, PROSE, 0.5, seed=3), make_sample(task, PROSE, 0.5, seed=3)
    assert a == b and a.expected and a.task == task
    assert all(e in a.context for e in a.expected)
    assert score(a, " ".join(a.expected)) == 1.0 and score(a, "") == 0.0


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_depth(depth):
    """A single needle sits at the asked depth of the context (within the spread and a sentence)."""
    sample = make_sample("niah_number", PROSE, depth, seed=1)
    at = sample.context.index(sample.expected[0]) / len(sample.context)
    assert abs(at - depth) < 0.05


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("summarize", PROSE, 0.5, 0)


def test_prompts_fit_the_length():
    tokenizer = CharTokenizer()
    tokenizer.decode = lambda ids, **_: "".join(chr(i) for i in ids)
    ids = [ord(c) for c in PROSE]
    for task in TASKS:
        sample, prompt = fitted_prompt(tokenizer, ids, task, 3000, 0.5, 0)
        assert 2500 <= len(prompt) <= 3000, (task, len(prompt))


def test_method_names_and_ablations(tiny):
    """Names tell the variant apart; window and offset b reach the cache; codebooks are picked by name."""
    _, books = tiny
    method = Method("wrope", 0.05, "kv_head", codebooks="other", window=32, offset=512, sink=2)
    assert method.name == "wrope 0.05 (kv_head, other, window 32, sinks 2, b 512)"
    cache = method.cache({"default": None, "other": books})
    assert cache.window == 32 and cache.sink == 2 and cache.codebooks.offset == 512 and books.offset != 512
    assert cache.budget == "kv_head" and cache.topk == 0.05
    assert Method().name == "full" and Method("window").name == "window"
    reranked = Method("distance", 0.03, rerank=2)
    cache = reranked.cache(books)  # re-ranks for real: the keys on the model's device, retrieval at every length
    assert reranked.name == "distance 0.03 (rerank 2)" and (cache.rerank, cache.offload, cache.dense_below) == (
        2, "none", 0)


def test_same_total_window_attends_as_many_tokens(tiny):
    """A wider window "at the same total" takes its extra tokens out of the far budget: each step attends as many
    tokens as the codebooks' window (16) does at the same topk, one top-K per KV head."""
    from a2ats_hf import cache_argument

    model, books = tiny
    attended = {}
    for method in (Method("wrope", 0.2, "kv_head"), Method("wrope", 0.2, "kv_head", window=32, same_total=True)):
        cache = method.cache(books)
        model.generate(ids_of(2, 300), **cache_argument(model, cache), max_new_tokens=4, do_sample=False)
        attended[method.name] = (cache.stats.attended, cache.stats.far_selected)
    (base, base_far), (wide, wide_far) = attended.values()
    assert "window 32, same total" in list(attended)[1]
    assert wide == base and 0 < wide_far < base_far


def test_smoke_run_of_the_suite(tiny):
    """Every method answers every prompt; prompts batched across tasks (left-padded, prefilled in chunks) are
    answered as they are alone; the summary has a mean per method and the ratio to full attention."""
    model, books = tiny
    tokenizer = CharTokenizer()
    tokenizer.decode = lambda ids, **_: "".join(chr(i % 128) for i in ids)
    tokenizer.pad_token_id = 0
    methods = [Method(), Method("wrope", 0.1), Method("oracle", 0.1), Method("window")]
    tasks = ["niah_number", "variable_tracking"]
    result = evaluate(model, tokenizer, books, PROSE, methods, tasks, lengths=[600], depths=[0.2, 0.8],
                      batch_size=3, prefill_chunk_size=256, progress=False)
    assert len(result["records"]) == 2 * 2 * len(methods)
    assert set(result["summary"]["mean"]) == {f"{m.name} | 600" for m in methods}
    assert result["summary"]["relative_to_full"].get("full | 600") in (1.0, None)
    alone = evaluate(model, tokenizer, books, PROSE, methods[1:2], tasks[:1], lengths=[600], depths=[0.2, 0.8],
                     batch_size=1, progress=False)
    batched = [r for r in result["records"] if r["method"] == methods[1].name and r["task"] == tasks[0]]
    assert [r["answer"] for r in alone["records"]] == [r["answer"] for r in batched]


def test_tail_nll_decodes_exactly_at_full_budget(tiny):
    """Teacher-forced decode through A2ATS at topk=1.0 gives full attention's NLL; at 0.1 it is close, not equal."""
    model, books = tiny
    ids = ids_of(2, 160, seed=4)
    full = tail_nll(model, ids, None, 32)
    exact = tail_nll(model, ids, Method("wrope", 1.0).cache(books), 32)
    sparse = tail_nll(model, ids, Method("wrope", 0.1).cache(books), 32)
    assert full.shape == (2, 32)
    torch.testing.assert_close(exact, full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sparse, full, atol=1e-4)


def test_smoke_run_of_perplexity(tiny):
    """A row per (length, method) with perplexity; A2ATS rows carry fidelity per layer, exact at topk=1.0."""
    model, books = tiny
    ids = ids_of(1, 700, seed=5)
    methods = [Method(), Method("wrope", 1.0), Method("wrope", 0.1), Method("window")]
    rows = evaluate_perplexity(model, books, ids, methods, lengths=[300], windows=2, tail=24, probe_every=1,
                               progress=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == {m.name for m in methods}
    assert abs(by["wrope 1"]["perplexity"] - by["full"]["perplexity"]) < 1e-3 * by["full"]["perplexity"]
    assert by["wrope 1"]["recall"] == 1.0 and by["wrope 1"]["mass"] > 0.999 and by["wrope 1"]["output_error"] < 1e-4
    assert 0 < by["wrope 0.1"]["recall"] < 1 and set(by["wrope 0.1"]["recall_per_layer"]) == {0, 1}
    assert "recall" not in by["window"] and by["window"]["mass"] < by["wrope 1"]["mass"]
    with pytest.raises(ValueError, match="fewer than"):
        evaluate_perplexity(model, books, ids, methods, lengths=[800], progress=False)


def test_merge_joins_parts_that_split_a_cells_prompts():
    """bench/evaluation.py --merge: parts that split one cell's prompts (one depth each) make the whole cell; a
    prompt or perplexity cell two parts hold is taken once, from the first; the settings list what all parts ran."""
    from bench.evaluation import merge

    def part(depths, device, score=1.0):
        ruler = [{"method": "full", "length": 4096, "task": "niah_word", "depth": d, "seed": s, "score": score}
                 for d in depths for s in (0, 1)]
        return {"ruler": ruler, "perplexity": [{"method": "full", "length": 4096, "perplexity": 9.0 + score}],
                "settings": {"depths": depths, "samples": 2}, "device": device}

    merged = merge([part([0.125], "gpu"), part([0.875], "cpu", 0.0), part([0.125], "cpu", 0.5)])
    assert [(r["depth"], r["score"], r["device"]) for r in merged["ruler"]] == [
        (0.125, 1.0, "gpu"), (0.125, 1.0, "gpu"), (0.875, 0.0, "cpu"), (0.875, 0.0, "cpu")]
    assert merged["perplexity"] == [{"method": "full", "length": 4096, "perplexity": 10.0, "device": "gpu"}]
    assert merged["settings"] == {"depths": [0.125, 0.875], "samples": 2}
    assert merged["summary"]["mean"]["full | 4096"] == 0.5
