"""Llama-3.1-8B's architecture (random weights) on one GPU and split over two by accelerate's balanced "auto"
map: A2ATS at topk=1.0 against full attention's greedy tokens (float32 and bf16), then decode throughput at 64K and
128K context, A2ATS (topk=0.03) beside full attention (sdpa + DynamicCache) on the same GPUs, batch 1, bf16.

Codebooks are random (4096 centroids per layer and KV head): speed does not depend on them, and topk=1.0 attends
every token whatever they are. Decode time per token is taken between consecutive logits (after a sync), so the
prefill is timed apart.

Run on a box with two GPUs (NVLink multicast off):
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python -m bench.multi_gpu
(writes bench/results/multi-gpu/<date>-<commit>-<gpu>.json and prints a table; `--contexts` with no value runs the
checks alone).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor

from a2ats_hf import A2ATSCache, Codebooks, cache_argument
from a2ats_hf.kernels import cpu_attention
from bench.common import LLAMA31_8B, build, environment, random_codebooks, results_path
from bench.report import MULTI_GPU, table


class Clock(LogitsProcessor):
    """The time at each new token's logits (after a device sync)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def run(model, ids: torch.Tensor, cache, attention: str, new_tokens: int) -> dict:
    """Greedy generation timed per token; the result keeps the new tokens and each step's logits."""
    model.set_attn_implementation(attention)
    clock = Clock()
    for gpu in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(gpu)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **cache_argument(model, cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=[clock], return_dict_in_generate=True,
                             output_logits=True)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    decode = sorted(steps)[len(steps) // 2] if steps else float("nan")
    result = {"prefill_s": round(clock.times[0] - start, 2), "decode_ms": round(decode * 1e3, 1),
              "tokens_per_s": round(ids.shape[0] / decode, 2),
              "peak_gpu_gib": [round(torch.cuda.max_memory_allocated(g) / 2**30, 1)
                               for g in range(torch.cuda.device_count())]}
    if isinstance(cache, A2ATSCache):
        result["cpu_kv_gib"] = round(cache.memory_footprint()["cpu_bytes"] / 2**30, 1)
        result["far_fraction"] = round(cache.stats.far_fraction, 3)
    return {"tokens": out.sequences[0, ids.shape[1]:].tolist(), "logits": [x[0].float().cpu() for x in out.logits],
            **result}


def check(gpus: list[int], dtype: torch.dtype, books: Codebooks, context: int, new_tokens: int = 16) -> dict:
    """A2ATS at topk=1.0 against sdpa's greedy tokens, with the logits' largest difference while the two agree and,
    where they part, sdpa's margin between its top two tokens (a near-tie the arithmetic's rounding can flip)."""
    model = build(gpus, dtype)
    ids = torch.randint(LLAMA31_8B.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(torch.device("cuda", gpus[0]))
    full = run(model, ids, DynamicCache(), "sdpa", new_tokens)
    exact = run(model, ids, A2ATSCache(books, topk=1.0), "a2ats", new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(full["tokens"], exact["tokens"])) if a != b), new_tokens)
    steps = min(same + 1, new_tokens)  # the steps fed the same tokens: logits comparable
    diff = max((a - b).abs().max().item() for a, b in zip(full["logits"][:steps], exact["logits"][:steps]))
    result = {"gpus": len(gpus), "dtype": str(dtype).removeprefix("torch."), "context": context,
              "same_greedy_tokens": same, "of": new_tokens, "max_logit_diff": round(diff, 5),
              "logit_std": round(full["logits"][0].std().item(), 4),
              "layers_per_gpu": dict(Counter(str(layer.self_attn.q_proj.weight.device)
                                             for layer in model.model.layers))}
    if same < new_tokens:
        top2 = full["logits"][same].topk(2).values
        result["sdpa_top2_margin_where_they_part"] = round((top2[0] - top2[1]).item(), 5)
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[65536, 131072], help="none: the checks alone")
    parser.add_argument("--new-tokens", type=int, default=9, help="decode steps timed per run (+1 after prefill)")
    parser.add_argument("--check-context", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cpu_attention.extension()  # built outside the timings
    books = random_codebooks()
    gpus = list(range(min(2, torch.cuda.device_count())))
    results = {"environment": environment(), "gpus": torch.cuda.device_count(), "checks": [], "runs": []}
    for setup in ([gpus[:1], gpus] if len(gpus) > 1 else [gpus]):
        for dtype in (torch.float32, torch.bfloat16):
            results["checks"].append(check(setup, dtype, books, args.check_context))
            print(results["checks"][-1], flush=True)
        if not args.contexts:
            continue
        model = build(setup)
        g = torch.Generator().manual_seed(0)
        for n in args.contexts:
            ids = torch.randint(LLAMA31_8B.vocab_size, (1, n), generator=g).to(torch.device("cuda", setup[0]))
            for method, cache, attention in (("sdpa + DynamicCache", DynamicCache(), "sdpa"),
                                             ("A2ATS topk=0.03", A2ATSCache(books, topk=0.03), "a2ats")):
                row = {"gpus": len(setup), "context": n, "method": method,
                       **run(model, ids, cache, attention, args.new_tokens + 1)}
                del row["tokens"], row["logits"]
                print(row, flush=True)
                results["runs"].append(row)
                del cache
                torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    out = args.out or results_path("multi-gpu")
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}\n\n{table(results['runs'], MULTI_GPU)}")


if __name__ == "__main__":
    main()
