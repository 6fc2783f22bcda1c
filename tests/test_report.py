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
