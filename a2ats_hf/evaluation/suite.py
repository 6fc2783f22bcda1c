"""Run the retrieval tasks with full attention and with A2ATSCache under each scorer and budget, on one model.

Every (task, length, depth, seed) prompt is built once, fitted to ``length`` tokens with the model's tokenizer
(its chat template when it has one, then the answer's opening words), and answered greedily by every method.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import A2ATSCache
from ..codebooks import Codebooks
from .tasks import Sample, make_sample, score

ANSWER_TOKENS = {"niah_multivalue": 64, "niah_multiquery": 64, "variable_tracking": 48, "common_words": 96}


@dataclass(frozen=True)
class Method:
    """Full attention (``scoring`` None) or A2ATSCache with a scorer and a budget."""

    scoring: str | None = None
    topk: float = 0.03
    budget: str = "query_head"

    @property
    def name(self) -> str:
        if self.scoring is None:
            return "full"
        rule = "" if self.budget == "query_head" else f", {self.budget}"
        return self.scoring if self.scoring == "window" else f"{self.scoring} {self.topk:g}{rule}"

    def cache(self, codebooks: Codebooks):
        if self.scoring is None:
            return DynamicCache()
        return A2ATSCache(codebooks, topk=self.topk, budget=self.budget, scoring=self.scoring)


def prompt_text(tokenizer, sample: Sample) -> str:
    message = f"{sample.context}\n\n{sample.question}"
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
        return f"{chat}{sample.answer_prefix}"
    return f"{message}\n{sample.answer_prefix}"


def fitted_prompt(tokenizer, haystack_ids: list[int], task: str, length: int, depth: float, seed: int):
    """(sample, token ids) of about ``length`` tokens: the haystack is cut so the whole prompt fits."""
    offset = (seed * 7919) % max(len(haystack_ids) - length, 1)
    take = length
    for _ in range(6):  # needles, question and template (or a word list) change the length: cut the prose to fit
        prose = tokenizer.decode(haystack_ids[offset : offset + take])
        sample = make_sample(task, prose, depth, seed)
        ids = tokenizer(prompt_text(tokenizer, sample), add_special_tokens=False)["input_ids"]
        if len(ids) <= length:
            break
        take = int(take * (length - 8) / len(ids))
    return sample, ids


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    codebooks: Codebooks,
    haystack: str,
    methods: Iterable[Method],
    tasks: Iterable[str],
    lengths: Iterable[int] = (4096,),
    depths: Iterable[float] = (0.1, 0.5, 0.9),
    seeds: Iterable[int] = (0,),
    progress: bool = True,
) -> dict:
    """Answer every prompt with every method; return the per-prompt records and the mean score per method, task
    and length (and over tasks)."""
    methods, device = list(methods), next(model.parameters()).device
    haystack_ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    prompts = [(t, n, d, s) for n in lengths for t in tasks for d in depths for s in seeds]
    records, started = [], time.perf_counter()
    for task, length, depth, seed in tqdm(prompts, desc="evaluation", disable=not progress):
        sample, ids = fitted_prompt(tokenizer, haystack_ids, task, length, depth, seed)
        ids = torch.tensor([ids], device=device)
        for method in methods:
            cache = method.cache(codebooks)
            out = model.generate(ids, past_key_values=cache, max_new_tokens=ANSWER_TOKENS.get(task, 32),
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            records.append({"task": task, "length": length, "prompt_tokens": ids.shape[1], "depth": depth,
                            "seed": seed, "method": method.name, "score": score(sample, answer), "answer": answer,
                            "expected": sample.expected})
    return {"records": records, "summary": summarize(records), "seconds": round(time.perf_counter() - started, 1),
            "methods": [asdict(m) | {"name": m.name} for m in methods]}


def summarize(records: list[dict]) -> dict:
    """Mean score per method x task x length, per method x length over tasks, and that relative to full."""
    by_task, by_length = defaultdict(list), defaultdict(list)
    for r in records:
        by_task[(r["method"], r["task"], r["length"])].append(r["score"])
    for (method, task, length), scores in by_task.items():
        by_length[(method, length)].append(sum(scores) / len(scores))
    mean = {f"{m} | {n}": sum(v) / len(v) for (m, n), v in by_length.items()}
    relative = {key: value / mean[f"full | {key.split(' | ')[1]}"] for key, value in mean.items()
                if mean.get(f"full | {key.split(' | ')[1]}")}
    return {"per_task": {f"{m} | {t} | {n}": sum(v) / len(v) for (m, t, n), v in by_task.items()},
            "mean": mean, "relative_to_full": relative}
