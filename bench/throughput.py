"""Decode throughput of Llama-3.1-8B's architecture (random bf16 weights) at long contexts: A2ATS against what a
user of transformers would run instead, side by side on one GPU.

For each context: full attention (sdpa + DynamicCache) at the largest batch whose K/V fits on the GPU; transformers'
offloaded cache (DynamicCache(offloading=True): each layer's K/V comes over PCIe every step) at that batch; A2ATS at
topk=0.03 under both budget rules with the K/V on the GPU (offload="none", at full attention's batch), in CPU
memory (offload="cpu", at the largest batch CPU memory holds) and split layer by layer between them
(offload="auto", at the largest batch GPU and CPU memory together hold). Every cache is filled with N random tokens
per row
as a prefill would leave it (decode speed does not depend on the values, and a 128K prefill per method would cost
more device time than all the decoding), then decodes ``--steps`` tokens after ``--warmup``; tokens/s is the batch
over the median step. A2ATS's codebooks are random (4096 centroids per layer and KV head) for the same reason,
or calibrated on the random model's own keys with ``--calibrate-tokens``.
The split of an A2ATS step comes from a few more steps with each phase timed alone (synced, so not overlapped).

    python -m bench.throughput [--contexts 32768 65536 131072] [--out FILE]
    python -m bench.throughput --plot RESULTS... PNG      # only the figure, from these runs (later files win)

writes bench/results/throughput/<date>-<commit>-<gpu>.json (after every run, so an interrupted run keeps what it
measured) and prints a table; ``--tiny`` runs a small model on whatever device there is (a smoke run, its file
in a throughput-tiny folder beside throughput's).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

from a2ats_hf import A2ATSCache, cache_argument, calibrate, kernels, store
from a2ats_hf.graphs import GRAPH_SCORERS, capture_decoding, release_decoding
from a2ats_hf.kernels import cpu_attention
from a2ats_hf.scoring import DistanceBuckets, Scorer, scorer_of
from a2ats_hf.store import available_memory, hugetlb_pool, kv_bytes, meminfo
from bench.common import (
    LLAMA31_8B,
    WordTokenizer,
    build,
    correlate_groups,
    environment,
    gpu_profile,
    group_correlation_argument,
    hits_since,
    random_codebooks,
    release,
    results_path,
    step_timeline,
    sync,
    texts,
)
from bench.kernels_bench import bandwidths, phase_timers
from bench.report import throughput_table

ROW_CACHE_WARMUP = 12  # extra warm-up steps with a row cache: a step fills at most an eighth of its slots
TINY = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=8192)


def kv_bytes_per_row(config, n: int) -> int:
    """One row's bf16 K/V over every layer, as one buffer (the device's; full attention's)."""
    return config.num_hidden_layers * kv_bytes(1, config.num_key_value_heads, config.head_dim, torch.bfloat16, n, 1)


def fill(model, cache, batch: int, n: int) -> None:
    """Every layer's cache as a prefill of N tokens per row leaves it, from random post-RoPE K/V (a StaticCache at
    the prompt's cache positions)."""
    config, device = model.config, model.device
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, config.num_key_value_heads, n, config.head_dim)
    positions = torch.arange(n, device=device)[None]
    valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    for idx, block in enumerate(model.model.layers):
        keys, values = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
        extra = {"cache_position": positions[0]} if isinstance(cache, StaticCache) else None
        keys, values = cache.update(keys, values, idx, extra)
        if isinstance(cache, A2ATSCache):  # what the "a2ats" attention does after storing a prompt's K/V
            layer = cache.layers[idx]
            layer.awaiting_attention = False
            rope = cache.bind(block.self_attn)
            if layer.first:
                cache.pass_memo.clear()
            layer.append_codes(keys, positions, rope)
            if layer.first:
                cache.record_validity(valid)
            layer.set_first_tokens(valid, keys, values)
        del keys, values


def kv_budget(device: torch.device, config, batch: int, n: int) -> int | None:
    """offload="auto"'s device budget here: what is free less the prompt's temporaries (one layer's random K/V and
    the float32 copies its encoding makes, ~8 layers' K/V in all, as a real prompt's activations would take) and
    4 GiB for decoding."""
    if device.type != "cuda":
        return None
    per_layer = kv_bytes(batch, config.num_key_value_heads, config.head_dim, torch.bfloat16, n, 1)
    return max(torch.cuda.mem_get_info(device)[0] - 8 * per_layer - 4 * 2**30, 0)


def decode(model, cache, batch: int, n: int, steps: int, warmup: int, split_steps: int, profile: bool = False,
           kernel_profile: int = 0, fresh_tokens: bool = False, timeline: int = 0) -> dict:
    """Median seconds per decode step over ``steps`` after ``warmup``, and (for A2ATS) the split of a step and, with
    ``profile``, the host's time by function (with ``kernel_profile``, the GPU's top that many kernels; with
    ``timeline``, where that many synced steps' wall time goes: :func:`bench.common.step_timeline`). Every step
    decodes one token at one position (so a step's picks repeat the last step's almost exactly), or with
    ``fresh_tokens`` a new random token (so they barely do)."""
    device = model.device
    token = torch.full((batch, 1), 7, device=device)
    kwargs = cache_argument(model, cache)
    if isinstance(cache, StaticCache):
        kwargs["cache_position"] = torch.tensor([n], device=device)
    position = torch.full((batch, 1), n, device=device)  # as generate passes it (the graph runner needs it)

    def step():
        with torch.no_grad():
            if fresh_tokens:
                token.random_(3, model.config.vocab_size)
            model(token, position_ids=position, use_cache=True, **kwargs)

    for _ in range(warmup):
        step()
    rows_cached = isinstance(cache, A2ATSCache) and bool(cache.row_cache)
    counted = cache.row_cache_counts() if rows_cached else None
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    result = {"step_ms": round(1e3 * sorted(times)[len(times) // 2], 2), "steps": steps}
    if isinstance(cache, A2ATSCache):
        result["row_cache"] = cache.row_cache  # as the placement settled it (the library's default chooses)
    if rows_cached:  # over the timed steps (the warm-up filled the slots)
        result["row_cache_hits"] = round(hits_since(cache, counted), 4)
    if isinstance(cache, A2ATSCache) and device.type == "cuda" and split_steps:
        split: dict = {}
        selected_before = cache.stats.far_selected
        counted = cache.row_cache_counts() if rows_cached else None
        sync(device)
        start = time.perf_counter()
        with phase_timers(split):
            for _ in range(split_steps):
                step()
        serial = (time.perf_counter() - start) / split_steps
        result["split_ms"] = {k: round(1e3 * v / split_steps, 2) for k, v in split.items()}
        result["split_ms"]["rest (model, transfers, small ops)"] = round(
            1e3 * serial - sum(result["split_ms"].values()), 2)
        result["far_fraction"] = round(cache.stats.far_fraction, 4)
        if "CPU attention" in split:  # the rows it gathered a step (each a key and a value), over its time
            offloaded = next(layer.store for layer in cache.a2ats_layers if not layer.store.resident)
            row_bytes = 2 * offloaded.shape[-1] * offloaded.dtype.itemsize
            gathered = (cache.stats.far_selected - selected_before) * row_bytes / split_steps
            gathered *= 1 - cache.gpu_share  # the CPU's share (a share of each list's width: of its rows, ~)
            if rows_cached:  # the misses only, over these steps
                gathered *= 1 - hits_since(cache, counted)
            result["cpu_attention_gbs"] = round(gathered / (split["CPU attention"] / split_steps) / 1e9, 1)
    if profile:
        result["host_profile"] = host_profile(step)
    if kernel_profile and device.type == "cuda":
        result["gpu_profile"] = gpu_profile(step, device, top=kernel_profile)
    if timeline and device.type == "cuda":
        result["timeline"] = step_timeline(step, device, steps=timeline)
    return result


def host_profile(step, steps: int = 4, top: int = 30) -> list:
    """Where the host's time goes in a decode step: the functions with the most time of their own under cProfile
    (ms per step; CUDA calls that wait on the GPU count as their caller's), printed and returned."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [step() for _ in range(steps)])
    stats = pstats.Stats(profiler)
    rows = sorted(((own, calls, f"{Path(file).name}:{line} {name}") for (file, line, name), (_, calls, own, _, _)
                   in stats.stats.items()), reverse=True)[:top]
    for own, calls, where in rows:
        print(f"  {1e3 * own / steps:7.3f} ms/step {calls // steps:6d} calls/step  {where}")
    return [[where, round(1e3 * own / steps, 3), calls // steps] for own, calls, where in rows]


def measure(model, method: str, make_cache, batch: int, n: int, args) -> dict:
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu_before, huge_before, pool_before = available_memory() or 0, meminfo("AnonHugePages") or 0, hugetlb_pool()[0]
    start = time.perf_counter()
    cache = make_cache()
    fill(model, cache, batch, n)
    sync(device)
    row = {"context": n, "method": method, "batch": batch, "fill_s": round(time.perf_counter() - start, 1),
           "huge_pages_gib": round(((meminfo("AnonHugePages") or 0) - huge_before) / 2**30, 1),  # the fill's THP
           "hugetlb_gib": round((pool_before - hugetlb_pool()[0]) / 2**30, 1)}  # and hugetlb pool pages
    steps = args.steps if "offloaded" not in method else max(4, args.steps // 4)  # ~1 s a step at the largest batch
    forward = model.forward
    if "graphs" in method:
        capture_decoding(model, compile_layers=method.endswith("+compile"), halves=not args.no_halves)
    elif "torch.compile" in method:
        model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    try:
        resident = "graphs" in method and "offload=none" in method  # (a replay of such a step calls no kernel)
        warmup = args.warmup + ROW_CACHE_WARMUP * ("row cache" in method)
        row.update(decode(model, cache, batch, n, steps, warmup, 0 if resident else args.split_steps,
                          args.profile, args.gpu_profile, args.fresh_tokens, args.timeline))
    finally:
        release_decoding(model)
        model.__dict__.pop("forward", None)
        if "compile" in method:  # its graphs' memory pool and compiled code would stay for the next method
            torch.compiler.reset()
    if isinstance(cache, A2ATSCache) and cache.rerank > 1:
        row["candidate_union"] = candidate_union(model, cache, batch, n)
    row["tokens_per_s"] = round(batch * 1e3 / row["step_ms"], 2)
    if device.type == "cuda":
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    row["cpu_gib"] = round(max(cpu_before - (available_memory() or 0), 0) / 2**30, 1)
    return row


def candidate_union(model, cache: A2ATSCache, batch: int, n: int) -> float:
    """Re-ranking's candidates a (row, KV head) holds over the device layers, in heads' worth of R x the budget (a
    group of query heads unites its picks): one more decode step, eager, each select's pool watched before its
    keep."""
    seen, select = [], kernels.select_topk

    def watched(*args, keep=None, **kwargs):
        if keep is None:
            return select(*args, **kwargs)
        indices, counts, scores = select(*args, **kwargs)
        seen.append(float(counts.float().mean() / (cache.rerank * keep.k.float().mean())))
        return kernels.keep_top(indices, counts, scores, keep.k, keep.k_max, keep.budget, keep.key_bits)

    kernels.select_topk = watched
    try:
        with torch.no_grad():
            model(torch.full((batch, 1), 7, device=model.device), use_cache=True,
                  position_ids=torch.full((batch, 1), n, device=model.device), **cache_argument(model, cache))
    finally:
        kernels.select_topk = select
    return round(sum(seen) / max(len(seen), 1), 3)


def scorer(name: str) -> Scorer:
    """A scorer from its name, or "distance:P" for the distance scorer with P buckets per octave."""
    kind, _, per_octave = name.partition(":")
    return DistanceBuckets(per_octave=int(per_octave)) if kind == "distance" and per_octave else scorer_of(name)


def plot(files: list[Path], path: Path) -> None:
    """Tokens/s against context, one line per method (its latest run at each context: later files win)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(f.read_text()) for f in files]
    best = {(r["method"], r["context"]): r for part in results for r in part["runs"] if "tokens_per_s" in r}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in dict.fromkeys(m for m, _ in best):
        rows = sorted((r for (m, _), r in best.items() if m == method), key=lambda r: r["context"])
        ax.plot([r["context"] / 1024 for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=method)
        for r in rows:
            ax.annotate(f"b={r['batch']}", (r["context"] / 1024, r["tokens_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
    ax.set(xscale="log", yscale="log", xlabel="context (K tokens)", ylabel="decode tokens/s (whole batch)",
           )
    ax.set_title(f"{results[0]['model']}, {results[0]['environment']['gpu']}", fontsize=9)
    ax.minorticks_off()
    contexts = sorted({n for _, n in best})
    ax.set_xticks([n / 1024 for n in contexts], [f"{n // 1024}K" for n in contexts])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"wrote {path}")


def arguments() -> argparse.ArgumentParser:
    """The benchmark's options (bench/tune_step.py times its steps with their defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072, 65536, 32768])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--split-steps", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+",
                        help="batches every method runs at, in turn (0: each method's largest, the default)")
    parser.add_argument("--cpu-fraction", type=float, default=0.7, help="share of available CPU memory offload may use")
    parser.add_argument("--methods", nargs="+", help="only these methods (names as printed)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the methods in turn this many times (a difference of a few percent needs them "
                             "alternated: one run's spread is as large)")
    parser.add_argument("--scoring", nargs="+", default=["wrope"],
                        help="A2ATS scorers to run (wrope, distance, distance:P for P buckets per octave)")
    parser.add_argument("--rerank", type=int, nargs="+", default=[1],
                        help="A2ATS re-ranking factors to run where the K/V is on the GPU (1: none)")
    parser.add_argument("--calibrate-tokens", type=int, default=0,
                        help="calibrate A2ATS's codebooks on this many tokens of the model's own keys (0: random)")
    parser.add_argument("--profile", action="store_true", help="profile the host side of each method's decode steps")
    parser.add_argument("--gpu-profile", type=int, nargs="?", const=12, default=0, metavar="TOP",
                        help="the GPU's busy share of a step and its TOP kernels (default 12)")
    parser.add_argument("--timeline", type=int, nargs="?", const=4, default=0, metavar="STEPS",
                        help="where STEPS synced steps' wall time goes: the host before the GPU's first kernel, the "
                             "GPU's span, the host after it (default 4)")
    parser.add_argument("--tiny", action="store_true", help="a small random model on any device (smoke run)")
    group_correlation_argument(parser)
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="pinned CPU blocks from CUDA's allocator, not on huge pages (an ablation)")
    parser.add_argument("--gpu-share", type=float, nargs="+", default=[0.0],
                        help="shares of an offloaded layer's rows the GPU attends itself over PCIe (A2ATSCache's "
                             "gpu_share; 0: the CPU attends them all; 1: none, and with --row-cache the GPU reads "
                             "the misses)")
    parser.add_argument("--row-cache", type=lambda v: None if v == "default" else float(v), nargs="+", default=[0.0],
                        help="budgets of recently picked rows an offloaded layer keeps on the GPU (A2ATSCache's "
                             "row_cache; 0: none; default: the library's, as it settles on this GPU)")
    parser.add_argument("--fresh-tokens", action="store_true",
                        help="a new random token every decode step, so picks barely repeat (the row cache's worst "
                             "case; by default one token repeats, its best)")
    parser.add_argument("--no-halves", action="store_true",
                        help="graph steps over offloaded layers as one batch, not two halves in a pipeline (ablation)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, nargs="+", metavar="RESULTS... PNG", help="only draw the figure")
    return parser


def main() -> None:
    parser = arguments()
    args = parser.parse_args()
    # a run past max_length times another path (the fragment tests/test_step.py pins in the library's warning)
    warnings.filterwarnings("error", message=r".*past this A2ATSCache's max_length=")
    if args.plot:
        return plot(args.plot[:-1], args.plot[-1])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store.PIN_ON_HUGE_PAGES = not args.no_huge_pages
    if args.tiny:
        config = TINY
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="a2ats").to(device).eval()
    else:
        config, model = LLAMA31_8B, build([0])
        model.set_attn_implementation("a2ats")
    correlate_groups(model, args.group_correlation)
    cpu_attention.extension()  # built outside the timings
    centroids = 64 if args.tiny else 4096
    if args.calibrate_tokens:  # random words through the random model: its own keys and queries
        model.set_attn_implementation("a2ats")
        books = calibrate(model, WordTokenizer(config.vocab_size), texts(), n_centroids=centroids,
                          max_tokens=args.calibrate_tokens, uuid_tokens=0, kmeans_iters=10, progress=False)
    else:
        books = random_codebooks(centroids=centroids, config=config)
    results = {"environment": environment(),
               "model": "tiny" if args.tiny else "Llama-3.1-8B architecture, random bf16 weights",
               "codebooks": f"calibrated on {args.calibrate_tokens} tokens" if args.calibrate_tokens else "random",
               "group_correlation": args.group_correlation,
               "pinned_on_huge_pages": store.PIN_ON_HUGE_PAGES, "halves": not args.no_halves,
               "fresh_tokens": args.fresh_tokens,
               "cpu_available_gib": round((available_memory() or 0) / 2**30, 1),
               "cpu_copy_gbs": bandwidths()["cpu_copy_gbs"], "runs": []}
    out = args.out or results_path("throughput-tiny" if args.tiny else "throughput")
    # tokens held (past max_length, gpu_share=1 would fall back to the CPU attention)
    steps_total = (args.warmup + ROW_CACHE_WARMUP + args.steps + args.split_steps + 2 + 4 * args.profile
                   + 8 * bool(args.gpu_profile) + args.timeline)
    for n, forced in [(n, batch) for n in args.contexts for batch in args.batch or [None]]:
        per_row = kv_bytes_per_row(config, n)
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            reserve = 4 * 2**30 + 3 * per_row // config.num_hidden_layers  # activations; DynamicCache's cat per layer
            full_batch = max(0, min(args.max_batch, (free - reserve) // per_row))
        else:
            full_batch = 2
        cpu_room = int(args.cpu_fraction * (available_memory() or 0))
        cpu_batch = max(1, min(args.max_batch, cpu_room // per_row))
        auto_batch = cpu_batch  # "auto": as many rows as the GPU's room and the CPU's together hold
        if device.type == "cuda":  # (less 4 GiB and ~8 layers' K/V of prompt temporaries on the GPU, as kv_budget)
            room, with_temporaries = free - 4 * 2**30 + cpu_room, per_row + 8 * per_row // config.num_hidden_layers
            auto_batch = max(cpu_batch, min(args.max_batch, room // with_temporaries))
        if forced:
            full_batch = cpu_batch = auto_batch = forced
        methods = [("full attention (sdpa + DynamicCache)", lambda: DynamicCache(config=config), full_batch, "sdpa"),
                   ("StaticCache + torch.compile", lambda: StaticCache(config=config, max_cache_len=n + steps_total),
                    full_batch, "sdpa"),
                   ("offloaded (DynamicCache offloading=True)",  # its K/V sits in host memory between steps
                    lambda: DynamicCache(config=config, offloading=True), min(full_batch, cpu_batch), "sdpa")]
        for offload, batch in (("none", full_batch), ("cpu", cpu_batch), ("auto", auto_batch)):
            for budget in ("query_head", "kv_head"):
                reranks = [r for r in args.rerank if r == 1 or offload != "cpu"]  # re-ranking reads device keys
                offloaded = [(f, 0.0) for f in args.gpu_share if f == 0 or offload != "none"]  # of offloaded rows
                # the CPU or (share 1) the GPU reads the misses; None: the library's default row cache
                offloaded += [(f, c) for c in args.row_cache for f in args.gpu_share
                              if c != 0 and f in (0, 1) and offload != "none"]
                for scoring, rerank, (share, held) in [(s, r, o) for s in args.scoring for r in reranks
                                                       for o in offloaded]:
                    name = (f"A2ATS offload={offload} {budget}" + ("" if scoring == "wrope" else f" {scoring}")
                            + ("" if rerank == 1 else f" rerank {rerank}") + (f" gpu share {share}" if share else "")
                            + ("" if held == 0 else " row cache " + ("default" if held is None else f"{held:g}")))
                    def make(o=offload, b=budget, s=scorer(scoring), rows=batch, r=rerank, f=share, c=held):
                        return A2ATSCache(books, topk=0.03, budget=b, offload=o, scoring=s, max_length=n + steps_total,
                                          gpu_kv_budget=kv_budget(device, config, rows, n) if o == "auto" else None,
                                          rerank=r, gpu_share=f, row_cache=c)
                    methods.append((name, make, batch, "a2ats"))
                    if scoring in GRAPH_SCORERS:  # offloaded layers: graph pieces around the CPU attention
                        methods.append((f"{name} graphs", make, batch, "a2ats"))
                        methods.append((f"{name} graphs+compile", make, batch, "a2ats"))
        unknown = sorted(set(args.methods or ()) - {method for method, *_ in methods})
        if unknown:  # a misspelt name would be skipped silently
            parser.error(f"no method named {', '.join(map(repr, unknown))} with these flags; they name: "
                         + ", ".join(repr(method) for method, *_ in methods))
        for method, make_cache, batch, attention in methods * args.repeat:
            if ((args.methods and method not in args.methods) or batch < 1
                    or (device.type == "cpu" and "offloaded" in method)):
                continue
            model.set_attn_implementation(attention)
            try:
                row = measure(model, method, make_cache, batch, n, args)
            except (torch.OutOfMemoryError, MemoryError, UserWarning) as error:
                row = {"context": n, "method": method, "batch": batch, "error": str(error)[:300]}
            release(device)
            print(json.dumps(row), flush=True)
            results["runs"].append(row)
            out.write_text(json.dumps(results, indent=1))
    # against the faster of the two full-attention baselines at each context, at whatever batch: the one a user
    # would pick
    print(f"\nwrote {out}\n\n{throughput_table(results['runs'], per_batch=False, memory=True)}")
    copy = results["cpu_copy_gbs"]
    for r in results["runs"]:
        if "cpu_attention_gbs" in r:
            print(f"{r['method']} b={r['batch']}: CPU attention {r['split_ms']['CPU attention']} ms a step, "
                  f"{r['cpu_attention_gbs']} GB/s gathered, {100 * r['cpu_attention_gbs'] / copy:.0f}% of the CPU's "
                  f"copy bandwidth ({copy} GB/s)")


if __name__ == "__main__":
    main()
