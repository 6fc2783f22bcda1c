"""Every results table of README.md and docs/results.md, and the figures in docs/figures, from bench/results.

    python -m bench.report                # rewrite the tables in place and draw the figures
    python -m bench.report --check        # exit 1 naming each table that differs from what its files give
    python -m bench.report --summarize RAW [OUT]   # an evaluation run's tracked summary from its raw records

A table lives in the markdown between ``<!-- report: NAME -->`` and ``<!-- /report -->``; BLOCKS below says which
results files feed each NAME (one line per table: a newer run replaces a table's source by editing its line), and
a line under each table names those files with their commit, GPU and library versions. The evaluation suite's
per-prompt records stay out of git (bench/results/raw/, written by bench/evaluation.py); what the tables need of
them (means per method, task and length, paired standard errors, counts) is in the tracked summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from a2ats_eval.suite import summarize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIGURES = ROOT / "docs" / "figures"
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]
BLOCK = re.compile(r"(<!-- report: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)
NAME = re.compile(r"^(?P<scoring>\w+) (?P<topk>[\d.]+)(?: \((?P<tags>.*)\))?$")
LABELS = {"wrope": "A2ATS (windowed RoPE)", "oracle": "exact top-K (oracle)", "quest": "Quest (16-token pages)",
          "random": "random", "postrope": "post-RoPE codebooks", "distance": "A2ATS, distance buckets"}
COLORS = {label: f"C{i}" for i, label in enumerate([*LABELS.values(), LABELS["wrope"] + ", per KV head"])}
HEADLINE = {  # the README's accuracy rows: method -> label
    "full": "full attention", "oracle 0.03": "exact top-K (oracle)",
    "distance 0.03": 'A2ATS, distance buckets (`scoring="distance"`, the default; K/V in CPU memory)',
    "wrope 0.03": 'A2ATS, windowed RoPE (`scoring="wrope"`, the paper\'s)',
    "quest 0.03": "Quest (16-token pages)", "window": "sinks + window only (StreamingLLM)"}
RERANKED_ROWS = {  # the README's re-ranking rows, beside full attention and the exact top-K on the same prompts
    "full": "full attention", "oracle 0.03": "exact top-K (oracle)",
    "distance 0.03 (rerank 6)": "A2ATS, distance buckets, the pool of `rerank=6` a KV group (the default)",
    "distance 0.03 (rerank 4)": "A2ATS, distance buckets, `rerank=4`, each head's own picks united (before a769a41)",
    "distance 0.03 (rerank 3)": "A2ATS, distance buckets, `rerank=3`",
    "distance 0.03 (rerank 2)": "A2ATS, distance buckets, `rerank=2`",
    "distance 0.03": "A2ATS, distance buckets, no re-ranking"}
POOL_ROWS = {"oracle 0.03": "exact top-K (oracle)",
             "distance 0.03 (rerank 6)": "A2ATS, distance buckets, the pool of `rerank=6` (the default)"}


def parse(method: str) -> tuple[str, float, str] | None:
    """(scoring, topk, tags) of a method name such as "wrope 0.03 (kv_head)"; None for full and window."""
    m = NAME.match(method)
    return (m["scoring"], float(m["topk"]), m["tags"] or "") if m else None


def at_length(table: dict[str, float], length: int) -> dict[str, float]:
    """A summary table's ("method | length" keyed) entries at ``length``, keyed by method."""
    return {k.split(" | ")[0]: v for k, v in table.items() if k.endswith(f"| {length}")}


def line(method: str) -> tuple[str, float] | None:
    """(line label, topk) of a method on the budget curves (no ablation tags; the two budget rules and each
    re-ranking factor apart)."""
    parsed = parse(method)
    tags = parsed[2].split(", ") if parsed and parsed[2] else []
    if not parsed or any(t != "kv_head" and not re.fullmatch(r"rerank \d+", t) for t in tags):
        return None
    label = LABELS.get(parsed[0], parsed[0]) + (", per KV head" if "kv_head" in tags else "")
    return label + "".join(f", rerank={t.split()[1]}" for t in tags if t.startswith("rerank")), parsed[1]


def budget_of(method: str) -> float | None:
    """The budget of a method on the budget curves, None for full attention, sinks + window and the ablations."""
    found = line(method)
    return None if found is None else found[1]


def curves(values: dict[str, float]) -> dict[str, list[tuple[float, float]]]:
    """{line label: [(budget %, value)]} for the methods on the budget curves."""
    lines = defaultdict(list)
    for method, value in values.items():
        if found := line(method):
            lines[found[0]].append((100 * found[1], value))
    return {label: sorted(points) for label, points in lines.items()}


def budget_table(cells: dict[str, str], title: str) -> str:
    """Scorers (rows) x budgets (columns) of per-method cells."""
    grid, budgets = defaultdict(dict), set()
    for method, cell in cells.items():
        if found := line(method):
            grid[found[0]][found[1]] = cell
            budgets.add(found[1])
    budgets = sorted(budgets)
    out = [f"| {title} | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    out += [f"| {label} | " + " | ".join(by.get(b, "-") for b in budgets) + " |" for label, by in grid.items()]
    return "\n".join(out)


def budgets_at_defaults(sweep: dict, earlier: dict) -> str:
    """The 4K budget table of a sweep at the library's defaults, with the 3% rows of an earlier run over the same
    windows."""
    at_3 = [r for r in earlier["perplexity"] if budget_of(r["method"]) == 0.03]
    return fidelity_budget_table(sweep["perplexity"] + at_3, 4096)


def fidelity_table(rows: list[dict], every_budget: bool = False) -> str:
    """Perplexity and fidelity of full attention, sinks + window and the 3% methods (other budgets: budget_table;
    ``every_budget``: the rows of every budget, for a comparison across budgets)."""
    rows = [r for r in rows if every_budget or budget_of(r["method"]) in (None, 0.03)]
    out = ["| length | method | perplexity | recall of exact top-K | attention mass | output error | attended |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["length"], r["method"] != "full", r.get("mass", 0))):
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("recall", "mass", "output_error")]
        attended = f"{100 * r['attended_fraction']:.1f}%" if "attended_fraction" in r else "-"
        attended = "100%" if r["method"] == "full" else attended
        out.append(f"| {r['length'] // 1024}K | {r['method']} | {r['perplexity']:.2f} | " + " | ".join(cells)
                   + f" | {attended} |")
    return "\n".join(out)


def paired_stderr(records: list[dict], method: str, length: int, reference: str = "full") -> tuple[float, float]:
    """Mean and standard error of the method's score minus ``reference``'s, over the prompts both answered (nan
    where fewer than two were: a shard of a run may hold no records of the reference)."""
    key = lambda r: (r["task"], r["depth"], r["seed"])  # noqa: E731
    base = {key(r): r["score"] for r in records if r["method"] == reference and r["length"] == length}
    d = [r["score"] - base[key(r)] for r in records
         if r["method"] == method and r["length"] == length and key(r) in base]
    if len(d) < 2:
        return float("nan"), float("nan")
    mean = sum(d) / len(d)
    return mean, (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def oracle_of(method: str) -> str | None:
    """The exact top-K at a retrieval method's budget ("oracle 0.03" for "distance 0.03 (rerank 3)")."""
    parsed = parse(method)
    return f"oracle {parsed[1]:g}" if parsed and parsed[0] != "oracle" else None


def summarize_run(raw: dict) -> dict:
    """An evaluation run without its per-prompt records: what the tables and figures need of them (means per
    method, task and length; per method and length the prompts answered, the paired standard error against full
    attention and, where the run holds the exact top-K at the method's budget, the paired difference from it and
    its standard error), beside the run's settings and its perplexity rows."""
    records = raw["ruler"]
    pairs = list(dict.fromkeys((r["method"], r["length"]) for r in records))
    prompts = defaultdict(int)
    for r in records:
        prompts[f"{r['method']} | {r['length']}"] += 1
    stderr = {f"{m} | {n}": paired_stderr(records, m, n)[1] for m, n in pairs if m != "full"}
    vs_oracle = {f"{m} | {n}": list(paired_stderr(records, m, n, oracle_of(m))) for m, n in pairs
                 if oracle_of(m) and (oracle_of(m), n) in pairs}
    return rounded({**{k: v for k, v in raw.items() if k != "ruler"},
                    "summary": {**summarize(records), "tasks": sorted({r["task"] for r in records}),
                                "prompts": dict(prompts), "paired_stderr": stderr,
                                **({"vs_oracle": vs_oracle} if vs_oracle else {})}})


def rounded(value, digits: int = 6):
    """``value`` with every float to ``digits`` significant digits (the tables show three; the file stays small)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return [rounded(v, digits) for v in value] if isinstance(value, list) else value


def ruler_tables(suite: dict) -> str:
    """Per length: score per task for each method at 3% (and full, window), mean, mean relative to full, and the
    standard error of the difference from full (paired over prompts)."""
    summary = suite["summary"]
    per_task, mean, relative, tasks = (summary[k] for k in ("per_task", "mean", "relative_to_full", "tasks"))
    out = []
    for length in lengths_of(summary):
        names = [m for m in at_length(mean, length) if parse(m) is None or parse(m)[1] == 0.03]
        out.append(f"| {length // 1024}K, 3% | " + " | ".join(t.replace("_", " ") for t in tasks)
                   + " | mean | vs full | ± s.e. |")
        out.append("|---" * (len(tasks) + 4) + "|")
        full = mean[f"full | {length}"]
        for m in sorted(names, key=lambda m: -mean[f"{m} | {length}"]):
            cells = [per_task.get(f"{m} | {t} | {length}") for t in tasks]
            se = "-" if m == "full" else f"{summary['paired_stderr'][f'{m} | {length}'] / full:.0%}"
            vs_full = relative.get(f"{m} | {length}", float("nan"))
            out.append(f"| {m} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                       + f" | {mean[f'{m} | {length}']:.3f} | {vs_full:.0%} | {se} |")
        out.append("")
    return "\n".join(out).strip()


def lengths_of(summary: dict) -> list[int]:
    """The prompt lengths a summary covers."""
    return sorted({int(k.rsplit(" | ", 1)[1]) for k in summary["mean"]})


def ruler_budget_tables(suite: dict) -> str:
    """Per length: the RULER mean (and its share of full attention's) of each scorer at each budget."""
    tables = []
    for length in lengths_of(suite["summary"]):
        relative = at_length(suite["summary"]["relative_to_full"], length)
        mean = at_length(suite["summary"]["mean"], length)
        tables.append(budget_table({m: f"{mean[m]:.3f} ({relative[m]:.0%})" for m in relative},
                                   f"{length // 1024}K: RULER mean (vs full)"))
    return "\n\n".join(tables)


def headline_accuracy(suite: dict) -> str:
    """The README's table: mean score and its share of full attention's for HEADLINE's methods at each length
    ("not run" where the run lacks a cell; a method it lacks at every length is left out)."""
    summary = suite["summary"]
    lengths, mean, relative = lengths_of(summary), summary["mean"], summary["relative_to_full"]
    out = ["| method (3%) | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    def cell(key: str) -> str:
        return f"{mean[key]:.3f} ({relative[key]:.0%})" if key in mean else "not run"

    out += [f"| {label} | " + " | ".join(cell(f"{m} | {n}") for n in lengths) + " |" for m, label in HEADLINE.items()
            if any(f"{m} | {n}" in mean for n in lengths)]
    return "\n".join(out)


def joined(runs: list[dict]) -> dict:
    """Runs of the suite at different lengths as one run's summary (their means, prompts and differences)."""
    summary = {}
    for run in runs:
        for key, value in run["summary"].items():
            summary[key] = {**summary.get(key, {}), **value} if isinstance(value, dict) else value
    return {"summary": summary}


def oracle_table(run: dict, rows: dict[str, str] = RERANKED_ROWS) -> str:
    """``rows``' methods of a run that holds the exact top-K: mean score, its share of the exact top-K's and the
    paired difference from it with its standard error, at each length."""
    summary, lengths = run["summary"], lengths_of(run["summary"])
    out = ["| method (3%) | " + " | ".join(f"{n // 1024}K: mean (of the exact top-K's), difference ± s.e."
                                         for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    def cell(method: str, length: int) -> str:
        key = f"{method} | {length}"
        if key not in summary["mean"]:
            return "not run"
        if key not in summary.get("vs_oracle", {}):
            return f"{summary['mean'][key]:.3f}"
        oracle = summary["mean"][f"{oracle_of(method)} | {length}"]
        diff, se = summary["vs_oracle"][key]
        return f"{summary['mean'][key]:.3f} ({summary['mean'][key] / oracle:.0%}), {diff:+.3f} ± {se:.3f}"

    out += [f"| {label} | " + " | ".join(cell(m, n) for n in lengths) + " |" for m, label in rows.items()
            if any(f"{m} | {n}" in summary["mean"] for n in lengths)]
    return "\n".join(out)


def fidelity_budget_table(rows: list[dict], length: int) -> str:
    """Perplexity / recall / mass of each scorer at each budget, at one length."""
    cells = {r["method"]: f"{r['perplexity']:.1f} / {r['recall']:.2f} / {r['mass']:.3f}"
             for r in rows if r["length"] == length and "recall" in r}
    return budget_table(cells, f"{length // 1024}K: perplexity / recall / mass")


def throughput_table(runs: list[dict], methods: str = "", per_batch: bool = True, memory: bool = False) -> str:
    """Decode speed per (context, method, batch) against the faster full attention (sdpa + DynamicCache or
    StaticCache + compile) at the same context and batch (``per_batch=False``: at the same context, whatever its
    batch); ``methods``: a regular expression the rows must match; ``memory``: peak GPU and CPU memory columns."""
    def base(r: dict) -> tuple[int, ...]:
        return (r["context"], r["batch"]) if per_batch else (r["context"],)

    full = defaultdict(float)
    for r in runs:
        if r["method"].startswith(("full", "StaticCache")) and "tokens_per_s" in r:
            full[base(r)] = max(full[base(r)], r["tokens_per_s"])
    extra = " peak GPU GiB | CPU GiB |" if memory else ""
    out = ["| context | method | batch | ms / step | tokens/s | vs full attention |" + extra,
           "|---" * (8 if memory else 6) + "|"]
    for r in runs:
        if not re.search(methods, r["method"]):
            continue
        if "tokens_per_s" not in r:
            error = "out of memory" if "out of memory" in r.get("error", "") else r.get("error", "failed")[:40]
            out.append(f"| {r['context'] // 1024}K | {r['method']} | {r['batch']} | {error} | | |"
                       + (" | |" if memory else ""))
            continue
        ratio = r["tokens_per_s"] / full[base(r)] if full[base(r)] else None
        out.append(f"| {r['context'] // 1024}K | {r['method']} | {r['batch']} | {r['step_ms']:.1f} | "
                   f"{r['tokens_per_s']:.1f} | " + (f"{ratio:.2f}x" if ratio else "-") + " |"
                   + (f" {cell('peak_gpu_gib', '{:.1f}')(r)} | {cell('cpu_gib', '{:.0f}')(r)} |" if memory else ""))
    return "\n".join(out)


def against_wrope(files: list[dict]) -> list[dict]:
    """Every run's rows, labelled with its commit and group correlation (``bench.throughput --group-correlation``),
    each with its step (and, where profiled, its GPU's busy time) over the mean windowed-RoPE one (a method naming
    neither "distance" nor "rerank") of the runs of the same commit at the same correlation; a variant labelled
    "<commit>-<what>" (``A2ATS_COMMIT``) against its commit's."""
    def key(f: dict) -> tuple:
        return f["environment"]["commit"].split("-")[0], f.get("group_correlation", 0.0)

    def busy(r: dict) -> float | None:
        return r.get("gpu_profile", {}).get("busy_ms")

    plain, plain_busy = defaultdict(list), defaultdict(list)
    for f in files:
        runs = [r for r in f["runs"] if "step_ms" in r and not re.search("distance|rerank", r["method"])]
        plain[key(f)] += [r["step_ms"] for r in runs]
        plain_busy[key(f)] += [busy(r) for r in runs if busy(r)]
    rows = []
    for f in files:
        mean = sum(plain[key(f)]) / len(plain[key(f)]) if plain[key(f)] else None
        mean_busy = sum(plain_busy[key(f)]) / len(plain_busy[key(f)]) if plain_busy[key(f)] else None
        rows += [{**r, "commit": f["environment"]["commit"], "rho": key(f)[1],
                  "excess": r["step_ms"] / mean - 1 if mean and "step_ms" in r else None, "busy_ms": busy(r),
                  "busy_excess": busy(r) / mean_busy - 1 if mean_busy and busy(r) else None} for r in f["runs"]]
    return rows


KINDS = ("full", "StaticCache", "offloaded", "offload=none", "offload=auto", "offload=cpu")


def by_kind(run: dict) -> tuple[int, int]:
    """Sort key of a throughput row: longest context first, then its method's kind in KINDS' order."""
    return -run["context"], next((i for i, kind in enumerate(KINDS) if kind in run["method"]), len(KINDS))


def table(rows: list[dict], columns: dict[str, Callable[[dict], str]]) -> str:
    """One line per row, one column per header, each cell what its function makes of the row."""
    out = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    out += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in rows]
    return "\n".join(out)


def cell(key: str, form: str = "{}") -> Callable[[dict], str]:
    """A column of the rows' ``key`` as ``form`` gives it, "-" where a row lacks it."""
    return lambda r: "-" if r.get(key) is None else form.format(r[key])


def kilo(key: str) -> Callable[[dict], str]:
    """A column of token counts in K (32768 -> "32K")."""
    return lambda r: f"{r[key] // 1024}K"


def phase(name: str, form: str) -> Callable[[dict], str]:
    """A column of one phase of a decode step's serial split, as ``form`` gives it, "-" where a step has none."""
    return lambda r: "-" if name not in r.get("split_ms", {}) else form.format(r["split_ms"][name])


TOPK = {"N": kilo("n"), "batch": cell("batch"), "MB read": cell("mb_read", "{:.1f}"),
        "Triton (wall)": cell("triton_us", "{:.0f} us"),
        "GPU busy": lambda r: f"{sum(r['device_us'].values()):.0f} us",  # the profiler's kernel times, summed
        "bound": cell("bound_us", "{:.1f} us"), "% HBM": cell("pct_hbm", "{:.1f}"),
        "`gather` + `torch.topk`": cell("torch_topk_us", "{:.0f} us"),
        "exact": lambda r: "yes" if r["matches_reference"] else "no"}
CPU_ATTENTION = {"N": kilo("n"), "batch": cell("batch"), "threads": cell("threads"),
                 "rows": lambda r: r.get("rows", "-") + (", pinned store" if r.get("pinned") else "")
                 + (f", {r['stores']} stores in turn" if r.get("stores", 1) > 1 else "")
                 + (f", after {r['pause_ms']:g} ms idle" if r.get("pause_ms") else ""),
                 "MB gathered": cell("mb_gathered", "{:.1f}"),
                 "C++ kernel": cell("cpp_ms", "{:.2f} ms"), "GB/s": cell("cpp_gbs", "{:.1f}"),
                 "% CPU bw": cell("pct_cpu_bw", "{:.0f}"), "torch reference": cell("reference_ms", "{:.2f} ms"),
                 "`index_select` + matmul": cell("index_select_ms", "{:.2f} ms")}
AGAINST_WROPE = {"commit": cell("commit"), "group correlation": cell("rho", "{:g}"), "method": cell("method"),
                 "ms / step": cell("step_ms", "{:.2f}"), "over windowed RoPE": cell("excess", "{:+.1%}"),
                 "candidates (heads' worth)": cell("candidate_union", "{:.2f}")}
BUSY_AGAINST_WROPE = {"commit": cell("commit"), "method": cell("method"), "ms / step": cell("step_ms", "{:.2f}"),
                      "over windowed RoPE": cell("excess", "{:+.1%}"), "GPU busy, ms": cell("busy_ms", "{:.2f}"),
                      "GPU busy over windowed RoPE": cell("busy_excess", "{:+.1%}")}


TIMELINE = {"commit": cell("commit"), "method": cell("method"), "ms / step": cell("step_ms", "{:.2f}"),
            "synced step, profiled": cell("wall", "{:.2f}"), "host before the GPU": cell("head", "{:.2f}"),
            "GPU span": cell("gpu_span", "{:.2f}"), "GPU busy": cell("busy", "{:.2f}"),
            "GPU idle in the span": cell("idle_in_span", "{:.2f}"), "host after": cell("tail", "{:.2f}")}


STEP_KERNELS = {"commit": cell("commit"), "method": cell("method"), "ms / step": cell("step_ms", "{:.2f}"),
                "GPU busy, ms": cell("busy_ms", "{:.2f}"), "kernels a step": cell("kernels_per_step")}


KEEP = {"version": cell("version"), "N": kilo("n"), "batch": cell("batch"), "candidates": cell("candidates"),
        "keep_top (16 warps)": cell("keep_top_us", "{:.1f} us"), "at 8 warps": cell("keep_top_8_warps_us", "{:.1f} us"),
        "its radix select alone": cell("select_us", "{:.1f} us"), "load floor": cell("floor_us", "{:.1f} us")}
RERANK_STEP = {"N": kilo("n"), "batch": cell("batch"), "rule": cell("rule"), "R": cell("rerank"), "keys": cell("keys"),
               "select + keep (GPU)": cell("gpu_us", "{:.1f} us"),
               "largest kernels": lambda r: ", ".join(f"{name.strip('_')} {us:.0f}" for name, us in
                                                      sorted(r["kernels_us"].items(), key=lambda kv: -kv[1])[:3])}
KEEP_SELECTS = {"version": cell("version"), "batch": cell("batch"), "candidates": cell("candidates"),
                "keep_top": cell("keep_top_us", "{:.1f} us"), "8 warps": cell("keep_top_8_warps_us", "{:.1f} us"),
                "2-bit digits": cell("keep_top_2_bit_digits_us", "{:.1f} us"),
                "8-bit digits": cell("keep_top_8_bit_digits_us", "{:.1f} us"),
                "16-bit keys": cell("keep_top_16_bit_keys_us", "{:.1f} us"),
                "32-bit keys": cell("keep_top_32_bit_keys_us", "{:.1f} us"),
                "load floor": cell("floor_us", "{:.1f} us")}
DEVICE_ATTENTION = {"N": kilo("n"), "batch": cell("batch"), "rows": cell("rows"),
                    "MB gathered": cell("mb_gathered", "{:.1f}"), "Triton": cell("triton_us", "{:.0f} us"),
                    "GB/s": cell("gbs", "{:.0f}"), "bound": cell("bound_us", "{:.1f} us"),
                    "sdpa over all rows": cell("sdpa_full_us", "{:.0f} us"), "max error": cell("max_error", "{:.1e}")}
DECODE_LAYER = {"N": kilo("n"), "batch": cell("batch"), "scorer": cell("scoring"),
                "A2ATS": cell("a2ats_ms", "{:.1f} ms"), "serial split": cell("serial_ms", "{:.1f} ms"),
                "GPU sdpa (K/V resident)": cell("gpu_sdpa_ms", "{:.2f} ms"),
                "offloaded (copy + sdpa)": cell("offloaded_ms", "{:.1f} ms"),
                "top-K": phase("top-K", "{:.2f} ms"), "CPU attention": phase("CPU attention", "{:.2f} ms"),
                "encode, transfers, small ops": phase("encode, transfers, bookkeeping", "{:.1f} ms")}
CUDA_CHECK = {"": cell("label"), "greedy tokens equal to sdpa": cell("token_agreement", "{:.0%}"),
              "far tokens attended per KV head": cell("far_fraction", "{:.1%}"),
              "device bytes": cell("device_bytes", "{:.3g} MB"), "CPU bytes": cell("cpu_bytes", "{:.3g} MB"),
              "wall time (incl. prefill)": cell("seconds", "{:.2f} s")}
MULTI_GPU = {"GPUs": cell("gpus"), "context": kilo("context"), "method": cell("method"),
             "decode ms / token": cell("decode_ms", "{:.0f}"), "tokens/s": cell("tokens_per_s", "{:.1f}"),
             "prefill": cell("prefill_s", "{:.1f} s"),
             "peak GPU per card (incl. prefill)": lambda r: " / ".join(f"{g:.1f}" for g in
                                                                       r["peak_gpu_gib"][:r["gpus"]]) + " GiB",
             "K/V in CPU memory": cell("cpu_kv_gib", "{:.1f} GiB")}
GREEDY_CHECK = {"GPUs": cell("gpus"), "dtype": cell("dtype"),
                "same greedy tokens": lambda r: f"{r['same_greedy_tokens']} of {r['of']}",
                "largest logit difference while equal": lambda r: f"{r['max_logit_diff']:.2g}".replace("e-0", "e-"),
                "sdpa's top-2 margin where they part": lambda r: margin(r.get("sdpa_top2_margin_where_they_part"))}


OFFLOADED = {"context": kilo("context"), "method": cell("method"), "batch": cell("batch"),
             "blocks on huge pages": lambda r: "yes" if r["huge_pages"] else "no",
             "two halves in a pipeline": lambda r: (("yes" if r["halves"] and r["batch"] > 1
                                                          and "gpu share 1.0" not in r["method"] else "no")
                                                  if "graphs" in r["method"] else "-"),  # (share 1: no CPU part)
             "ms / step": cell("step_ms", "{:.1f}"), "tokens/s": cell("tokens_per_s", "{:.1f}"),
             "decode tokens": lambda r: "fresh" if r["fresh"] else "one, repeated",
             "row cache found": lambda r: f"{r['row_cache_hits']:.0%}" if "row_cache_hits" in r else "-",
             "CPU attention": phase("CPU attention", "{:.1f} ms"), "gathered": cell("cpu_attention_gbs", "{} GB/s"),
             "of the CPU's copy bandwidth": lambda r: (f"{r['cpu_attention_gbs'] / r['copy_gbs']:.0%}"
                                                       if r.get("cpu_attention_gbs") else "-")}


REUSE = {"length": kilo("length"), "method": cell("method"), "reuse of the last step": cell("reuse", "{:.2f}"),
         "of the last 8 steps": cell("reuse_of_8_steps", "{:.2f}"),
         "their union, in budgets": cell("union_of_8_steps", "{:.2f}")}


def reuse_rows(result: dict) -> tuple[list[dict], dict[str, Callable[[dict], str]]]:
    """A selection-reuse run's rows and columns: reuse, then an LRU cache's misses at each capacity measured."""
    capacities = result["rows"][0]["lru_misses"]
    misses = {f"misses, {float(c):g} budget{'s' * (float(c) != 1)}": (lambda r, c=c: f"{r['lru_misses'][c]:.1%}")
              for c in capacities}
    found = {f"`row_cache={float(c):g}` found": (lambda r, c=c: f"{r['row_cache_hits'][c]:.1%}"
                                                if c in r.get("row_cache_hits", {}) else "-")
             for c in result["rows"][0].get("row_cache_hits", {})}
    return result["rows"], {**REUSE, **misses, **found}


def offloaded_rows(files: list[dict]) -> list[dict]:
    """The throughput rows of offloaded runs, each with its run's huge-page, pipeline and decode-token settings (runs
    before the pipeline had none) and CPU copy bandwidth."""
    return [{**r, "huge_pages": f["pinned_on_huge_pages"], "halves": f.get("halves", False),
             "fresh": f.get("fresh_tokens", False), "copy_gbs": f["cpu_copy_gbs"]} for f in files for r in f["runs"]]


def margin(value: float | None) -> str:
    """sdpa's top-2 logit margin at the first differing token: "-" where none differs, "a tie" at 0."""
    return "-" if value is None else f"{value:.2f}" + (" (a tie)" if value == 0 else "")


def cuda_check_rows(check: dict) -> list[dict]:
    """A CUDA check's rows: sdpa's wall time, then each A2ATS run with bytes in MB."""
    return [{"label": "sdpa + DynamicCache", "seconds": check["sdpa_seconds"]}] + [
        {**r, "label": f"A2ATS topk={r['topk']}", "device_bytes": r["device_bytes"] / 1e6,
         "cpu_bytes": r["cpu_bytes"] / 1e6} for r in check["a2ats"]]


@dataclass(frozen=True)
class Block:
    """One generated table: the results files it is drawn from (relative to bench/results) and how."""

    sources: tuple[str, ...]
    table: Callable[[list[dict]], str]


SUITE = "evaluation/2026-11-25-353302f-nvidia-h100-80gb-hbm3.json"  # RULER + perplexity, H100 (some cells: CPU)
DEFAULTS = "evaluation/2026-12-04-00a485c-nvidia-h200.json"  # 3%, calibrate's 4096 centroids, H200
POOL_CPU = "evaluation/2026-12-06-a769a41-cpu.json"  # re-ranking's pool against each head's picks united, 4K and 8K
POOL5_CPU = "evaluation/2026-12-07-61a4b0a-cpu.json"  # the pool of 5 x the budget, 4K and 8K
POOL_RULER_CPU = ("evaluation/2026-12-07-c2c2525-cpu.json",  # RULER-style, 64 prompts: the pool of 6, exact top-K; 4K
                  "evaluation/2026-12-07-d37e73a-cpu.json")  # 8K
RERANKED = ("evaluation/2026-12-06-9e97ee7-nvidia-h100-80gb-hbm3.json",  # 256 prompts: full, exact top-K, rerank=2-4
            "evaluation/2026-12-07-66e6c0a-nvidia-h100-80gb-hbm3.json")  # the same prompts: the pool of 6, exact top-K
ROW_CACHE = tuple(f"throughput/2026-12-05-17592c7-nvidia-h200{s}.json" for s in ("", "-2"))  # 128K x 1, x 5
ROW_CACHE_H100 = tuple(f"throughput/2026-12-05-c3491b8-nvidia-h100-80gb-hbm3{s}.json" for s in ("", "-2", "-3"))
SCORING_COST = "throughput/2026-12-04-00a485c-nvidia-h200.json"  # 128K x 1 and x 7: the scorers, re-ranking
FIDELITY_CPU = "evaluation/2026-11-26-5127197-cpu.json"  # perplexity and fidelity against budget at 4K, CPU
REUSE_CPU = "selection-reuse/2026-12-05-91a80ea-cpu.json"  # SmolLM2, Persuasion: how much each step's pick repeats
H200 = tuple(f"throughput/2026-12-02-e01eae0-nvidia-h200{s}.json" for s in ("-3", "", "-2"))  # 128K x 7, x 1, 2K
CUDA_CHECK_H100 = "cuda-check/2026-11-25-353302f-nvidia-h100-80gb-hbm3.json"
KERNELS = "kernels/2026-11-25-353302f-nvidia-h100-80gb-hbm3.json"  # top-K, CPU attention, one layer's step (v19)
H100 = tuple(f"throughput/2026-11-26-6981eb1-nvidia-h100-80gb-hbm3{s}.json" for s in ("", "-2"))  # run 6; -2: 32K x 13
MULTI_GPU_H100 = "multi-gpu/2026-11-25-e2b5eb2-nvidia-h100-80gb-hbm3.json"  # one H100 and two, and greedy checks
BLOCKS = {  # table name in the markdown -> its results files; a newer run replaces one by editing its line
    "speed": Block(H200, lambda f: throughput_table(runs(f), r"^(full|StaticCache)|graphs")),
    "accuracy": Block((DEFAULTS,), lambda f: headline_accuracy(f[0])),
    "accuracy-reranked": Block(RERANKED, lambda f: oracle_table(joined(f))),
    "accuracy-pool-cpu": Block(POOL_RULER_CPU, lambda f: oracle_table(joined(f), POOL_ROWS)),
    "accuracy-1024": Block((SUITE,), lambda f: headline_accuracy(f[0])),
    "fidelity-defaults": Block((DEFAULTS,), lambda f: fidelity_table(f[0]["perplexity"])),
    "throughput-h200": Block(H200, lambda f: throughput_table(runs(f))),
    "throughput-h200-compile": Block(("throughput/2026-12-02-026103d-nvidia-h200.json",),
                                     lambda f: throughput_table(runs(f))),
    "throughput-h200-scoring": Block(("throughput/2026-12-02-4fc5d32-nvidia-h200.json",),
                                     lambda f: throughput_table(runs(f))),
    "throughput-h200-scoring-cost": Block((SCORING_COST,), lambda f: throughput_table(runs(f))),
    "throughput-h200-offloaded": Block(tuple(f"throughput/2026-12-04-7c4d3f1-nvidia-h200{s}.json" for s in ("", "-2")),
                                       lambda f: table(offloaded_rows(f), OFFLOADED)),
    "throughput-h200-row-cache": Block(ROW_CACHE, lambda f: table(offloaded_rows(f), OFFLOADED)),
    "throughput-h100-row-cache": Block(ROW_CACHE_H100, lambda f: table(offloaded_rows(f), OFFLOADED)),
    "throughput-h100-rerank-cost": Block(("throughput/2026-12-05-c3491b8-nvidia-h100-80gb-hbm3-4.json",),
                                         lambda f: throughput_table(runs(f))),
    "throughput-h100-row-cache-share": Block(tuple(f"throughput/2026-12-05-b68fa75-nvidia-h100-80gb-hbm3{s}.json"
                                                   for s in ("-3", "-4")),
                                             lambda f: table(offloaded_rows(f), OFFLOADED)),
    "throughput-h100-scoring-cost": Block(("throughput/2026-12-05-b68fa75-nvidia-h100-80gb-hbm3.json",),
                                          lambda f: throughput_table(runs(f))),
    "throughput-h100-scoring-cost-relaxed": Block(("throughput/2026-12-05-99c9481-nvidia-h100-80gb-hbm3.json",),
                                                  lambda f: throughput_table(runs(f))),
    "throughput-h100-scoring-cost-packed": Block(tuple(f"throughput/2026-12-05-018f3ee-nvidia-h100-80gb-hbm3{s}.json"
                                                       for s in ("", "-2")), lambda f: throughput_table(runs(f))),
    "throughput-h100-auto": Block(("throughput/2026-12-05-99c9481-nvidia-h100-80gb-hbm3-3.json",),
                                  lambda f: throughput_table(runs(f), per_batch=False, memory=True)),
    "kernels-cpu-attention-h100-rows": Block(("kernels/2026-12-05-99c9481-nvidia-h100-80gb-hbm3.json",),
                                             lambda f: table(f[0]["cpu_attention"], CPU_ATTENTION)),
    "kernels-keep-h100": Block(tuple(f"kernels/2026-12-05-4d11df0-nvidia-h100-80gb-hbm3{s}.json" for s in ("", "-2")),
                               lambda f: table(versioned(f, "keep"), KEEP)),
    "kernels-cpu-attention-h100-pinned": Block(tuple(f"kernels/2026-12-05-4d11df0-nvidia-h100-80gb-hbm3-{s}.json"
                                                     for s in range(3, 7)),
                                               lambda f: table(runs(f, "cpu_attention"), CPU_ATTENTION)),
    "throughput-h100-scoring-cost-early-exit": Block(("throughput/2026-12-05-4d11df0-nvidia-h100-80gb-hbm3.json",),
                                                     lambda f: throughput_table(runs(f))),
    "throughput-h200-auto": Block(("throughput/2026-12-05-4d11df0-nvidia-h200.json",),
                                  lambda f: throughput_table(runs(f), per_batch=False, memory=True)),
    "throughput-h200-scoring-cost-alternated": Block(tuple(f"throughput/2026-12-05-4d11df0-nvidia-h200-{s}.json"
                                                           for s in (2, 3)), lambda f: throughput_table(runs(f))),
    "throughput-h200-offloaded-4d11df0": Block(tuple(f"throughput/2026-12-05-4d11df0-nvidia-h200-{s}.json"
                                                     for s in (4, 5)), lambda f: table(offloaded_rows(f), OFFLOADED)),
    "kernels-cpu-attention-h200": Block(("kernels/2026-12-05-4d11df0-nvidia-h200.json",),
                                        lambda f: table(f[0]["cpu_attention"], CPU_ATTENTION)),
    "throughput-h200-beside": Block(tuple(f"throughput/2026-12-05-d008031-nvidia-h200{s}.json" for s in ("", "-2")),
                                    lambda f: throughput_table(runs(f))),
    "throughput-h100-rules-offloaded": Block(("throughput/2026-12-05-4d11df0-nvidia-h100-80gb-hbm3-2.json",),
                                             lambda f: table(offloaded_rows(f), OFFLOADED)),
    "throughput-h200-row-cache-default": Block(("throughput/2026-12-05-8e61407-nvidia-h200.json",),
                                               lambda f: table(offloaded_rows(f), OFFLOADED)),
    "throughput-h200-scoring-cost-v74": Block(("throughput/2026-12-05-8e61407-nvidia-h200-2.json",),
                                              lambda f: throughput_table(runs(f))),
    "kernels-keep-digits-h100": Block(("kernels/2026-12-06-8864694-nvidia-h100-80gb-hbm3.json",
                                       "kernels/2026-12-06-8e68246-nvidia-h100-80gb-hbm3.json",
                                       "kernels/2026-12-06-f599508-nvidia-h100-80gb-hbm3.json",
                                       "kernels/2026-12-06-ed8ae76-nvidia-h100-80gb-hbm3.json"),
                                      lambda f: table(versioned(f, "keep"), KEEP_SELECTS)),
    "throughput-h100-scoring-cost-v79": Block(("throughput/2026-12-06-8e68246-nvidia-h100-80gb-hbm3.json",),
                                              lambda f: throughput_table(runs(f))),
    "throughput-h100-scoring-cost-v81": Block(("throughput/2026-12-06-9887e0b-nvidia-h100-80gb-hbm3-2.json",),
                                              lambda f: throughput_table(runs(f))),
    "throughput-h100-scoring-cost-v82": Block(("throughput/2026-12-06-40a5aaa-nvidia-h100-80gb-hbm3.json",),
                                              lambda f: throughput_table(runs(f))),
    "throughput-h100-scoring-cost-v85": Block(tuple(f"throughput/2026-12-06-f814fbe-nvidia-h100-80gb-hbm3-{s}.json"
                                                    for s in (2, 3)), lambda f: throughput_table(runs(f))),
    "throughput-h100-rerank-factors": Block(tuple(f"throughput/2026-12-06-8f6b240-nvidia-h100-80gb-hbm3{s}.json"
                                                  for s in ("", "-2")), lambda f: throughput_table(runs(f))),
    "throughput-h100-rerank-default": Block(tuple(f"throughput/2026-12-06-f4f8bed-nvidia-h100-80gb-hbm3{s}.json"
                                                  for s in ("", "-2")) + (
                                                      "throughput/2026-12-06-81d38aa-nvidia-h100-80gb-hbm3.json",),
                                            lambda f: throughput_table(runs(f))),
    "throughput-h100-rerank4": Block(("throughput/2026-12-06-9e97ee7-nvidia-h100-80gb-hbm3.json",)
                                     + tuple(f"throughput/2026-12-06-d948682-nvidia-h100-80gb-hbm3{s}.json"
                                             for s in ("", "-2")), lambda f: throughput_table(runs(f))),
    "throughput-h100-query-head-rerank": Block(tuple(f"throughput/2026-12-06-8e05a79-nvidia-h100-80gb-hbm3{s}.json"
                                                     for s in ("", "-2")),
                                               lambda f: table(against_wrope(f), AGAINST_WROPE)),
    "throughput-h100-rerank-pool": Block(tuple(f"throughput/2026-12-06-a769a41-nvidia-h100-80gb-hbm3{s}.json"
                                               for s in ("", "-2", "-3", "-4", "-6")),
                                         lambda f: table(against_wrope(f), AGAINST_WROPE)),
    "throughput-h100-rerank-scoring": Block(tuple(f"throughput/2026-12-07-{c}-nvidia-h100-80gb-hbm3{s}.json"
                                                  for c, s in (("61a4b0a", ""), ("61a4b0a", "-2"), ("b9a4869", ""),
                                                               ("53c6d5d", ""))),
                                            lambda f: table(against_wrope(f), BUSY_AGAINST_WROPE)),
    "kernels-rerank": Block(("kernels/2026-12-07-66e6c0a-nvidia-h100-80gb-hbm3.json",),
                            lambda f: table(f[0]["rerank"], RERANK_STEP)),
    "throughput-h100-key-bits": Block(tuple(f"throughput/2026-12-07-b92767d-nvidia-h100-80gb-hbm3{s}.json"
                                            for s in ("", "-3", "-4", "-5", "-6", "-7", "-8"))
                                      + ("throughput/2026-12-07-69b4a80-nvidia-h100-80gb-hbm3.json",),
                                      lambda f: table(against_wrope(f), BUSY_AGAINST_WROPE)),
    "throughput-h100-look-back": Block(tuple(f"throughput/2026-12-07-{c}-nvidia-h100-80gb-hbm3{s}.json"
                                             for c in ("7c0d321", "d6283eb") for s in ("", "-2")),
                                       lambda f: table(against_wrope(f), BUSY_AGAINST_WROPE)),
    "throughput-h100-keep-two-scans": Block(("throughput/2026-12-07-7c0d321-nvidia-h100-80gb-hbm3-3.json",
                                             "throughput/2026-12-07-437194d-nvidia-h100-80gb-hbm3.json"),
                                            lambda f: table(against_wrope(f), BUSY_AGAINST_WROPE)),
    "throughput-h100-look-back-landed": Block(tuple(f"throughput/2026-12-07-{c}-nvidia-h100-80gb-hbm3.json"
                                                    for c in ("e9d18a9", "12a7ad0")),
                                              lambda f: table(against_wrope(f), BUSY_AGAINST_WROPE)),
    "throughput-h100-keep-first": Block(tuple(f"throughput/2026-12-07-{c}-nvidia-h100-80gb-hbm3.json"
                                              for c in ("1fb5cd5", "dc75591")),
                                        lambda f: table(against_wrope(f), BUSY_AGAINST_WROPE)),
    "throughput-h100-timeline": Block(("throughput/2026-12-07-0996a20-nvidia-h100-80gb-hbm3.json",),
                                      lambda f: table([{**r, **r["timeline"], "commit": f[0]["environment"]["commit"]}
                                                       for r in runs(f)], TIMELINE)),
    "throughput-h100-keep-words": Block(tuple(f"throughput/2026-12-08-{c}-nvidia-h100-80gb-hbm3{s}.json"
                                              for c, s in (("9b2b40f", ""), ("90eb454", ""), ("9b2b40f", "-2"),
                                                           ("90eb454", "-2"), ("90eb454", "-3"), ("90eb454", "-4"),
                                                           ("90eb454", "-5"))),
                                        lambda f: table([{**r["gpu_profile"], **r,
                                                          "commit": run["environment"]["commit"]}
                                                         for run in f for r in run["runs"]], STEP_KERNELS)),
    "fidelity-key-bits-cpu": Block(tuple(f"evaluation/2026-12-07-b92767d-cpu-keybits{b}.json" for b in (32, 16)),
                                   lambda f: fidelity_table([{**r, "method": f"{r['method']}, "
                                                                            f"{run['selection_key_bits']}-bit keys"}
                                                             for run in f for r in run["perplexity"]])),
    "fidelity-rerank-pool-cpu": Block((POOL_CPU, POOL5_CPU, "evaluation/2026-12-06-841b5b9-cpu.json"),  # (exact top-K)
                                      lambda f: fidelity_table(f[0]["perplexity"] + f[1]["perplexity"] + [
                                          r for r in f[2]["perplexity"] if r["method"] == "oracle 0.03"])),
    "ruler-reranked": Block(RERANKED[:1], lambda f: ruler_tables(f[0])),
    "fidelity-kv-head-rerank-cpu": Block(("evaluation/2026-12-06-84e1f49-cpu.json",),
                                         lambda f: fidelity_table(f[0]["perplexity"])),
    "fidelity-rerank3-cpu": Block(("evaluation/2026-12-06-841b5b9-cpu.json",),
                                  lambda f: fidelity_table(f[0]["perplexity"])),
    "selection-reuse": Block((REUSE_CPU,), lambda f: table(*reuse_rows(f[0]))),
    "ruler": Block((SUITE,), lambda f: ruler_tables(f[0])),
    "ruler-budgets": Block((SUITE,), lambda f: ruler_budget_tables(f[0])),
    "fidelity": Block((SUITE,), lambda f: fidelity_table(f[0]["perplexity"])),
    "fidelity-budgets-8k": Block((SUITE,), lambda f: fidelity_budget_table(f[0]["perplexity"], 8192)),
    "fidelity-budgets-cpu": Block((FIDELITY_CPU,), lambda f: fidelity_budget_table(f[0]["perplexity"], 4096)),
    "fidelity-cpu": Block((FIDELITY_CPU,), lambda f: fidelity_table(f[0]["perplexity"])),
    "fidelity-budgets-defaults-cpu": Block(("evaluation/2026-12-04-01098b8-cpu.json",
                                            "evaluation/2026-12-04-0eb368d-cpu.json"),
                                           lambda f: budgets_at_defaults(*f)),
    "fidelity-rerank-cpu": Block(("evaluation/2026-12-02-34c170a-cpu.json",),
                                 lambda f: fidelity_table(f[0]["perplexity"])),
    "rerank-vs-rows-cpu": Block(("evaluation/2026-12-04-0eb368d-cpu.json",),
                                lambda f: fidelity_table(f[0]["perplexity"], every_budget=True)),
    "cuda-check-h100": Block((CUDA_CHECK_H100,), lambda f: table(cuda_check_rows(f[0]), CUDA_CHECK)),
    "kernels-topk": Block((KERNELS,), lambda f: table(f[0]["topk"], TOPK)),
    "kernels-cpu-attention": Block((KERNELS,), lambda f: table(f[0]["cpu_attention"], CPU_ATTENTION)),
    "kernels-decode-layer": Block((KERNELS,), lambda f: table(f[0]["decode_layer"], DECODE_LAYER)),
    "throughput-h100": Block(H100, lambda f: throughput_table(sorted(runs(f), key=by_kind), per_batch=False,
                                                              memory=True)),
    "multi-gpu": Block((MULTI_GPU_H100,), lambda f: table(f[0]["runs"], MULTI_GPU)),
    "multi-gpu-greedy": Block((MULTI_GPU_H100,), lambda f: table(f[0]["checks"], GREEDY_CHECK)),
}


def runs(files: list[dict], part: str = "runs") -> list[dict]:
    """The rows of several runs (``part``: the throughput runs, or a kernel benchmark's part), in order."""
    return [r for f in files for r in f[part]]


def versioned(files: list[dict], part: str) -> list[dict]:
    """The ``part`` rows of several kernel runs, each labelled with its file's variant (else its commit)."""
    return [{**r, "version": f.get("variant", f["environment"]["commit"])} for f in files for r in f[part]]


def provenance(name: str, result: dict) -> str:
    """A results file's name with the commit, GPU and library versions its environment record gives."""
    env = result["environment"]
    commit = env["commit"] if env.get("recorded", True) else f"{env['commit']} (from git history)"
    versions = (f"torch {env['torch']}, transformers {env['transformers']}" if env.get("torch")
                else "versions not recorded")
    return f"`bench/results/{name}` (commit {commit}, {env.get('gpu') or 'CPU'}, {versions})"


def load(name: str) -> dict:
    """A results file, by its path under bench/results."""
    return json.loads((RESULTS / name).read_text())


def render(name: str, load: Callable[[str], dict] = load) -> str:
    """A block's generated table and, under it, the line naming its sources."""
    block = BLOCKS[name]
    files = [load(source) for source in block.sources]
    sources = "; ".join(provenance(s, f) for s, f in zip(block.sources, files))
    return f"{block.table(files)}\n\n<sub>Generated by `python -m bench.report` from {sources}.</sub>\n"


def refresh(text: str, render: Callable[[str], str] = render) -> tuple[str, list[str]]:
    """``text`` with every report block regenerated, and the names of the blocks that changed."""
    stale = []

    def replace(m: re.Match) -> str:
        if m["name"] not in BLOCKS:
            raise SystemExit(f"unknown report block {m['name']!r}: add it to BLOCKS in bench/report.py")
        body = render(m["name"])
        if body != m["body"]:
            stale.append(m["name"])
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(replace, text), stale


def plot(ax, lines: dict, reference: dict[str, float], ylabel: str, title: str) -> None:
    for label, points in lines.items():
        ax.plot(*zip(*points), marker="o", label=label, linestyle="--" if "per KV head" in label else "-",
                color=COLORS.get(label))
    for label, value in reference.items():
        ax.axhline(value, color="grey", linestyle=":" if label.startswith("sinks") else "-", linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 3, 5, 10], ["1%", "2%", "3%", "5%", "10%"])
    ax.set_xlabel("far tokens retrieved (budget)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def short(device: str) -> str:
    """A device's name without vendor and memory ("NVIDIA H100 80GB HBM3" -> "H100")."""
    return re.sub(r"NVIDIA | \d+GB.*", "", device)


def save(fig, ax, name: str) -> Path:
    """Write ``fig`` into docs/figures with ``ax``'s legend below the panels (where it hides no line; none for
    ``ax`` None, where the points carry their labels)."""
    if ax is None:
        fig.tight_layout()
    else:
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.1 if len(fig.axes) <= 2 else 0.05, 1, 1))
    fig.savefig(FIGURES / name, dpi=150)
    pyplot().close(fig)
    return FIGURES / name


def pyplot():
    """matplotlib's pyplot, drawing into files: imported where a figure is drawn, so that the benchmarks print
    this module's tables on machines without matplotlib (the GPU machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures(suite: dict, fidelity: list[dict]) -> list[Path]:
    """RULER score relative to full attention against budget (one panel per length), and recall of the exact top-K
    and attention mass against budget (one row of panels per length)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    lengths = lengths_of(suite["summary"])
    fig, axes = pyplot().subplots(1, len(lengths), figsize=(5.5 * len(lengths), 3.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        relative = at_length(suite["summary"]["relative_to_full"], length)
        prompts, tasks = suite["summary"]["prompts"][f"full | {length}"], len(suite["summary"]["tasks"])
        plot(ax, curves(relative), {"full attention": 1.0, "sinks + window": relative.get("window", 0.0)},
             "RULER-style score / full attention's",
             f"SmolLM2-135M, {length // 1024}K prompts ({tasks} tasks, {prompts} prompts)")
    written = [save(fig, axes[0][0], "accuracy-vs-budget.png")]
    lengths = sorted({r["length"] for r in fidelity})
    if lengths:
        fig, axes = pyplot().subplots(len(lengths), 2, figsize=(10, 3.8 * len(lengths)), squeeze=False)
        for row, length in zip(axes, lengths):
            rows = {r["method"]: r for r in fidelity if r["length"] == length}
            for ax, metric, ylabel in zip(row, ("recall", "mass"),
                                          ("recall of the exact top-K", "attention mass covered")):
                reference = {"sinks + window": rows["window"]["mass"]} if metric == "mass" and "window" in rows else {}
                plot(ax, curves({m: r[metric] for m, r in rows.items() if metric in r}), reference, ylabel,
                     f"SmolLM2-135M, {length // 1024}K windows of Persuasion "
                     f"({', '.join(sorted({short(r['device']) for r in rows.values()}))})")
        written.append(save(fig, axes[0][1], "fidelity-vs-budget.png"))
    return written


COSTS = {  # an evaluated method -> its decode step in the throughput runs (the same budget rule: per query head)
    "full": "full attention (sdpa + DynamicCache)",
    "wrope 0.03": "A2ATS offload=none query_head graphs",
    "distance 0.03": "A2ATS offload=none query_head distance graphs",
    "distance 0.03 (rerank 2)": "A2ATS offload=none query_head distance rerank 2 graphs",
    "distance 0.03 (rerank 4)": "A2ATS offload=none query_head distance rerank 4 graphs",
}


def cost_accuracy_figure(suite: dict, throughput: dict, batch: int = 7) -> Path:
    """Each method's RULER-style score (relative to full attention's, one panel per length) against its decode
    tokens/s at 128K and ``batch`` rows: the cost of accuracy. A method a run lacks is left out of that panel."""
    speed = {r["method"]: r["tokens_per_s"] for r in throughput["runs"]
             if r["context"] == 131072 and r["batch"] == batch and "tokens_per_s" in r}
    lengths = lengths_of(suite["summary"])
    fig, axes = pyplot().subplots(1, len(lengths), figsize=(5.5 * len(lengths), 3.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        relative = at_length(suite["summary"]["relative_to_full"], length)
        for method, step in COSTS.items():
            score = 1.0 if method == "full" else relative.get(method)
            if score is not None and step in speed:
                ax.scatter(speed[step], score, label=method)
                ax.annotate(method, (speed[step], score), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"decode tokens/s at 128K x {batch} rows ({short(throughput['environment']['gpu'])})")
        ax.set_ylabel("RULER-style score / full attention's")
        ax.set_title(f"SmolLM2-135M, {length // 1024}K prompts, 3%", fontsize=9)
        ax.grid(alpha=0.3)
    return save(fig, None, "cost-accuracy.png")


def suite_figures() -> list[Path]:
    """The figures from the suite's summary and the fidelity runs (the CPU run's lengths take precedence)."""
    suite, part = load(SUITE), load(FIDELITY_CPU)
    fidelity = [{"device": part["device"], **r} for r in part["perplexity"]]
    covered = {r["length"] for r in fidelity}
    fidelity += [{"device": suite["device"], **r} for r in suite["perplexity"] if r["length"] not in covered]
    return figures(suite, fidelity) + [cost_accuracy_figure(load(DEFAULTS), load(SCORING_COST))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say which tables are stale (exit 1 if any)")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="RAW [OUT]",
                        help="write an evaluation run's summary (default OUT: the suite's file in BLOCKS)")
    args = parser.parse_args()
    if args.summarize:
        out = args.summarize[1] if len(args.summarize) > 1 else RESULTS / SUITE
        out.write_text(json.dumps(summarize_run(json.loads(args.summarize[0].read_text())), indent=1) + "\n")
        return print(f"wrote {out}")
    stale = []
    for doc in DOCS:
        text, changed = refresh(doc.read_text())
        stale += [f"{doc.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            doc.write_text(text)
    if args.check:
        print("\n".join(f"stale: {s}" for s in stale) or "every table matches its results files")
        sys.exit(1 if stale else 0)
    print("\n".join(f"rewrote {s}" for s in stale))
    for path in suite_figures():
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
