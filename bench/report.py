"""Tables and figures from the evaluation suite's result files (written by bench/evaluation.py).

    python -m bench.report [--suite RESULTS.json] [--fidelity RESULTS.json ...]   # default: docs/results.md's files
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
          "random": "random", "postrope": "post-RoPE codebooks", "distance": "A2ATS, distance buckets"}
COLORS = {label: f"C{i}" for i, label in enumerate([*LABELS.values(), LABELS["wrope"] + ", per KV head"])}


def parse(method: str) -> tuple[str, float, str] | None:
    """(scoring, topk, tags) of a method name such as "wrope 0.03 (kv_head)"; None for full and window."""
    m = NAME.match(method)
    return (m["scoring"], float(m["topk"]), m["tags"] or "") if m else None


def at_length(table: dict[str, float], length: int) -> dict[str, float]:
    """A summary table's ("method | length" keyed) entries at ``length``, keyed by method."""
    return {k.split(" | ")[0]: v for k, v in table.items() if k.endswith(f"| {length}")}


def line(method: str) -> tuple[str, float] | None:
    """(line label, topk) of a method on the budget curves (no ablation tags; the two budget rules apart)."""
    parsed = parse(method)
    if not parsed or parsed[2] not in ("", "kv_head"):
        return None
    scoring, topk, tags = parsed
    return LABELS.get(scoring, scoring) + (", per KV head" if tags else ""), topk


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


def paired_stderr(records: list[dict], method: str, length: int) -> float:
    """Standard error of the method's mean score minus full attention's, over the prompts both answered."""
    key = lambda r: (r["task"], r["depth"], r["seed"])  # noqa: E731
    full = {key(r): r["score"] for r in records if r["method"] == "full" and r["length"] == length}
    d = [r["score"] - full[key(r)] for r in records
         if r["method"] == method and r["length"] == length and key(r) in full]
    mean = sum(d) / len(d)
    return (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5 if len(d) > 1 else float("nan")


def ruler_tables(result: dict) -> str:
    """Per length: score per task for each method at 3% (and full, window), mean, mean relative to full, and the
    standard error of the difference from full (paired over prompts)."""
    per_task, mean, relative = (result["summary"][k] for k in ("per_task", "mean", "relative_to_full"))
    tasks = sorted({r["task"] for r in result["ruler"]})
    out = []
    for length in sorted({r["length"] for r in result["ruler"]}):
        names = [m for m in dict.fromkeys(r["method"] for r in result["ruler"] if r["length"] == length)
                 if parse(m) is None or parse(m)[1] == 0.03]
        out.append(f"| {length // 1024}K, 3% | " + " | ".join(t.replace("_", " ") for t in tasks)
                   + " | mean | vs full | ± s.e. |")
        out.append("|---" * (len(tasks) + 4) + "|")
        for m in sorted(names, key=lambda m: -mean[f"{m} | {length}"]):
            cells = [per_task.get(f"{m} | {t} | {length}") for t in tasks]
            full = mean[f"full | {length}"]
            se = "-" if m == "full" else f"{paired_stderr(result['ruler'], m, length) / full:.0%}"
            vs_full = relative.get(f"{m} | {length}", float("nan"))
            out.append(f"| {m} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                       + f" | {mean[f'{m} | {length}']:.3f} | {vs_full:.0%} | {se} |")
        out.append("")
    return "\n".join(out)


def fidelity_table(rows: list[dict]) -> str:
    """Perplexity and fidelity of full attention, sinks + window and the 3% methods (other budgets: budget_table)."""
    rows = [r for r in rows if line(r["method"]) is None or line(r["method"])[1] == 0.03]
    out = ["| length | method | perplexity | recall of exact top-K | attention mass | output error | attended |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["length"], r["method"] != "full", r.get("mass", 0))):
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("recall", "mass", "output_error")]
        attended = f"{100 * r['attended_fraction']:.1f}%" if "attended_fraction" in r else "-"
        attended = "100%" if r["method"] == "full" else attended
        out.append(f"| {r['length'] // 1024}K | {r['method']} | {r['perplexity']:.2f} | " + " | ".join(cells)
                   + f" | {attended} |")
    return "\n".join(out)


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
    """Write ``fig`` into docs/figures with ``ax``'s legend below the panels (where it hides no line)."""
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(fig.axes) <= 2 else 0.05, 1, 1))
    fig.savefig(FIGURES / name, dpi=150)
    plt.close(fig)
    return FIGURES / name


def figures(suite: dict, fidelity: list[dict]) -> list[Path]:
    """RULER score relative to full attention against budget (one panel per length), and recall of the exact top-K
    and attention mass against budget (one row of panels per length)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    lengths = sorted({r["length"] for r in suite["ruler"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 3.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        relative = at_length(suite["summary"]["relative_to_full"], length)
        prompts = len([r for r in suite["ruler"] if r["method"] == "full" and r["length"] == length])
        tasks = len({r["task"] for r in suite["ruler"]})
        plot(ax, curves(relative), {"full attention": 1.0, "sinks + window": relative.get("window", 0.0)},
             "RULER-style score / full attention's",
             f"SmolLM2-135M, {length // 1024}K prompts ({tasks} tasks, {prompts} prompts)")
    written = [save(fig, axes[0][0], "accuracy-vs-budget.png")]
    lengths = sorted({r["length"] for r in fidelity})
    if lengths:
        fig, axes = plt.subplots(len(lengths), 2, figsize=(10, 3.8 * len(lengths)), squeeze=False)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=RESULTS / "accuracy-smollm2.json", help="RULER + perplexity")
    parser.add_argument("--fidelity", type=Path, nargs="*", default=[RESULTS / "fidelity-smollm2-cpu.json"],
                        help="perplexity and fidelity runs that take precedence over the suite's at their lengths")
    args = parser.parse_args()
    suite = json.loads(args.suite.read_text())
    fidelity = []
    for path in args.fidelity:  # each file's rows, marked with the device they ran on
        part = json.loads(path.read_text())
        fidelity += [{"device": part["device"], **r} for r in part["perplexity"]]
    covered = {r["length"] for r in fidelity}
    fidelity += [{"device": suite["device"], **r} for r in suite["perplexity"] if r["length"] not in covered]
    print(ruler_tables(suite))
    for length in sorted({r["length"] for r in suite["ruler"]}):
        relative = at_length(suite["summary"]["relative_to_full"], length)
        mean = at_length(suite["summary"]["mean"], length)
        print(budget_table({m: f"{mean[m]:.3f} ({relative[m]:.0%})" for m in relative},
                           f"{length // 1024}K: RULER mean (vs full)"), "\n")
    print(fidelity_table(suite["perplexity"]), "\n")
    if covered:  # the fidelity files' own 3% rows (their ablations)
        print(fidelity_table([r for r in fidelity if r["length"] in covered]), "\n")
    for length in sorted({r["length"] for r in fidelity}):
        cells = {r["method"]: f"{r['perplexity']:.1f} / {r['recall']:.2f} / {r['mass']:.3f}"
                 for r in fidelity if r["length"] == length and "recall" in r}
        print(budget_table(cells, f"{length // 1024}K: perplexity / recall / mass"), "\n")
    for path in figures(suite, fidelity):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
