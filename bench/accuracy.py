"""Accuracy of A2ATS on SmolLM2-135M-Instruct and a held-out Austen novel.

Codebooks are calibrated on three novels; windows of 4K and 8K tokens come from a fourth. For each window the
last 512 tokens are predicted one decode step at a time (teacher forcing) and we report their perplexity for
full attention, A2ATS at several budgets and both budget rules, and sinks + window alone; the recall of each
query head's exact top-K far tokens by A2ATS's selection; the softmax mass the attended tokens cover; and the
fraction of far tokens attended per KV head.

    python bench/accuracy.py                       # CPU, builds (and caches) 4096-centroid codebooks
    python bench/accuracy.py --device cuda         # same on a GPU
Writes bench/results/accuracy-smollm2.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from a2ats_hf import A2ATSCache, Codebooks, calibrate  # noqa: E402
from a2ats_hf.evaluation.fidelity import FidelityProbe  # noqa: E402
from assets import austen_novels, cache_dir, smollm2_path  # noqa: E402

CALIBRATION_NOVELS = ("Emma", "Pride & Prejudice", "Mansfield Park")
HELD_OUT = "Persuasion"


def tail_nll(model, ids: torch.Tensor, cache, tail: int) -> torch.Tensor:
    """NLL of the last ``tail`` tokens of ``ids`` [1, L]: prefill all but them, then one decode step per token.

    Without a cache (full attention), one exact forward pass gives the same logits."""
    with torch.no_grad():
        if cache is None:
            logits = model(ids).logits[0, -tail - 1 : -1].float()
            return torch.nn.functional.cross_entropy(logits, ids[0, -tail:], reduction="none")
        logits = [model(ids[:, :-tail], past_key_values=cache).logits[:, -1]]
        for t in range(ids.shape[1] - tail, ids.shape[1] - 1):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
    logits = torch.cat(logits).float()
    return torch.nn.functional.cross_entropy(logits, ids[0, -tail:], reduction="none")


def build_codebooks(model, tokenizer, novels, args) -> Codebooks:
    path = Path(args.codebooks or cache_dir() / f"codebooks/smollm2-bench-{args.n_centroids}")
    if (path / "a2ats_config.json").is_file():
        return Codebooks.from_pretrained(path)
    books = calibrate(model, tokenizer, [novels[t] for t in CALIBRATION_NOVELS], n_centroids=args.n_centroids,
                      max_tokens=args.max_tokens, uuid_tokens=args.uuid_tokens, kmeans_iters=args.kmeans_iters,
                      chunk_size=args.chunk_size)
    books.save_pretrained(path)
    return books


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codebooks", help="directory of existing codebooks (default: build and cache them)")
    parser.add_argument("--n-centroids", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--uuid-tokens", type=int, default=16384)
    parser.add_argument("--kmeans-iters", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=8192, help="calibration forward chunk")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--windows", type=int, default=2, help="held-out windows per context length")
    parser.add_argument("--tail", type=int, default=512, help="tokens scored at the end of each window")
    parser.add_argument("--probe-every", type=int, default=16, help="measure recall every N layer-steps")
    parser.add_argument("--methods", nargs="+", help="run only these methods (names as in the table)")
    parser.add_argument("--calibrate-only", action="store_true", help="build and cache the codebooks, then stop")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "accuracy-smollm2.json"))
    args = parser.parse_args()

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="a2ats")
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    novels = austen_novels()
    started = time.perf_counter()
    books = build_codebooks(model, tokenizer, novels, args)
    print(f"codebooks: {books.n_centroids} centroids, calibration {books.calibration}")
    if args.calibrate_only:
        return
    held_out = tokenizer(novels[HELD_OUT], return_tensors="pt")["input_ids"]

    methods = {
        "full attention": lambda: None,
        "sinks + window": lambda: A2ATSCache(books, scoring="window"),
        **{f"A2ATS {p:.0%}": (lambda p=p: A2ATSCache(books, topk=p)) for p in (0.01, 0.03, 0.05)},
        "A2ATS 3% kv_head": lambda: A2ATSCache(books, topk=0.03, budget="kv_head"),
    }
    if args.methods:
        methods = {name: make for name, make in methods.items() if name in args.methods}
    rows = []
    for context in args.contexts:
        starts = torch.linspace(0, held_out.shape[1] - context, args.windows).long().tolist()
        for name, make in methods.items():
            nll, probe, far = [], FidelityProbe(args.probe_every), []
            with probe:
                for s in starts:
                    cache = make()
                    nll.append(tail_nll(model, held_out[:, s : s + context].to(args.device), cache, args.tail))
                    if isinstance(cache, A2ATSCache):
                        far.append(cache.stats.far_fraction)
            row = {"context": context, "method": name, "perplexity": math.exp(torch.cat(nll).mean().item())}
            fidelity = probe.summary()
            for metric in ("recall", "mass", "output_error"):
                if metric in fidelity:
                    row[metric] = fidelity[metric]["mean"]
                    row[f"{metric}_per_layer"] = fidelity[metric]["per_layer"]
            if far:
                row["far_fraction_per_kv_head"] = sum(far) / len(far)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "device": args.device,
              "calibration": books.calibration, "n_centroids": books.n_centroids, "calibrated_on": CALIBRATION_NOVELS,
              "held_out": HELD_OUT, "windows_per_context": args.windows, "tail_tokens": args.tail,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'context':>8} {'method':<18} {'ppl':>7} {'recall':>7} {'mass':>6} {'out err':>7} {'far%':>6}")
    for r in rows:
        print(f"{r['context']:>8} {r['method']:<18} {r['perplexity']:7.2f} {r.get('recall', float('nan')):7.3f} "
              f"{r.get('mass', float('nan')):6.3f} {r.get('output_error', float('nan')):7.3f} "
              f"{100 * r.get('far_fraction_per_kv_head', float('nan')):6.2f}")


if __name__ == "__main__":
    main()
