"""bench/common.py: the benchmarks' random model, made trained-like where the method's cost depends on it, and
the commit their results name."""

import subprocess

import pytest
import torch
from transformers import LlamaForCausalLM

from bench.common import commit, correlate_groups

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
