"""The evaluation suite on SmolLM2-135M-Instruct: RULER-style tasks hidden in the held-out *Persuasion*, answered by
full attention, A2ATS and the baselines (exact top-K oracle, Quest, random, sinks + window) at the same budget.

Codebooks: the demo's (1024 centroids, calibrated on Emma, Pride & Prejudice and Mansfield Park; built once).

    python bench/evaluation.py [--lengths 4096 8192] [--depths 0.25 0.75] [--topk 0.03] [--device cuda]
Writes bench/results/ruler-smollm2.json and prints a table (score per task and method; mean over tasks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from a2ats_hf.evaluation import TASKS, evaluate  # noqa: E402
from a2ats_hf.evaluation.suite import Method  # noqa: E402
from assets import austen_novels, smollm2_path  # noqa: E402
from demo import codebooks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--topk", type=float, nargs="+", default=[0.03])
    parser.add_argument("--scoring", nargs="+", default=["wrope", "oracle", "quest", "random"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ruler-smollm2.json")
    args = parser.parse_args()
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="a2ats").eval()
    model.to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    novels = austen_novels()
    books = codebooks(model, tokenizer, novels)
    methods = [Method()] + [Method(s, t) for t in args.topk for s in args.scoring] + [Method("window")]
    result = evaluate(model, tokenizer, books, novels["Persuasion"], methods, args.tasks, args.lengths, args.depths)
    result["codebooks"] = books.config_dict()
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']} s)\n")
    per_task = result["summary"]["per_task"]
    for length in args.lengths:
        print(f"| {length // 1024}K | " + " | ".join(args.tasks) + " | mean | vs full |")
        for m in methods:
            scores = [per_task.get(f"{m.name} | {t} | {length}", float("nan")) for t in args.tasks]
            key = f"{m.name} | {length}"
            print(f"| {m.name} | " + " | ".join(f"{s:.2f}" for s in scores) +
                  f" | {result['summary']['mean'][key]:.3f} | {result['summary']['relative_to_full'].get(key, float('nan')):.0%} |")


if __name__ == "__main__":
    main()
