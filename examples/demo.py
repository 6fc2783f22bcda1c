"""A2ATS demo on SmolLM2-135M-Instruct: find a fact buried deep inside a ~6K-token Jane Austen prompt.

Codebooks are built once from three novels (cached); the haystack comes from a fourth. Prints the answer with
A2ATS at topk=0.03 beside full attention's, the fraction of past tokens attended per step, and the bytes the
cache holds on the device and on the CPU.    Run: make demo
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from a2ats_eval.assets import NEEDLE, QUESTION, austen_novels, demo_codebooks, prompt_ids, smollm2_path
from a2ats_hf import A2ATSCache, cache_argument


def answer(model, tokenizer, ids, cache) -> tuple[str, float]:
    start = time.perf_counter()
    out = model.generate(ids, **cache_argument(model, cache), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return text.split("\n")[0], time.perf_counter() - start


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="a2ats")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    novels = austen_novels()
    books = demo_codebooks(model, tokenizer, novels)
    ids = prompt_ids(tokenizer, novels["Persuasion"]).to(device)
    print(f"Prompt: {ids.shape[1]} tokens of Persuasion; the needle sits at 60% depth: {NEEDLE!r}")
    print(f"Question: {QUESTION}\n")

    full, full_s = answer(model, tokenizer, ids, DynamicCache(config=model.config))
    cache = A2ATSCache(books, topk=0.03)
    sparse, sparse_s = answer(model, tokenizer, ids, cache)
    memory = cache.memory_footprint()
    full_kv = 2 * ids.shape[1] * model.config.num_hidden_layers * model.config.num_key_value_heads * 64 * 4
    print(f"full attention : {full!r}  ({full_s:.1f} s)")
    print(f"A2ATS topk=3%  : {sparse!r}  ({sparse_s:.1f} s)")
    print(f"\nA2ATS attended {cache.stats.attended_fraction:.1%} of past tokens per step "
          f"(sinks + window + {cache.stats.far_fraction:.1%} of far tokens per KV head).")
    print(f"Cache: {memory['device_bytes'] / 2**20:.2f} MiB on the model's device, {device} "
          "(codes, the distance scorer's columns and their histogram, sinks, window), "
          f"{memory['cpu_bytes'] / 2**20:.1f} MiB on the CPU (full K/V, allocated in blocks); "
          f"a full KV cache there would hold {full_kv / 2**20:.1f} MiB.")


if __name__ == "__main__":
    main()
