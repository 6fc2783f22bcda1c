"""bench/report.py: the docs' generated tables match the results files (a hand-edited table fails), and the table
and summary functions on small synthetic results."""

import math

import pytest

from bench import report


@pytest.mark.parametrize("doc", report.DOCS, ids=lambda d: d.name)
def test_docs_match_their_results_files(doc):
    _, stale = report.refresh(doc.read_text())
    assert not stale, f"{doc.name}: stale tables {stale}; run python -m bench.report"


def test_a_hand_edited_table_is_stale():
    text = (report.ROOT / "README.md").read_text()
    start = text.index("<!-- report: speed -->")
    edited = text[:start] + text[start:].replace("| 1.00x |", "| 1.01x |", 1)
    assert report.refresh(edited)[1] == ["speed"]


def test_an_unknown_block_is_an_error():
    with pytest.raises(SystemExit, match="unknown report block"):
        report.refresh("<!-- report: nothing -->\n<!-- /report -->")


def test_throughput_table_divides_by_the_faster_full_attention_at_the_same_context_and_batch():
    runs = [{"context": 2048, "method": "full attention (sdpa + DynamicCache)", "batch": 4, "step_ms": 40.0,
             "tokens_per_s": 100.0},
            {"context": 2048, "method": "StaticCache + torch.compile", "batch": 4, "step_ms": 20.0,
             "tokens_per_s": 200.0},
            {"context": 2048, "method": "A2ATS graphs", "batch": 4, "step_ms": 10.0, "tokens_per_s": 400.0},
            {"context": 2048, "method": "A2ATS graphs", "batch": 8, "error": "CUDA out of memory. Tried"}]
    lines = report.throughput_table(runs).splitlines()
    assert lines[2].endswith("| 0.50x |") and lines[3].endswith("| 1.00x |")
    assert lines[4] == "| 2K | A2ATS graphs | 4 | 10.0 | 400.0 | 2.00x |"
    assert lines[5] == "| 2K | A2ATS graphs | 8 | out of memory | | |"
    assert len(report.throughput_table(runs, "graphs").splitlines()) == 4


def test_summary_keeps_what_the_tables_need_and_drops_the_records():
    records = [{"task": t, "depth": 0.5, "seed": s, "length": 4096, "method": m, "score": score}
               for t in ("a", "b") for s in (0, 1) for m, score in (("full", 1.0), ("wrope 0.03", 0.5 * s))]
    raw = {"environment": {"commit": "abc1234"}, "ruler": records, "perplexity": []}
    summary = report.summarize_run(raw)
    assert "ruler" not in summary and summary["environment"] == {"commit": "abc1234"}
    assert summary["summary"]["prompts"] == {"full | 4096": 4, "wrope 0.03 | 4096": 4}
    assert summary["summary"]["mean"]["wrope 0.03 | 4096"] == 0.25
    assert math.isclose(summary["summary"]["paired_stderr"]["wrope 0.03 | 4096"], 0.5 / math.sqrt(3) / 2,
                        rel_tol=1e-5)
    table = report.ruler_tables(summary)
    assert "| wrope 0.03 | 0.25 | 0.25 | 0.250 | 25% | 14% |" in table
    shard = report.summarize_run({**raw, "ruler": [r for r in records if r["method"] != "full"]})  # a shard of a run
    assert math.isnan(shard["summary"]["paired_stderr"]["wrope 0.03 | 4096"])


def test_throughput_table_per_context_divides_by_full_attention_at_any_batch_and_shows_memory():
    runs = [{"context": 32768, "method": "A2ATS offload=cpu kv_head", "batch": 21, "step_ms": 100.0,
             "tokens_per_s": 210.0, "peak_gpu_gib": 31.04, "cpu_gib": 97.5},
            {"context": 32768, "method": "full attention (sdpa + DynamicCache)", "batch": 14, "step_ms": 100.0,
             "tokens_per_s": 140.0, "peak_gpu_gib": 72.7, "cpu_gib": 0.1},
            {"context": 2048, "method": "offloaded (DynamicCache offloading=True)", "batch": 64, "error": "killed"},
            {"context": 32768, "method": "offloaded (DynamicCache offloading=True)", "batch": 13, "step_ms": 1000.0,
             "tokens_per_s": 13.0, "peak_gpu_gib": 19.9, "cpu_gib": 98.0}]
    lines = report.throughput_table(sorted(runs, key=report.by_kind), per_batch=False, memory=True).splitlines()
    assert lines[0].endswith("| peak GPU GiB | CPU GiB |") and lines[1] == "|---" * 8 + "|"
    assert [line.split(" | ")[1] for line in lines[2:]] == [
        "full attention (sdpa + DynamicCache)", "offloaded (DynamicCache offloading=True)",
        "A2ATS offload=cpu kv_head", "offloaded (DynamicCache offloading=True)"]
    assert lines[2].endswith("| 1.00x | 72.7 | 0 |") and lines[3].endswith("| 0.09x | 19.9 | 98 |")
    assert lines[4] == "| 32K | A2ATS offload=cpu kv_head | 21 | 100.0 | 210.0 | 1.50x | 31.0 | 98 |"
    assert lines[5].count("|") == 9  # a failed run keeps the table's eight columns
    cpu_run = {k: v for k, v in runs[0].items() if k != "peak_gpu_gib"}  # (a run on a CPU has no GPU peak)
    assert report.throughput_table([cpu_run], memory=True).splitlines()[2].endswith("| - | 98 |")


def test_the_benchmarks_print_these_tables_without_matplotlib():
    """The GPU machines lack matplotlib: the benchmarks' summaries come from this module, which imports it only
    where a figure is drawn."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['matplotlib'] = None; "  # (an import of it now fails)
            "import bench.throughput, bench.kernels_bench, bench.multi_gpu, bench.report")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=report.ROOT)


def test_column_tables_sum_the_profile_and_mark_what_a_run_lacks():
    rows = [{"n": 131072, "batch": 4, "mb_read": 11.5, "triton_us": 313.7, "bound_us": 3.8, "pct_hbm": 1.2,
             "torch_topk_us": 524.2, "device_us": {"threshold": 23.7, "scan pass 0": 11.7, "other": 52.0},
             "matches_reference": True}]
    assert report.table(rows, report.TOPK).splitlines()[2] == \
        "| 128K | 4 | 11.5 | 314 us | 87 us | 3.8 us | 1.2 | 524 us | yes |"
    check = {"sdpa_seconds": 0.9, "a2ats": [{"topk": 0.03, "token_agreement": 0.640625, "far_fraction": 0.0824,
                                             "device_bytes": 10586880, "cpu_bytes": 377487360, "seconds": 3.05}]}
    assert report.table(report.cuda_check_rows(check), report.CUDA_CHECK).splitlines()[2:] == [
        "| sdpa + DynamicCache | - | - | - | - | 0.90 s |",
        "| A2ATS topk=0.03 | 64% | 8.2% | 10.6 MB | 377 MB | 3.05 s |"]
    split = {"gpus": 2, "context": 65536, "method": "A2ATS", "decode_ms": 213.1, "tokens_per_s": 4.69,
             "prefill_s": 5.04, "peak_gpu_gib": [18.0, 20.3]}
    assert report.table([split, {**split, "gpus": 1, "peak_gpu_gib": [31.4, 0.0], "cpu_kv_gib": 8.5}],
                        report.MULTI_GPU).splitlines()[2:] == [
        "| 2 | 64K | A2ATS | 213 | 4.7 | 5.0 s | 18.0 / 20.3 GiB | - |",
        "| 1 | 64K | A2ATS | 213 | 4.7 | 5.0 s | 31.4 GiB | 8.5 GiB |"]
    assert [report.margin(m) for m in (None, 0.0, 0.03125)] == ["-", "0.00 (a tie)", "0.03"]


def test_budget_table_keeps_each_rule_and_reranking_factor_apart_and_drops_ablations():
    cells = {"distance 0.01": "a", "distance 0.05": "b", "distance 0.01 (rerank 4)": "c",
             "wrope 0.05 (kv_head, rerank 2)": "d", "wrope 0.05 (1024 centroids)": "e", "full": "f"}
    lines = report.budget_table(cells, "4K").splitlines()
    assert lines[0] == "| 4K | 1% | 5% |"
    assert lines[2:] == ["| A2ATS, distance buckets | a | b |", "| A2ATS, distance buckets, rerank=4 | c | - |",
                         "| A2ATS (windowed RoPE), per KV head, rerank=2 | - | d |"]


def test_a_run_with_the_exact_top_k_gives_each_method_its_paired_difference_from_it():
    scores = {"full": (1, 1, 1, 0), "oracle 0.03": (1, 1, 0, 0), "distance 0.03 (rerank 3)": (1, 0, 0, 0)}
    records = [{"task": "a", "depth": 0.5, "seed": s, "length": 4096, "method": m, "score": float(v[s])}
               for m, v in scores.items() for s in range(4)]
    summary = report.summarize_run({"ruler": records, "perplexity": []})
    assert list(summary["summary"]["vs_oracle"]) == ["distance 0.03 (rerank 3) | 4096"]  # not full, not itself
    diff, se = summary["summary"]["vs_oracle"]["distance 0.03 (rerank 3) | 4096"]
    assert diff == -0.25 and math.isclose(se, 0.25, rel_tol=1e-5)  # differences 0, -1, 0, 0
    rows = report.oracle_table(summary).splitlines()
    assert "| exact top-K (oracle) | 0.500 |" in rows
    assert any(r.endswith("| 0.250 (50%), -0.250 ± 0.250 |") for r in rows)
    assert "vs_oracle" not in report.summarize_run({"ruler": records[:4], "perplexity": []})["summary"]


def test_against_wrope_divides_by_windowed_ropes_mean_of_the_same_commit_and_correlation():
    def run(commit, rho, *steps):
        return {"environment": {"commit": commit}, "group_correlation": rho,
                "runs": [{"method": m, "step_ms": ms} for m, ms in steps]}

    wrope, rerank = "A2ATS offload=none query_head graphs", "A2ATS offload=none query_head distance rerank 4 graphs"
    rows = report.against_wrope([run("a", 0.9, (wrope, 10.0), (rerank, 13.0), (wrope, 12.0)),
                                 run("a", 0.0, (wrope, 20.0), (rerank, 22.0)),
                                 run("b", 0.9, (rerank, 11.0))])
    assert [r["excess"] for r in rows[:5]] == pytest.approx([-1 / 11, 2 / 11, 1 / 11, 0.0, 0.1])
    assert rows[-1]["excess"] is None and [r["rho"] for r in rows] == [0.9, 0.9, 0.9, 0.0, 0.0, 0.9]
