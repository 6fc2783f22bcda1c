"""bench/common.py: the benchmarks' random model, made trained-like where the method's cost depends on it, and
the commit their results name."""

import subprocess

import pytest
import torch
from transformers import LlamaForCausalLM

from bench.common import commit, correlate_groups, idle_before, split_steps_in_time

from conftest import tiny_config


def test_correlate_groups_makes_a_groups_query_heads_alike_at_the_same_scale():
    """After correlate_groups(0.9) the query projections of one KV group's heads correlate by ~0.9, heads of
    different groups stay independent, and the weights keep their spread."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64))
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data.normal_(0.0, 0.02)
    correlate_groups(model, 0.9)
    heads = model.model.layers[0].self_attn.q_proj.weight.view(8, -1)
    corr = torch.corrcoef(heads)
    assert corr[0, 1:4].min() > 0.85 and corr[4, 5:8].min() > 0.85
    assert corr[0, 4:].abs().max() < 0.1
    assert heads.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="group correlation must be in"):
        correlate_groups(model, 1.0)


def test_commit_says_dirty_where_tracked_files_changed(tmp_path, monkeypatch):
    """A result names the tree's commit, "-dirty" where tracked files differ from it (not for untracked ones),
    A2ATS_COMMIT where set (a copy without its history), and None outside a repository."""
    monkeypatch.delenv("A2ATS_COMMIT", raising=False)
    assert commit(tmp_path) is None

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "new.py").write_text("")
    assert commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert commit(tmp_path) == f"{head}-dirty"
    monkeypatch.setenv("A2ATS_COMMIT", "abc1234")
    assert commit(tmp_path) == "abc1234"


def test_split_steps_in_time_averages_the_steps_with_kernels():
    """Two steps of 1 ms (us in, ms out): overlapping kernels count once in busy, the gap between them is idle in
    the span, host calls count where they overlap the head or the tail; a step without kernels is left out."""
    marks = [(0, 1000), (2000, 3000), (5000, 5100)]  # the third launched nothing
    kernels = [(300, 500), (450, 600), (700, 900),  # step one: busy 500 of a 600 span
               (2100, 2800)]  # step two: busy 700
    host = [("cudaLaunchKernel", 0, 250), ("aten::mm", 200, 400), ("cudaDeviceSynchronize", 850, 1000),
            ("cudaLaunchKernel", 2000, 2100), ("cudaDeviceSynchronize", 2700, 3000)]
    t = split_steps_in_time(marks, kernels, host)
    assert t["wall"] == 1.0
    assert t["head"] == pytest.approx((0.3 + 0.1) / 2) and t["tail"] == pytest.approx((0.1 + 0.2) / 2)
    assert t["gpu_span"] == pytest.approx((0.6 + 0.7) / 2) and t["busy"] == pytest.approx((0.5 + 0.7) / 2)
    assert t["idle_in_span"] == pytest.approx(0.05)
    assert t["head"] + t["gpu_span"] + t["tail"] == pytest.approx(t["wall"])
    assert dict(t["head_calls"]) == pytest.approx({"cudaLaunchKernel": (0.25 + 0.1) / 2, "aten::mm": 0.05})
    assert dict(t["tail_calls"]) == pytest.approx({"cudaDeviceSynchronize": (0.1 + 0.2) / 2})


def test_idle_before_counts_gaps_from_the_latest_end():
    """A kernel that ends before one started earlier (nested, or overlapping under PDL) leaves no gap after it: the
    next gap runs from the latest end."""
    spans = [(700, 800, "c"), (0, 500, "a"), (100, 200, "b"), (550, 600, "b")]  # given out of order
    assert idle_before(spans) == {"b": 50, "c": 100}
