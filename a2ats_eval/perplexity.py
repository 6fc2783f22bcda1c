"""Perplexity of held-out text under each method, with the attention fidelity of its decode steps.

Windows of ``length`` tokens are cut from held-out text; the last ``tail`` tokens of each are predicted one decode
step at a time (teacher forcing), so every prediction goes through the method's decode attention, while a
:class:`~.fidelity.FidelityProbe` measures recall, attention mass and output error against full attention.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from a2ats_hf import A2ATSCache, cache_argument
from a2ats_hf.codebooks import Codebooks

from .fidelity import FidelityProbe
from .suite import Method


@torch.no_grad()
def tail_nll(model, ids: torch.Tensor, cache, tail: int) -> torch.Tensor:
    """NLL [B, tail] of the last ``tail`` tokens of ``ids`` [B, L]: prefill all but them, then one decode step per
    token. Without a cache (full attention), one exact forward pass gives the same logits."""
    if cache is None:
        logits = model(ids, logits_to_keep=tail + 1).logits[:, :-1]
    else:
        past = cache_argument(model, cache)  # once: it reads the model's signature
        steps = [model(ids[:, :-tail], **past, logits_to_keep=1).logits[:, -1]]
        for t in range(ids.shape[1] - tail, ids.shape[1] - 1):
            steps.append(model(ids[:, t : t + 1], **past).logits[:, -1])
        logits = torch.stack(steps, dim=1)
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, -tail:], reduction="none")


def evaluate_perplexity(
    model,
    codebooks: Codebooks | Mapping[str, Codebooks],
    ids: torch.Tensor,
    methods: Iterable[Method],
    lengths: Iterable[int] = (4096,),
    windows: int = 2,
    tail: int = 512,
    probe_every: int = 16,
    progress: bool = True,
) -> list[dict]:
    """One row per (length, method): perplexity of the ``tail`` of ``windows`` evenly spread windows of the held-out
    token ids [1, T] (decoded together, as one batch), and per-layer fidelity (every ``probe_every``-th decode
    attention call) with its mean over layers."""
    methods, device = list(methods), next(model.parameters()).device
    rows = []
    for length in lengths:
        if ids.shape[1] < length:
            raise ValueError(f"the held-out text has {ids.shape[1]} tokens, fewer than a window of {length}")
        starts = torch.linspace(0, ids.shape[1] - length, windows).long().tolist()
        batch = torch.cat([ids[:, s : s + length] for s in starts]).to(device)
        for method in tqdm(methods, desc=f"perplexity at {length}", disable=not progress):
            started = time.perf_counter()
            cache = method.cache(codebooks) if method.scoring is not None else None
            with FidelityProbe(cache if isinstance(cache, A2ATSCache) else None, probe_every) as probe:
                nll = tail_nll(model, batch, cache, tail)
            row = {"length": length, "method": method.name, "perplexity": math.exp(nll.mean().item()),
                   "seconds": round(time.perf_counter() - started, 1)}
            for metric, values in probe.summary().items():
                row[metric], row[f"{metric}_per_layer"] = values["mean"], values["per_layer"]
            if isinstance(cache, A2ATSCache):
                row["attended_fraction"] = cache.stats.attended_fraction
            rows.append(row)
    return rows
