"""The evaluation suite: tasks put their needles where asked and score by exact match; the runner fits prompts to
the asked length and answers them with every method (a smoke run of the suite, on the tiny model)."""

from __future__ import annotations

import pytest

from a2ats_hf.evaluation import TASKS, evaluate, make_sample, score
from a2ats_hf.evaluation.suite import Method, fitted_prompt

from conftest import CharTokenizer

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


def test_smoke_run_of_the_suite(tiny):
    """Every method answers every prompt; the summary has a mean per method and the ratio to full attention."""
    model, books = tiny
    tokenizer = CharTokenizer()
    tokenizer.decode = lambda ids, **_: "".join(chr(i % 128) for i in ids)
    methods = [Method(), Method("wrope", 0.1), Method("oracle", 0.1), Method("window")]
    result = evaluate(model, tokenizer, books, PROSE, methods, ["niah_number", "variable_tracking"], lengths=[600],
                      depths=[0.5], progress=False)
    assert len(result["records"]) == 2 * len(methods)
    assert set(result["summary"]["mean"]) == {f"{m.name} | 600" for m in methods}
    assert result["summary"]["relative_to_full"].get("full | 600") in (1.0, None)
