"""RoPE inverse and windowed RoPE against transformers' own rotary embedding, for every rope type."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from a2ats_hf.rope import RoPE, apply_rope, bucket_turns, compose, inverse

from conftest import tiny_model

ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}


def rope_for(kind: str, head_dim: int = 48) -> tuple[RoPE, LlamaRotaryEmbedding]:
    config = LlamaConfig(hidden_size=head_dim * 3, num_attention_heads=3, num_key_value_heads=3, head_dim=head_dim,
                         max_position_embeddings=4096, rope_parameters=dict(ROPE_TYPES[kind]))
    return RoPE(LlamaRotaryEmbedding(config)), LlamaRotaryEmbedding(config)


def positions(batch: int, length: int) -> torch.Tensor:
    """Per-row positions with different offsets, as left padding produces."""
    return torch.arange(length)[None] + torch.tensor([0, 5, 300][:batch])[:, None]


def test_invert_is_the_inverse_of_apply():
    """Rotating by ``inverse(cos, sin)`` after ``apply_rope`` turns the angle back and keeps the common scale of each
    pair once; ``compose`` of two rotations is the one rotation doing both."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 64, generator=gen, dtype=torch.float64)
    angle = torch.rand(2, 1, 7, 32, generator=gen, dtype=torch.float64) * 100
    scale = 1.3
    cos, sin = (torch.cat([f(angle)] * 2, -1) * scale for f in (torch.cos, torch.sin))
    torch.testing.assert_close(apply_rope(apply_rope(x, cos, sin), *inverse(cos, sin)), x * scale)
    turn = (torch.cos(angle / 3).repeat(1, 1, 1, 2), torch.sin(angle / 3).repeat(1, 1, 1, 2))
    torch.testing.assert_close(apply_rope(x, *compose((cos, sin), turn)), apply_rope(apply_rope(x, cos, sin), *turn))


@pytest.mark.parametrize("kind", ROPE_TYPES)
def test_invert_undoes_the_model_rotation(kind):
    """Un-rotating keys rotated by transformers' apply_rotary_pos_emb gives the pre-RoPE keys back, times the rope
    type's attention scaling (1 but for yarn)."""
    ours, theirs = rope_for(kind)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, 257, 48, generator=gen)
    pos = positions(3, 257)
    cos, sin = theirs(k, pos)
    _, k_post = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(ours.invert(k_post, pos), k * theirs.attention_scaling, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ROPE_TYPES)
def test_windowed_query_scores_like_distance_b(kind):
    """q~ . (un-rotated key) equals the true post-RoPE score of a key exactly b tokens back."""
    ours, theirs = rope_for(kind)
    gen = torch.Generator().manual_seed(2)
    b = 100
    q, k = torch.randn(3, 3, 1, 48, generator=gen), torch.randn(3, 3, 1, 48, generator=gen)
    q_pos = torch.tensor([[700], [333], [1500]])
    cos_q, sin_q = theirs(q, q_pos)
    cos_k, sin_k = theirs(k, q_pos - b)
    q_post, _ = apply_rotary_pos_emb(q, q, cos_q, sin_q)
    _, k_post = apply_rotary_pos_emb(k, k, cos_k, sin_k)
    true = (q_post * k_post).sum(-1)
    wrope = ours.windowed_query(q_post, q_pos, b)
    approx = (wrope * ours.invert(k_post, q_pos - b)).sum(-1)  # each side carries one factor of the scaling
    torch.testing.assert_close(approx, true, atol=1e-4, rtol=1e-4)


def test_windowed_query_is_the_query_rotated_by_b_minus_i():
    """WRoPE of a post-RoPE query at position i equals that query rotated by (b - i), built independently."""
    ours, theirs = rope_for("default", head_dim=64)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 1, 64, generator=gen)
    pos = torch.tensor([[10], [2000], [4095]])
    cos, sin = theirs(q, pos)
    q_post, _ = apply_rotary_pos_emb(q, q, cos, sin)
    b = 2048
    angle = (b - pos).double()[..., None] * theirs.inv_freq.double()
    cos_d, sin_d = (torch.cat([f(angle)] * 2, -1)[:, None].float() for f in (torch.cos, torch.sin))
    torch.testing.assert_close(ours.windowed_query(q_post, pos, b), apply_rope(q_post, cos_d, sin_d), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("longest, per_octave, length", [(300, 1, None), (5000, 2, None), (65000, 1, None),
                                                         (5000, 1, 3000), (5000, 3, 40)])
def test_bucket_mean_rotation_is_the_mean_of_its_distances_rotations(longest, per_octave, length):
    """The closed form of a bucket's mean rotation equals the mean of its distances' rotations taken one by one
    (with a device length: only the distances below it), two rows at different positions."""
    rope = RoPE.for_attention(tiny_model(max_position_embeddings=70000).model.layers[0].self_attn)
    positions = torch.tensor([[longest], [longest + 7]])
    limit = None if length is None else torch.tensor([length])
    cos, sin, bucket, starts = bucket_turns(rope, longest, positions, 16, per_octave, length=limit)
    assert starts.tolist() == [int((bucket == k).nonzero()[0]) for k in range(1, cos.shape[2])]
    distance = torch.arange(longest + 1)
    weight = (distance < (length or longest + 1)).float()
    each = [t * weight[:, None] for t in rope.turns(distance, positions)]  # [2, 1, N, D'] each
    size = torch.zeros(cos.shape[2]).index_add(0, bucket, weight).clamp(min=1)[:, None]
    for got, one in zip((cos, sin), each):
        expected = torch.zeros_like(got).index_add(2, bucket, one) / size
        torch.testing.assert_close(got, expected, atol=5e-6, rtol=0)
