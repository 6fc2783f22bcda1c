"""The evaluation suite on SmolLM2-135M-Instruct and the Austen novels: RULER-style tasks hidden in the held-out
*Persuasion*, perplexity of its last 512 tokens of held-out windows, and attention fidelity per layer, for full
attention, A2ATS (both budget rules, windowed-RoPE and distance-bucketed scoring), the baselines (exact top-K
oracle, Quest, random, sinks + window) at every budget, and the ablations at 3% (plain k-means, post-RoPE keys,
256 / 1024 centroids, window and offset b; for distance scoring: buckets per octave, centre rotation, codebooks
weighted by the distance queries, window).

Codebooks are calibrated on Emma, Pride & Prejudice and Mansfield Park with the demo's settings but the centroid count
a user's `calibrate` defaults to (4096; the demo's 1024 and 256 are ablations), built once per variant into the asset
cache.

    python -m bench.evaluation --device cuda        # the whole suite (the tables and figures of docs/results.md)
    python -m bench.evaluation --lengths 4096 --topk 0.03 --no-ablations --samples 1   # a quicker cut
Per-prompt records accumulate in bench/results/raw/accuracy-smollm2.json (out of git): a rerun skips what that file
already holds, so an interrupted run resumes. After every cell the run's tracked summary (what the tables need:
means, paired standard errors, counts, the perplexity rows) goes to bench/results/evaluation/<date>-<commit>-<gpu>.json
(``--summary``; ``python -m bench.report --summarize RAW OUT`` writes it from the raw file alone). Point the suite's
line in bench/report.py's BLOCKS at a new summary, then ``python -m bench.report`` rewrites the tables of
docs/results.md and README.md and draws docs/figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from a2ats_eval import TASKS, Method, evaluate, evaluate_perplexity
from a2ats_eval.assets import CALIBRATION, austen_novels, codebooks_path, smollm2_path
from a2ats_eval.suite import summarize
from a2ats_hf import Codebooks, calibrate  # noqa: E402
from a2ats_hf.cache import RERANK
from bench.common import RESULTS, environment, results_path
from bench.report import summarize_run

CALIBRATION_NOVELS = ("Emma", "Pride & Prejudice", "Mansfield Park")
HELD_OUT = "Persuasion"
CENTROIDS = inspect.signature(calibrate).parameters["n_centroids"].default  # what a user's `calibrate` gives
VARIANTS = {  # codebook variant -> calibrate() arguments beyond the demo's; "default": calibrate's centroid count
    "default": {"n_centroids": CENTROIDS},
    "plain k-means": {"query_aware": False, "n_centroids": CENTROIDS},
    "post-RoPE keys": {"keys": "post_rope", "n_centroids": CENTROIDS},
    "256 centroids": {"n_centroids": 256},
    "1024 centroids": {},  # the demo's
    "distance moments": {"queries": "distance", "n_centroids": CENTROIDS},
}


def codebook_variants(model, tokenizer, novels, names) -> dict[str, Codebooks]:
    """The named variants' codebooks, calibrated once and cached (the 1024-centroid ones are the demo's)."""
    books = {}
    for name in names:
        overrides = VARIANTS[name]
        path = codebooks_path("smollm2-demo" if not overrides else f"smollm2-{name.replace(' ', '-')}")
        if not (path / "a2ats_config.json").is_file():
            print(f"calibrating the {name} codebooks into {path} ...", flush=True)
            texts = [novels[t] for t in CALIBRATION_NOVELS]
            calibrate(model, tokenizer, texts, **{**CALIBRATION, **overrides}).save_pretrained(path)
        books[name] = Codebooks.from_pretrained(path)
    return books


PROMPT = ("method", "length", "task", "depth", "seed")  # what names one RULER-style record


def methods_for(budgets: list[float], scorers: list[str], ablations: bool) -> list[Method]:
    """Full attention and sinks + window; the 3% methods first (the headline table), then the other budgets."""
    ordered = sorted(budgets, key=lambda t: (t != 0.03, t))
    methods = [Method(), Method("window")]
    for topk in ordered:
        methods += [Method(s, topk) for s in scorers] + [Method("wrope", topk, "kv_head")] * ("wrope" in scorers)
        methods += [Method("distance", topk, "kv_head", rerank=RERANK["kv_head"])] * ("distance" in scorers)
        methods += [Method(s, topk, rerank=r) for s in scorers if s in ("wrope", "distance") for r in (2, 4, 5, 6, 8)]
        if ablations and topk == 0.03:
            methods += [Method("wrope", topk, codebooks=v) for v in VARIANTS
                        if v not in ("default", "post-RoPE keys", "distance moments")]
            methods += [Method("postrope", topk, codebooks="post-RoPE keys")]
            methods += [Method("wrope", topk, window=w) for w in (32, 128, 256)]
            methods += [Method("wrope", topk, offset=b) for b in (0, 512, 8192)]
        if ablations and "distance" in scorers and topk == 0.03:
            methods += [Method("distance", topk, options=(("per_octave", k),)) for k in (2, 4)]
            methods += [Method("distance", topk, options=(("rotation", "center"),))]
            methods += [Method("distance", topk, codebooks=v) for v in ("distance moments", "plain k-means",
                                                                           "1024 centroids")]
            methods += [Method("distance", topk, window=w) for w in (128, 256)]
        if ablations and topk == 0.03:  # wider windows at the same tokens attended per step
            methods += [Method(s, topk, window=w, same_total=True) for s in scorers if s in ("wrope", "distance")
                        for w in (128, 256)]
            methods += [Method("distance", topk, sink=k) for k in (0, 32) if "distance" in scorers]
    return methods


def merge(parts: list[dict]) -> dict:
    """Result files of one suite as one, each record keeping the device it ran on: a RULER-style prompt (a
    perplexity cell) an earlier part already holds is not taken twice, so parts may split a cell's prompts (one
    ``--depths`` each, as parallel processes)."""
    merged = {**parts[0], "settings": dict(parts[0]["settings"])}
    for part in parts:
        for record in part["ruler"] + part["perplexity"]:
            record.setdefault("device", part["device"])
    for suite, fields in (("ruler", PROMPT), ("perplexity", ("method", "length"))):
        merged[suite], seen = [], set()
        for part in parts:
            found = {tuple(r[f] for f in fields) for r in part[suite]} - seen
            merged[suite] += [r for r in part[suite] if tuple(r[f] for f in fields) in found]
            seen |= found
    for key, value in merged["settings"].items():  # the lists the parts split (lengths, depths, methods' grids)
        if isinstance(value, list):
            merged["settings"][key] = sorted({v for part in parts for v in part["settings"][key]})
    merged["summary"] = summarize(merged["ruler"])
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--topk", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.1])
    parser.add_argument("--scoring", nargs="+", default=["wrope", "distance", "oracle", "quest", "random"])
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--depths", type=float, nargs="+", default=[0.125, 0.375, 0.625, 0.875])
    parser.add_argument("--samples", type=int, default=2, help="seeds per (task, length, depth)")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows per length for perplexity")
    parser.add_argument("--tail", type=int, default=512)
    parser.add_argument("--probe-every", type=int, default=8, help="fidelity measured every N decode attention calls")
    parser.add_argument("--batch-size", type=int, default=16, help="RULER prompts answered together")
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="RULER prompts are prefilled in chunks")
    parser.add_argument("--methods", nargs="+", help="run only these methods (names as printed)")
    parser.add_argument("--suites", nargs="+", choices=["ruler", "perplexity"], default=["ruler", "perplexity"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--shard", type=int, nargs=2, metavar=("K", "N"), default=(0, 1),
                        help="run every N-th method from the K-th (parallel processes, each with its own --out)")
    parser.add_argument("--calibrate-only", action="store_true", help="build the codebooks the methods need, then stop")
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these result files into --out, then stop")
    parser.add_argument("--out", type=Path, default=RESULTS / "raw" / "accuracy-smollm2.json",
                        help="the per-prompt records (resumed from)")
    parser.add_argument("--summary", type=Path, help="default: bench/results/evaluation/<date>-<commit>-<gpu>.json")
    args = parser.parse_args()

    if args.merge:
        merged = merge([json.loads(p.read_text()) for p in args.merge])
        args.out.write_text(json.dumps(merged, indent=1) + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 throughout, as on the CPU
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="a2ats")
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    novels = austen_novels()
    methods = [m for m in methods_for(args.topk, args.scoring, args.ablations)
               if not args.methods or m.name in args.methods]
    books = codebook_variants(model, tokenizer, novels, sorted({m.codebooks for m in methods}))
    if args.calibrate_only:
        return
    methods = methods[args.shard[0] :: args.shard[1]]
    held_out = tokenizer(novels[HELD_OUT], return_tensors="pt")["input_ids"]
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"ruler": [], "perplexity": []}
    result.update(environment=environment(), model="SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
                  calibrated_on=CALIBRATION_NOVELS, held_out=HELD_OUT,
                  codebooks={n: b.config_dict() for n, b in books.items()},
                  settings={k: v for k, v in vars(args).items()
                            if k not in ("out", "summary", "shard", "merge", "threads", "methods")},
                  device=torch.cuda.get_device_name(args.device) if "cuda" in args.device else "cpu")

    summary_path = args.summary or results_path("evaluation", None if args.device == "cpu" else result["device"])

    def save() -> None:
        result["summary"] = summarize(result["ruler"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        summary_path.write_text(json.dumps(summarize_run(result), indent=1) + "\n")

    def held(suite: str, method: Method, length: int) -> dict | None:
        """The first record the results already hold for (method, length) in ``suite``."""
        return next((r for r in result[suite] if r["method"] == method.name and r["length"] == length), None)

    for length in args.lengths:
        for method in methods:
            started = time.perf_counter()
            if "ruler" in args.suites and not held("ruler", method, length):
                answered = evaluate(model, tokenizer, books, novels[HELD_OUT], [method], args.tasks, [length],
                                    args.depths, range(args.samples), args.batch_size, args.prefill_chunk)
                result["ruler"] += answered["records"]
                save()
            if "perplexity" in args.suites and not held("perplexity", method, length):
                result["perplexity"] += evaluate_perplexity(model, books, held_out, [method], [length], args.windows,
                                                            args.tail, args.probe_every, progress=False)
                save()
            mean = (result["summary"]["mean"].get(f"{method.name} | {length}", float("nan"))
                    if "summary" in result else 0)
            ppl = held("perplexity", method, length) or {}
            print(f"{length:>5} {method.name:<40} ruler {mean:.3f}  ppl {ppl.get('perplexity', float('nan')):7.2f}  "
                  f"recall {ppl.get('recall', float('nan')):.3f}  mass {ppl.get('mass', float('nan')):.3f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"wrote {args.out} and {summary_path}")


if __name__ == "__main__":
    main()
