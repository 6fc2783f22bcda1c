"""CUDA check on a SmolLM2-shaped random-weight Llama (bf16): calibration on the GPU, exactness at topk=1.0 against
sdpa + DynamicCache, a left-padded batch, and wall time (prefill included; sdpa timed after a warm-up run), eager
(the CPU store) and graph-captured (the K/V on the GPU, :func:`a2ats_hf.graphs.capture_decoding`), also with the
model's norms and MLPs compiled (``compile_layers``: their rounding is Inductor's, so logits differ in the last bits).

Run on the GPU box:  python -m bench.cuda_check [--out FILE]
(writes bench/results/cuda-check/<date>-<commit>-<gpu>.json, and a copy under $OUT where that is set: a lent GPU's
way back)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import a2ats_hf  # noqa: F401
from a2ats_hf import A2ATSCache, cache_argument, calibrate
from a2ats_hf.graphs import capture_decoding, release_decoding
from a2ats_hf.kernels import cpu_attention
from bench.common import environment, results_path

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)


class IdTokenizer:
    """Text of space-separated integers -> those token ids (lets calibration run on random ids)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) % SMOLLM2["vocab_size"] for t in text.split()]}


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device, torch.bfloat16).eval()
    model.set_attn_implementation("a2ats")
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(map(str, torch.randint(1, 49152, (8192,), generator=gen).tolist())) for _ in range(8)]
    torch.cuda.reset_peak_memory_stats()
    books, calib_s = timed(lambda: calibrate(model, IdTokenizer(), texts, n_centroids=4096, max_tokens=65536,
                                              uuid_tokens=0, kmeans_iters=100, progress=False))
    results = {"environment": environment(), "calibration_s": round(calib_s, 1),
               "calibration_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
               "kmeans_iterations": books.calibration["kmeans_iterations"]}

    lengths = (6000, 4100)
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(1, 49152, (n,), generator=gen)
        mask[i, -n:] = 1
    ids, mask = ids.to(device), mask.to(device)
    new = 32

    def run(cache, attn):
        model.set_attn_implementation(attn)
        return timed(lambda: model.generate(ids, attention_mask=mask, **cache_argument(model, cache),
                                            max_new_tokens=new, do_sample=False, pad_token_id=0, output_scores=True,
                                            return_dict_in_generate=True))

    cpu_attention.extension()  # built once per machine, outside the timings
    run(DynamicCache(config=model.config), "sdpa")  # warm-up: CUDA kernels load on first use
    ref, ref_s = run(DynamicCache(config=model.config), "sdpa")
    rows = []
    for mode in ("eager", "graphs", "graphs+compile"):
        for topk in (1.0, 0.03):
            if mode.startswith("graphs"):
                capture_decoding(model, compile_layers=mode.endswith("+compile"))
                cache = A2ATSCache(books, topk=topk, offload="none", dense_below=0, max_length=ids.shape[1] + new)
            else:
                cache = A2ATSCache(books, topk=topk)
            try:
                out, secs = run(cache, "a2ats")
            finally:
                release_decoding(model)
            agree = (out.sequences == ref.sequences)[:, -new:].float().mean().item()
            first = (out.scores[0].float() - ref.scores[0].float()).abs().max().item()
            last = (out.scores[-1].float() - ref.scores[-1].float()).abs().max().item()
            rows.append({"mode": mode, "topk": topk, "token_agreement": agree, "first_logit_maxdiff": first,
                         "last_logit_maxdiff": last, "seconds": round(secs, 2),
                         "far_fraction": round(cache.stats.far_fraction, 4), **cache.memory_footprint()})
    results.update({"sdpa_seconds": round(ref_s, 2), "a2ats": rows})
    out = args.out or results_path("cuda-check")
    out.write_text(json.dumps(results, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
