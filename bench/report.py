"""Tables and figures from the evaluation suite's result files (written by bench/evaluation.py).

    python bench/report.py [RESULTS.json ...]     # default: the files the README quotes
Prints markdown tables (RULER-style score per task and method at 3%, with the mean relative to full attention;
perplexity and attention fidelity per method) and draws accuracy and fidelity against budget into docs/figures.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIGURES = ROOT / "docs" / "figures"
NAME = re.compile(r"^(?P<scoring>\w+) (?P<topk>[\d.]+)(?: \((?P<tags>.*)\))?$")
LABELS = {"wrope": "A2ATS (windowed RoPE)", "oracle": "exact top-K (oracle)", "quest": "Quest (16-token pages)",
          "random": "random", "postrope": "post-RoPE codebooks"}


def parse(method: str) -> tuple[str, float, str] | None:
    """(scoring, topk, tags) of a method name such as "wrope 0.03 (kv_head)"; None for full and window."""
    m = NAME.match(method)
    return (m["scoring"], float(m["topk"]), m["tags"] or "") if m else None


def curves(values: dict[str, float]) -> dict[str, list[tuple[float, float]]]:
    """{line label: [(budget %, value)]} for every method without ablation tags (budget rules kept apart)."""
    lines = defaultdict(list)
    for method, value in values.items():
        parsed = parse(method)
        if parsed and parsed[2] in ("", "kv_head"):
            scoring, topk, tags = parsed
            label = LABELS.get(scoring, scoring) + (", per KV head" if tags else "")
            lines[label].append((100 * topk, value))
    return {label: sorted(points) for label, points in lines.items() if len(points) > 1}


def ruler_tables(result: dict) -> str:
    """Per length: score per task for each method at 3% (and full, window), mean, and mean relative to full."""
    per_task, mean, relative = (result["summary"][k] for k in ("per_task", "mean", "relative_to_full"))
    tasks = sorted({r["task"] for r in result["ruler"]})
    out = []
    for length in sorted({r["length"] for r in result["ruler"]}):
        names = [m for m in dict.fromkeys(r["method"] for r in result["ruler"] if r["length"] == length)
                 if parse(m) is None or parse(m)[1] == 0.03]
        out.append(f"| {length // 1024}K, 3% | " + " | ".join(t.replace("_", " ") for t in tasks) + " | mean | vs full |")
        out.append("|---" * (len(tasks) + 3) + "|")
        for m in sorted(names, key=lambda m: -mean[f"{m} | {length}"]):
            cells = [per_task.get(f"{m} | {t} | {length}") for t in tasks]
            out.append(f"| {m} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                       + f" | {mean[f'{m} | {length}']:.3f} | {relative.get(f'{m} | {length}', float('nan')):.0%} |")
        out.append("")
    return "\n".join(out)


def fidelity_table(rows: list[dict]) -> str:
    out = ["| length | method | perplexity | recall of exact top-K | attention mass | output error | attended |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["length"], r["method"] != "full", r.get("mass", 0))):
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("recall", "mass", "output_error")]
        attended = f"{100 * r['attended_fraction']:.1f}%" if "attended_fraction" in r else "100%"
        out.append(f"| {r['length'] // 1024}K | {r['method']} | {r['perplexity']:.2f} | " + " | ".join(cells)
                   + f" | {attended} |")
    return "\n".join(out)


def budget_table(rows: list[dict], length: int) -> str:
    """Scorers (rows) x budgets (columns) at ``length``: "perplexity / recall / mass" per cell."""
    cells, budgets = defaultdict(dict), set()
    for r in rows:
        parsed = parse(r["method"])
        if r["length"] == length and parsed and parsed[2] in ("", "kv_head"):
            scoring, topk, tags = parsed
            label = LABELS.get(scoring, scoring) + (", per KV head" if tags else "")
            cells[label][topk] = f"{r['perplexity']:.1f} / {r['recall']:.2f} / {r['mass']:.3f}"
            budgets.add(topk)
    budgets = sorted(budgets)
    out = [f"| {length // 1024}K: perplexity / recall / mass | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |",
           "|---" * (len(budgets) + 1) + "|"]
    out += [f"| {label} | " + " | ".join(by.get(b, "-") for b in budgets) + " |" for label, by in cells.items()]
    return "\n".join(out)


def plot(ax, lines: dict, reference: dict[str, float], ylabel: str, title: str) -> None:
    for label, points in lines.items():
        ax.plot(*zip(*points), marker="o", label=label, linestyle="--" if "per KV head" in label else "-")
    for label, value in reference.items():
        ax.axhline(value, color="grey", linestyle=":" if label.startswith("sinks") else "-", linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 3, 5, 10], ["1%", "2%", "3%", "5%", "10%"])
    ax.set_xlabel("far tokens retrieved (budget)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def figures(ruler: dict | None, fidelity: list[dict] | None) -> list[Path]:
    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []
    if ruler:
        length = min(r["length"] for r in ruler["ruler"])
        relative = {k.split(" | ")[0]: v for k, v in ruler["summary"]["relative_to_full"].items()
                    if k.endswith(f"| {length}")}
        lines = curves(relative)
        if lines:
            tasks = {r["task"] for r in ruler["ruler"]}
            prompts = len([r for r in ruler["ruler"] if r["method"] == "full" and r["length"] == length])
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            plot(ax, lines, {"full attention": 1.0, "sinks + window": relative.get("window", 0.0)},
                 "RULER-style score / full attention's",
                 f"SmolLM2-135M, {length // 1024}K prompts ({len(tasks)} tasks, {prompts} prompts)")
            ax.legend(fontsize=7)
            written.append(FIGURES / "accuracy-vs-budget.png")
            fig.tight_layout(), fig.savefig(written[-1], dpi=150), plt.close(fig)
    if fidelity:
        length = min(r["length"] for r in fidelity)
        rows = {r["method"]: r for r in fidelity if r["length"] == length}
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, metric, ylabel in zip(axes, ("recall", "mass"), ("recall of the exact top-K", "attention mass covered")):
            lines = curves({m: r[metric] for m, r in rows.items() if metric in r})
            reference = {"sinks + window": rows["window"][metric]} if metric in rows.get("window", {}) else {}
            if metric == "recall":
                reference = {}  # sinks + window retrieve nothing
            plot(ax, lines, reference, ylabel, f"SmolLM2-135M, {length // 1024}K windows of Persuasion")
        axes[1].legend(fontsize=7)
        written.append(FIGURES / "fidelity-vs-budget.png")
        fig.tight_layout(), fig.savefig(written[-1], dpi=150), plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=RESULTS / "accuracy-smollm2.json", help="RULER + perplexity")
    parser.add_argument("--budgets", type=Path, default=RESULTS / "ruler-smollm2-budgets.json",
                        help="RULER at several budgets (the accuracy figure)")
    parser.add_argument("--fidelity", type=Path, default=RESULTS / "fidelity-smollm2-cpu.json",
                        help="perplexity and fidelity at several budgets (the fidelity figure)")
    args = parser.parse_args()
    load = lambda p: json.loads(p.read_text()) if p.is_file() else None  # noqa: E731
    suite, budgets, fidelity = load(args.suite), load(args.budgets), load(args.fidelity)
    if suite:
        print(ruler_tables(suite))
        print(fidelity_table(suite["perplexity"]), "\n")
    if fidelity:
        for length in sorted({r["length"] for r in fidelity["perplexity"]}):
            print(budget_table(fidelity["perplexity"], length), "\n")
    if budgets and "ruler" not in budgets:  # files from before the suite kept its records under "records"
        budgets["ruler"] = budgets["records"]
    for path in figures(budgets, fidelity and fidelity["perplexity"]):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
