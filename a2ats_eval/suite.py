"""Run the retrieval tasks with full attention and with A2ATSCache under each scorer and budget, on one model.

Every (task, length, depth, seed) prompt is built once, fitted to ``length`` tokens with the model's tokenizer
(its chat template when it has one, then the answer's opening words), and answered greedily by every method.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache

from a2ats_hf import A2ATSCache, cache_argument
from a2ats_hf.codebooks import Codebooks
from a2ats_hf.scoring import SCORERS

from .tasks import Sample, make_sample, score

ANSWER_TOKENS = {"niah_multivalue": 64, "niah_multiquery": 64, "variable_tracking": 48, "common_words": 96}


class SameTotalCache(A2ATSCache):
    """Ablation: a window wider than the codebooks' takes its extra tokens out of the far budget, so a step attends
    as many tokens as the codebooks' window would at the same ``topk`` (none retrieved where the window alone holds
    more)."""

    def budget_for(self, n_far: torch.Tensor | int) -> torch.Tensor | int:
        extra = self.window - self.codebooks.window
        base = super().budget_for(n_far + extra)  # what the narrower window would retrieve from its far tokens
        return max(base - extra, 0) if isinstance(base, int) else (base - extra).clamp(min=0)


@dataclass(frozen=True)
class Method:
    """Full attention (``scoring`` None) or A2ATSCache with a scorer and a budget. ``codebooks`` names which of
    the runner's codebooks it uses; ``window``, ``sink`` and ``offset`` (b) override theirs: the ablations
    (``same_total``: the window's extra tokens come out of the far budget). ``options`` are the scorer's own
    settings, as (name, value) pairs (e.g. ``(("per_octave", 2),)`` for "distance"). ``rerank`` R > 1 re-ranks
    R x the budget by exact scores, with the K/V kept where the model is (``offload="none"``: re-ranking needs
    the keys beside the queries) and retrieval at every length (``dense_below=0``: a device store attends short
    rows whole otherwise)."""

    scoring: str | None = None
    topk: float = 0.03
    budget: str = "query_head"
    codebooks: str = "default"
    window: int | None = None
    offset: int | None = None
    options: tuple[tuple[str, object], ...] = ()
    same_total: bool = False
    sink: int | None = None
    rerank: int = 1

    @property
    def name(self) -> str:
        if self.scoring is None:
            return "full"
        tags = [self.budget] * (self.budget != "query_head") + [self.codebooks] * (self.codebooks != "default")
        tags += [f"window {self.window}"] * (self.window is not None) + ["same total"] * self.same_total
        tags += [f"sinks {self.sink}"] * (self.sink is not None) + [f"b {self.offset}"] * (self.offset is not None)
        tags += [f"{key.replace('_', ' ')} {value}" for key, value in self.options]
        tags += [f"rerank {self.rerank}"] * (self.rerank > 1)
        name = self.scoring if self.scoring == "window" else f"{self.scoring} {self.topk:g}"
        return f"{name} ({', '.join(tags)})" if tags else name

    def cache(self, codebooks: Codebooks | Mapping[str, Codebooks]) -> Cache:
        if self.scoring is None:
            return DynamicCache()
        books = codebooks if isinstance(codebooks, Codebooks) else codebooks[self.codebooks]
        if self.offset is not None:
            books = replace(books, offset=self.offset)
        scoring = SCORERS[self.scoring](**dict(self.options)) if self.options else self.scoring
        cache = SameTotalCache if self.same_total else A2ATSCache
        where = {"offload": "none", "rerank": self.rerank, "dense_below": 0} if self.rerank > 1 else {}
        return cache(books, topk=self.topk, budget=self.budget, scoring=scoring, window=self.window, sink=self.sink,
                     **where)


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


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, max length] of token lists padded on the left."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    codebooks: Codebooks | Mapping[str, Codebooks],
    haystack: str,
    methods: Iterable[Method],
    tasks: Iterable[str],
    lengths: Iterable[int] = (4096,),
    depths: Iterable[float] = (0.1, 0.5, 0.9),
    seeds: Iterable[int] = (0,),
    batch_size: int = 8,
    prefill_chunk_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Answer every prompt with every method; return the per-prompt records and the mean score per method, task
    and length (and over tasks).

    Prompts of one length are answered in left-padded batches of ``batch_size`` (tasks mixed, each answer cut at
    its task's length): every method keeps each row as it would alone (A2ATS budgets are per row, padding is never
    attended). ``prefill_chunk_size`` bounds the prompt's activations (transformers' chunked prefill).
    """
    methods, device = list(methods), next(model.parameters()).device
    haystack_ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [(t, n, d, s) for n in lengths for t in tasks for d in depths for s in seeds]
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    records, started = [], time.perf_counter()
    for batch in tqdm(batches, desc=f"RULER-style prompts, {', '.join(m.name for m in methods)}", disable=not progress):
        fitted = [fitted_prompt(tokenizer, haystack_ids, t, n, d, s) for t, n, d, s in batch]
        limits = [ANSWER_TOKENS.get(t, 32) for t, *_ in batch]
        ids, mask = left_padded([f[1] for f in fitted], pad, device)
        for method in methods:
            out = model.generate(ids, attention_mask=mask, **cache_argument(model, method.cache(codebooks)),
                                 max_new_tokens=max(limits), do_sample=False, pad_token_id=pad,
                                 prefill_chunk_size=prefill_chunk_size)
            for (task, length, depth, seed), (sample, prompt), limit, row in zip(batch, fitted, limits,
                                                                                 out[:, ids.shape[1] :]):
                answer = tokenizer.decode(row[:limit], skip_special_tokens=True)
                records.append({"task": task, "length": length, "prompt_tokens": len(prompt), "depth": depth,
                                "seed": seed, "method": method.name, "score": score(sample, answer),
                                "answer": answer, "expected": sample.expected})
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
