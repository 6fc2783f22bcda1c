"""Long-context retrieval tasks in the style of RULER (Hsieh et al., 2024), generated here, seeded, over a
haystack of real prose, and scored by exact match as RULER does (the share of expected strings found in the answer).

Tasks: single needle with a word, number or UUID value (``niah_word``, ``niah_number``, ``niah_uuid``); several
needles with one key asked (``niah_multikey``); one key with several values (``niah_multivalue``); several keys
asked at once (``niah_multiquery``); a chain of variable assignments (``variable_tracking``); the most frequent
words of a long list (``common_words``). Needles sit at a chosen depth (0 = start, 1 = end) of the haystack.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

WORDS = ("apple banana cherry dolphin eagle falcon garden harbor island jasmine kettle lantern meadow nectar "
         "orchid pepper quartz river saddle timber umbrella violet walnut yellow zephyr anchor basket candle "
         "dragon ember forest glacier hammer igloo jungle kayak lemon mirror nutmeg oyster pebble quiver rocket "
         "silver tunnel velvet willow").split()


@dataclass
class Sample:
    """One prompt: the context with its needles, the question, the answer's opening words, what must be found."""

    task: str
    context: str
    question: str
    answer_prefix: str
    expected: list[str]
    depth: float


def _value(kind: str, rng: random.Random) -> str:
    if kind == "word":
        return rng.choice(WORDS) + "-" + rng.choice(WORDS)
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _insert(haystack: str, needles: list[str], depth: float, rng: random.Random) -> str:
    """Insert each needle at a sentence boundary near ``depth`` of the haystack (spread a little around it)."""
    cuts = [m.end() for m in re.finditer(r"[.!?]\s", haystack)] or [len(haystack)]
    for needle in needles:
        at = min(max(depth + rng.uniform(-0.02, 0.02), 0.0), 1.0)
        cut = cuts[min(int(at * len(cuts)), len(cuts) - 1)] if at < 1.0 else len(haystack)
        haystack = haystack[:cut] + needle + " " + haystack[cut:]
        cuts = [c + len(needle) + 1 if c >= cut else c for c in cuts]
    return haystack


def _niah(kind: str, keys: int = 1, values: int = 1, queries: int = 1):
    def make(haystack: str, depth: float, rng: random.Random) -> Sample:
        names = rng.sample(WORDS, keys)
        found = {name: [_value(kind, rng) for _ in range(values)] for name in names}
        needles = [f"One of the special magic {kind}s for {name} is: {value}." for name in names
                   for value in found[name]]
        rng.shuffle(needles)
        asked = names[:queries]
        what = " and ".join(asked)
        plural = "s" if values > 1 or queries > 1 else ""
        question = (f"What {'are all' if plural else 'is'} the special magic {kind}{plural} for {what} mentioned in "
                    "the provided text?")
        prefix = (f"The special magic {kind}{plural} for {what} mentioned in the provided text "
                  f"{'are' if plural else 'is'}")
        return Sample("", _insert(haystack, needles, depth, rng), question, prefix,
                      [v for name in asked for v in found[name]], depth)

    return make


def _variable_tracking(haystack: str, depth: float, rng: random.Random, hops: int = 4) -> Sample:
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    return Sample("", _insert(haystack, chain, depth, rng),
                  f"Find all variables that are assigned the value {value} in the text above.",
                  f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
                  f"are assigned the value {value}, they are:", names, depth)


def _common_words(haystack: str, depth: float, rng: random.Random, top: int = 10) -> Sample:
    """A numbered list of words drawn from the haystack's vocabulary: ``top`` of them appear far more often."""
    vocabulary = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", haystack)} - set(WORDS))
    common, rare = rng.sample(WORDS, top), rng.sample(vocabulary, min(len(vocabulary), 2000))
    n_words = max(len(haystack.split()) // 2, top * 10)
    words = [rng.choice(common) if rng.random() < min(top * 30 / n_words, 0.5) else rng.choice(rare)
             for _ in range(n_words)]
    words += common * 3  # each common word at least 3 times more
    rng.shuffle(words)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    return Sample("", context, f"What are the {top} most common words in the above list?",
                  f"Answer: The top {top} words that appear most often in the list are:", common, depth)


TASKS: dict[str, Callable[[str, float, random.Random], Sample]] = {
    "niah_word": _niah("word"),
    "niah_number": _niah("number"),
    "niah_uuid": _niah("uuid"),
    "niah_multikey": _niah("number", keys=4),
    "niah_multivalue": _niah("number", values=4),
    "niah_multiquery": _niah("number", keys=4, queries=2),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
}


def make_sample(task: str, haystack: str, depth: float, seed: int) -> Sample:
    """One seeded sample of ``task`` over ``haystack`` (prose, already cut to the wanted length)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    sample = TASKS[task](haystack, depth, random.Random(f"{task}-{seed}-{depth}"))
    sample.task = task
    return sample


def score(sample: Sample, answer: str) -> float:
    """RULER's string match: the share of expected strings that occur in the answer (case-insensitive)."""
    answer = answer.lower()
    return sum(e.lower() in answer for e in sample.expected) / len(sample.expected)
