"""Attention fidelity per layer: how close a cache's decode attention is to full attention, measured in place.

While a :class:`FidelityProbe` watches an :class:`A2ATSCache`, every ``every``-th decode attention call of it is
also computed exactly over every stored token, and the probe records, per layer: the recall of each query head's
exact top-K far tokens (K = the step's budget) by the scorer's top-K, the exact softmax mass of the tokens attended
(sinks + window + retrieved), and the relative error of the attention output, ``||o - o_full|| / ||o_full||``.
With ``keep_picks``, it also keeps each measured call's far rows per KV head (``picks``, what
:mod:`a2ats_eval.reuse` reads).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from a2ats_hf import step
from a2ats_hf.cache import A2ATSCache
from a2ats_hf.kernels import reference


class FidelityProbe:
    """Context manager watching a cache's decode steps (one of its ``observers``); ``summary()`` gives the per-layer
    means. Without a cache (full attention) it measures nothing."""

    def __init__(self, cache: A2ATSCache | None, every: int = 1, keep_picks: bool = False):
        self.cache, self.every, self.calls = cache, every, 0
        self.values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.picks: dict[int, list[torch.Tensor]] | None = defaultdict(list) if keep_picks else None

    def __enter__(self) -> "FidelityProbe":
        if self.cache is not None:
            self.cache.observers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.cache is not None:
            self.cache.observers.remove(self)

    def __call__(self, layer, query, position_ids, masks, scaling, out) -> None:
        """After a layer's decode step: its output ``out`` [B, Hq, D] against full attention's (every ``every``-th
        call), with the recall and attention mass of what it attended."""
        measure = self.calls % self.every == 0
        self.calls += 1
        if measure:
            exact = self.exact(layer, query, position_ids, masks, scaling)
            error = (out.float() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)
            self.values["output_error"][layer.layer_idx].append(error.mean().item())

    @torch.no_grad()
    def exact(self, layer, query, position_ids, masks, scaling) -> torch.Tensor:
        """Record recall and mass for this call; return full attention's output [B, Hq, D] (float32)."""
        cache, n = layer.cache, layer.store.length
        keys, values = (t.float().to(query.device) for t in layer.store.to_tensors())  # [B, Hkv, N, D]
        b, hq, d = query.shape
        hkv = keys.shape[1]
        group = hq // hkv
        q = query.float().view(b, hkv, group, d)
        logits = torch.einsum("bkgd,bknd->bkgn", q, keys).reshape(b, hq, n) * scaling
        valid, far = masks.valid, masks.far
        attended = (valid & ~far)[:, None].expand(b, hq, n)
        k = int(cache.budget_for(far.sum(-1)).max()) if cache.scorer.retrieves else 0
        if k > 0:
            attended = attended | self.selection(layer, query, position_ids, far, logits, k)
        probs = torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), dim=-1)
        self.values["mass"][layer.layer_idx].append((probs * attended).sum(-1).mean().item())
        out, _ = reference.attention_with_lse(query, keys, values, valid[:, None].expand(b, hkv, n), scaling)
        return out

    def selection(self, layer, query, position_ids, far, logits, k) -> torch.Tensor:
        """Record the recall of each query head's exact top-k by the scorer's top-k (re-ranked where the cache
        re-ranks this layer: the top R x k of the KV group's summed table, then each head's top k of those by its
        exact logits, or the group's by their sum); return what is attended far [B, Hq, N] (the KV group's union,
        or the KV head's pick under ``budget="kv_head"``)."""
        cache, (b, hq, n) = layer.cache, logits.shape
        hkv = layer.codes.shape[1]
        group = hq // hkv

        def per_group(scores):  # the group's summed scores for every head of it, under the per-KV-head rule
            summed = scores if scores.shape[1] == hkv else scores.view(b, hkv, group, -1).sum(2)
            return summed.repeat_interleave(group, dim=1)

        exact = logits.masked_fill(~far[:, None], float("-inf")).topk(k, dim=-1).indices
        rerank, ranked_by = layer.rerank, layer.table_rule
        lut, codes, _ = layer.scorer.scores(layer.score_inputs(query, position_ids, 1.0, far, ranked_by))
        if ranked_by == "kv_head":
            lut = per_group(lut)
        approx = lut.gather(-1, codes.long().repeat_interleave(group, dim=1))
        bits = step.CANDIDATE_KEY_BITS if rerank > 1 else layer.scorer.key_bits
        hit = top(approx, far[:, None], min(k * rerank, n), bits)
        if rerank > 1:
            hit = top(per_group(logits) if cache.budget == "kv_head" else logits, far[:, None] & hit, k,
                      step.KEEP_KEY_BITS)
        self.values["recall"][layer.layer_idx].append(hit.gather(-1, exact).float().mean().item())
        rows = hit.view(b, hkv, group, n).any(2)  # what each KV head reads: its group's union
        if self.picks is not None:
            self.picks[layer.layer_idx].append(rows.cpu())
        return rows.repeat_interleave(group, dim=1)

    def summary(self) -> dict:
        """{metric: {"mean": over layers, "per_layer": {layer: mean}}} for recall, mass and output_error."""
        result = {}
        for metric, layers in self.values.items():
            per_layer = {idx: sum(v) / len(v) for idx, v in sorted(layers.items())}
            result[metric] = {"mean": sum(per_layer.values()) / len(per_layer), "per_layer": per_layer}
        return result


def top(scores: torch.Tensor, allowed: torch.Tensor, k: int, key_bits: int = 32) -> torch.Tensor:
    """[..., N] bool: the ``k`` highest ``scores`` [..., N] among the ``allowed`` ones (fewer where fewer are), as
    the step's kernels rank them: by the top ``key_bits`` bits of their float32 order, ties to the lower index."""
    picked = reference.ranked(scores.masked_fill(~allowed, float("-inf")), key_bits)[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picked, True) & allowed
