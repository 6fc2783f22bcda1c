"""A2ATS demo on SmolLM2-135M-Instruct: find a fact buried deep inside a ~6K-token Jane Austen prompt.

Codebooks are built once from three novels (cached); the haystack comes from a fourth. Prints the answer with
A2ATS at topk=0.03 beside full attention's, the fraction of past tokens attended per step, and the bytes the
cache holds on the device and on the CPU.    Run: make demo
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from a2ats_hf import A2ATSCache, Codebooks, cache_argument, calibrate

from assets import austen_novels, codebooks_path, smollm2_path

NEEDLE = "The secret code of the Elliot family safe is 7341."
QUESTION = "What is the secret code of the Elliot family safe?"
CALIBRATION = dict(n_centroids=1024, max_tokens=32768, uuid_tokens=8192, chunk_size=2048, kmeans_iters=20)


def codebooks(model, tokenizer, novels) -> Codebooks:
    path = codebooks_path("smollm2-demo")
    if not (path / "a2ats_config.json").is_file():
        print(f"Building codebooks once into {path} ...")
        texts = [novels[t] for t in ("Emma", "Pride & Prejudice", "Mansfield Park")]
        calibrate(model, tokenizer, texts, **CALIBRATION).save_pretrained(path)
    return Codebooks.from_pretrained(path)


def prompt_ids(tokenizer, novel: str, tokens: int = 6000, depth: float = 0.6) -> torch.Tensor:
    """``tokens`` tokens of ``novel`` with the needle at ``depth``, wrapped as a chat question."""
    ids = tokenizer(novel, add_special_tokens=False)["input_ids"][:tokens]
    cut = int(len(ids) * depth)
    document = tokenizer.decode(ids[:cut]) + "\n" + NEEDLE + "\n" + tokenizer.decode(ids[cut:])
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION} Answer with the number only."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


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
    books = codebooks(model, tokenizer, novels)
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
          "(codes, their histogram, sinks, window), "
          f"{memory['cpu_bytes'] / 2**20:.1f} MiB on the CPU (full K/V, allocated in blocks); "
          f"a full KV cache there would hold {full_kv / 2**20:.1f} MiB.")


if __name__ == "__main__":
    main()
