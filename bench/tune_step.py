"""The captured decode step's launch settings, tuned on the step itself: Llama-3.1-8B's architecture (random bf16
weights) at 128K, A2ATS offload="none" in CUDA graphs, each setting changed alone from the defaults and timed right
after a run of the defaults (the machine drifts more than most settings gain), then the best value of each together
at every batch that fits; ms per step, the GPU's busy time (its kernels summed) beside it (a kernel timed alone is
bound by its Python launch, so only the captured step can rank them).

    python -m bench.tune_step [--batch 1] [--budget kv_head] [--scoring distance] [--group-correlation 0.9]
                              [--settings COUNT_COPIES ...]

(GPU only; writes bench/results/tune-step/<date>-<commit>-<gpu>.json after every row)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from a2ats_hf import A2ATSCache
from a2ats_hf.kernels import triton_attention, triton_codes, triton_launch, triton_topk
from bench.common import (
    build,
    correlate_groups,
    environment,
    group_correlation_argument,
    random_codebooks,
    release,
    results_path,
)
from bench.throughput import arguments, measure

SETTINGS = {  # (module, constant): values to try; the module's own value is the default
    (triton_attention, "PROGRAMS_PER_UNIT"): [4, 16], (triton_attention, "MIN_SPLIT_KEYS"): [64, 256],
    (triton_attention, "BLOCK_KEYS"): [16, 64], (triton_attention, "WARPS"): [2, 8],
    (triton_codes, "ENCODE_PROGRAMS_PER_UNIT"): [1, 4], (triton_codes, "ENCODE_WARPS"): [4],
    (triton_codes, "LUT_BLOCK_M"): [16, 32], (triton_topk, "SCAN_BLOCK"): [256, 1024],
    (triton_topk, "THRESHOLD_WARPS"): [4, 16], (triton_topk, "COUNT_COPIES"): [4, 16],
    (triton_topk, "SPLIT_COLUMNS"): [1024, 2048], (triton_topk, "SPLIT_WARPS"): [4, 16],
    (triton_topk, "KEEP_WARPS"): [8], (triton_topk, "KEEP_DIGIT_BITS"): [2, 8], (triton_topk, "KEY_SPAN"): [True],
    (triton_topk, "SCORE_ROWS"): [16, 64], (triton_topk, "SCORE_WARPS"): [2, 8],
    (triton_topk, "KEEP_SCAN_BLOCK"): [512, 2048], (triton_topk, "SCAN_WARPS"): [2, 8],
    (triton_topk, "LOOK_BACK"): [32, 512],
    (triton_topk, "COUNT16_BYTES"): [0],  # a wide table's 16-bit keys counted in two rounds of 8 bits
    (triton_launch, "PDL"): [True],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--budget", default="kv_head", choices=["kv_head", "query_head"])
    parser.add_argument("--scoring", default="distance", choices=["distance", "wrope"])
    parser.add_argument("--rerank", type=int, default=1)
    group_correlation_argument(parser)
    parser.add_argument("--settings", nargs="+", choices=sorted(name for _, name in SETTINGS),
                        help="try only these constants (default: all)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or results_path("tune-step")
    run_args = arguments().parse_args(["--steps", str(args.steps), "--split-steps", "0", "--gpu-profile", "1"])
    model = build([0])
    correlate_groups(model, args.group_correlation)
    model.set_attn_implementation("a2ats")
    books = random_codebooks(centroids=4096, config=model.config)
    n, method = args.context, f"A2ATS offload=none {args.budget} {args.scoring} rerank {args.rerank} graphs"
    settings = {key: values for key, values in SETTINGS.items() if not args.settings or key[1] in args.settings}
    results = {"environment": environment(), "context": n, "method": method,
               "group_correlation": args.group_correlation, "rows": []}

    def step_ms(batch: int, label: str) -> float:
        make = lambda: A2ATSCache(books, topk=0.03, budget=args.budget, offload="none",  # noqa: E731
                                  scoring=args.scoring, rerank=args.rerank, max_length=n + args.steps + 8)
        try:
            row = measure(model, method, make, batch, n, run_args)
        finally:
            release(model.device)  # the cache and its graphs' memory pool, before the next
        ms, busy = row["step_ms"], row.get("gpu_profile", {}).get("busy_ms")
        results["rows"].append({"batch": batch, "setting": label, "step_ms": ms, "busy_ms": busy})
        print(f"batch {batch:2d}  {label:40s} {ms:7.2f} ms, GPU busy {busy} ms", flush=True)
        out.write_text(json.dumps(results, indent=1))  # after every row: an interrupted run keeps what it measured
        return ms

    tuned, others = args.batch[0], args.batch[1:]
    best = {}
    for (module, name), values in settings.items():
        original = getattr(module, name)
        for value in values:  # each value beside a defaults run just before it: the machine drifts ~5% a minute
            default = step_ms(tuned, "defaults")
            setattr(module, name, value)
            ms = step_ms(tuned, f"{module.__name__.rsplit('.', 1)[1]}.{name}={value}")
            setattr(module, name, original)
            if ms < 0.98 * default and ms / default < best.get((module, name), (None, 0.98))[1]:
                best[(module, name)] = (value, ms / default)  # past the run-to-run noise
    label = "best together: " + (", ".join(f"{name}={value}" for (_, name), (value, _) in best.items())
                                 or "none better")
    originals = {key: getattr(*key) for key in best}
    for batch in [tuned, *others]:
        try:
            step_ms(batch, "defaults")
        except MemoryError as error:  # a batch the GPU cannot hold at this context
            print(f"batch {batch:2d}  skipped: {error}", flush=True)
            continue
        for (module, name), (value, _) in best.items():
            setattr(module, name, value)
        step_ms(batch, label)
        for (module, name), value in originals.items():
            setattr(module, name, value)

if __name__ == "__main__":
    main()
