"""How much of each decode step's selection the steps before it selected, on real text: SmolLM2-135M-Instruct
predicting the last tokens of held-out windows of *Persuasion* (teacher forcing, as the suite's perplexity), the
far rows each KV head attends recorded at every step and layer (:mod:`a2ats_eval.reuse`).

What it tells: an offloaded layer gathers its selected rows from CPU memory at every step; the share a
device-resident cache of the most recently picked rows (``capacity`` x the budget per row and KV head, least
recently picked evicted) would miss is the share that would still cross from the CPU; the library's own row cache
(``A2ATSCache(row_cache=R)``) runs beside, for what it finds. A random-weight benchmark
cannot tell it: its queries repeat (one token at one position) or are unrelated from step to step.

    python -m bench.selection_reuse                     # 4K and 8K, the library's default scorer and the exact top-K
    python -m bench.selection_reuse --lengths 4096 --steps 32 --windows 1   # a quicker cut (CPU, ~2 minutes)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from a2ats_eval import Method, tail_nll
from a2ats_eval.assets import austen_novels, smollm2_path
from a2ats_eval.fidelity import FidelityProbe
from a2ats_eval.reuse import lru_misses, reuse, union_size
from a2ats_hf import A2ATSCache
from bench.common import environment, hits_since, results_path
from bench.evaluation import HELD_OUT, codebook_variants

METHODS = {  # name -> the suite's method
    m.name: m for m in (Method("distance", 0.03), Method("distance", 0.03, "kv_head"),
                        Method("oracle", 0.03, "kv_head"), Method("wrope", 0.03, "kv_head"))
}


def measure(model, books, ids: torch.Tensor, method: Method, steps: int, capacities: list[float]) -> dict:
    """One method's reuse over ``steps`` decode steps of the windows ``ids`` [W, L]: means over layers, and the
    last step's reuse per layer."""
    cache = method.cache(books)
    with FidelityProbe(cache, every=1, keep_picks=True) as probe:
        tail_nll(model, ids, cache, steps)
    layers = sorted(probe.picks)
    mean = lambda f: round(sum(f(probe.picks[i]) for i in layers) / len(layers), 4)  # noqa: E731
    return {"method": method.name, "length": ids.shape[1], "windows": ids.shape[0], "steps": steps,
            "reuse": mean(reuse), "reuse_of_8_steps": mean(lambda p: reuse(p, history=8)),
            "union_of_8_steps": mean(lambda p: union_size(p, 8)),
            "lru_misses": {str(c): mean(lambda p, c=c: lru_misses(p, c)) for c in capacities},
            "reuse_per_layer": [round(reuse(probe.picks[i]), 3) for i in layers],
            "attended_fraction": round(cache.stats.attended_fraction, 4)}


def row_cache_hits(model, books, ids: torch.Tensor, method: Method, steps: int, budgets: float,
                   warm: int = 16) -> float:
    """The share of the selected rows the library's row cache (``row_cache=budgets``, offloaded layers) found over
    ``steps`` decode steps of the windows ``ids``, after the first ``warm`` (a step fills at most an eighth of its
    width: the slots fill over ~16 steps)."""
    cache = A2ATSCache(books[method.codebooks], topk=method.topk, budget=method.budget, scoring=method.scoring,
                       max_length=ids.shape[1], row_cache=budgets)
    calls, warmed = [0], []

    def watch(*_):
        calls[0] += 1
        if calls[0] == warm * len(cache.a2ats_layers):
            warmed.extend(cache.row_cache_counts())

    cache.observers.append(watch)
    tail_nll(model, ids, cache, steps)
    return round(hits_since(cache, warmed), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--steps", type=int, default=64, help="decode steps measured per window")
    parser.add_argument("--windows", type=int, default=2, help="held-out windows per length (one batch)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--capacity", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0],
                        help="cache sizes, in budgets")
    parser.add_argument("--row-cache", type=float, nargs="+", default=[2.0, 4.0],
                        help="also run the library's row cache of these sizes (budgets), A2ATS methods only")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="a2ats").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    novels = austen_novels()
    books = codebook_variants(model, tokenizer, novels, ["default"])
    held_out = tokenizer(novels[HELD_OUT], return_tensors="pt")["input_ids"]
    rows = []
    for length in args.lengths:
        starts = torch.linspace(0, held_out.shape[1] - length, args.windows).long().tolist()
        ids = torch.cat([held_out[:, s : s + length] for s in starts])
        for name in args.methods:
            started = time.perf_counter()
            rows.append(measure(model, books, ids, METHODS[name], args.steps, args.capacity))
            if name.startswith(("distance", "wrope")):
                rows[-1]["row_cache_hits"] = {str(r): row_cache_hits(model, books, ids, METHODS[name], args.steps, r)
                                              for r in args.row_cache}
            misses = " ".join(f"{c}: {m:.3f}" for c, m in rows[-1]["lru_misses"].items())
            hits = " ".join(f"{c}: {h:.3f}" for c, h in rows[-1].get("row_cache_hits", {}).items())
            print(f"{length:>5} {name:<22} reuse {rows[-1]['reuse']:.3f}  LRU misses by budgets {misses}  "
                  f"row cache hits {hits or '-'}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    out = args.out or results_path("selection-reuse")
    out.write_text(json.dumps({"environment": environment(), "model": "SmolLM2-135M-Instruct (float32)",
                               "held_out": HELD_OUT, "codebooks": books["default"].config_dict(), "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
