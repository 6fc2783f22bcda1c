"""bench/common.py: the benchmarks' random model, made trained-like where the method's cost depends on it."""

import pytest
import torch
from transformers import LlamaForCausalLM

from bench.common import correlate_groups

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
