"""Every supported family on a tiny random model built from its config class (offline): the windowed-RoPE identity
with the family's own rotary module, exactness at topk=1.0 against sdpa + DynamicCache, generation at topk=0.03,
calibration, and codebooks that refuse another family."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from a2ats_hf import A2ATSCache, cache_argument, calibrate
from a2ats_hf.families import attention_modules, family_of
from a2ats_hf.rope import RoPE

from conftest import DEVICE, CharTokenizer

BASE = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=1)
LONG = 256  # the "original" context of the scaled RoPEs below: prompts run past it

CONFIGS = {
    "llama3-rope": lambda: LlamaConfig(**BASE, head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": LONG}),
    "mistral": lambda: MistralConfig(**BASE, head_dim=16, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**BASE),
    "qwen3-qk-norm": lambda: Qwen3Config(**BASE, head_dim=16),
    "phi3-longrope-partial": lambda: Phi3Config(**BASE, original_max_position_embeddings=LONG, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 6,
        "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0], "original_max_position_embeddings": LONG,
        "partial_rotary_factor": 0.75}),
    "gemma3-sliding": lambda: Gemma3TextConfig(**BASE, head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                               layer_types=["sliding_attention", "full_attention"]),
}
TEXT = " ".join(f"token{i % 97} word{i % 13}" for i in range(1500))


def build(name: str, attn: str = "a2ats"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval().to(DEVICE)
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    """(name, model, codebooks) of one family."""
    model = build(request.param)
    books = calibrate(model, CharTokenizer(), [TEXT], n_centroids=32, max_tokens=3000, chunk_size=1024,
                      uuid_tokens=500, kmeans_iters=10, window=16, sink=4, progress=False)
    return request.param, model, books


def greedy(model, ids, cache, new_tokens=8):
    with torch.no_grad():
        return model.generate(ids, **cache_argument(model, cache), max_new_tokens=new_tokens, do_sample=False,
                              min_new_tokens=new_tokens)


def prompt(length=LONG + 60):
    return torch.randint(2, 256, (1, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def test_windowed_rope_identity(family):
    """With the family's own rotary module and apply_rotary_pos_emb (partial rotary, longrope past its original
    context, Gemma 3's global-layer RoPE): a windowed-RoPE query scores un-rotated keys exactly as the true
    post-RoPE scores at distance ``offset``, attention scaling included."""
    _, model, books = family
    attention = attention_modules(model)[books.layers[0]]
    modeling = sys.modules[type(attention).__module__]
    rope = RoPE.for_attention(attention)
    g = torch.Generator().manual_seed(0)
    hq, hkv, d = 6, 2, 16
    i, offset = LONG + 40, 100
    positions = torch.tensor([[i - offset, i]], device=DEVICE)  # one forward pass holding both tokens
    cos, sin = rope._compute(positions, DEVICE)  # the rotary module's own cos/sin for those positions
    q_pre = torch.randn(1, hq, 2, d, generator=g).to(DEVICE)
    k_pre = torch.randn(1, hkv, 2, d, generator=g).to(DEVICE)
    q_post, k_post = modeling.apply_rotary_pos_emb(q_pre, k_pre, cos[:, 0], sin[:, 0])
    scale = torch.sqrt(cos * cos + sin * sin)[:, :, :1]  # the rope type's attention scaling stays on the keys
    rotary = cos.shape[-1]
    expected = torch.cat([k_pre[..., :rotary] * scale, k_pre[..., rotary:]], dim=-1)
    assert torch.allclose(rope.invert(k_post, positions), expected, atol=1e-5), "RoPE inverse"
    true = torch.einsum("bhd,bhd->bh", q_post[:, :, 1], k_post[:, :, 0].repeat_interleave(3, 1))
    wq = rope.windowed_query(q_post[:, :, 1:], positions[:, 1:], offset)[:, :, 0]
    ours = torch.einsum("bhd,bhd->bh", wq, rope.invert(k_post, positions)[:, :, 0].repeat_interleave(3, 1))
    assert torch.allclose(ours, true, rtol=1e-4, atol=1e-4), (ours, true)


def test_exact_at_full_budget(family):
    """topk=1.0 reproduces sdpa + DynamicCache greedy decoding token for token (prompt past LONG)."""
    name, model, books = family
    ids = prompt()
    expected = greedy(build(name, "sdpa"), ids, DynamicCache(config=model.config))
    assert torch.equal(greedy(model, ids, A2ATSCache(books, topk=1.0)), expected)


@pytest.mark.parametrize("scoring", ["wrope", "distance"])
def test_generates_at_three_percent(family, scoring):
    """topk=0.03 decodes and retrieves 3% of each layer's far tokens per query head, united over the KV group of
    3 (between 3% and 9% per KV head), under either scorer (partial rotary included)."""
    _, model, books = family
    cache = A2ATSCache(books, topk=0.03, scoring=scoring)
    out = greedy(model, prompt(), cache)
    assert out.shape[1] == LONG + 60 + 8
    assert 0.03 <= cache.stats.far_fraction <= 0.09 + 0.01
    assert len(cache.a2ats_layers) == len(books.layers)


def test_codebooks_record_family_and_layers(family):
    """Codebooks cover exactly the layers A2ATS serves (Gemma 3: its global layers) and fail clearly on another
    family's model."""
    name, model, books = family
    assert books.fingerprint["model_type"] == model.config.model_type
    assert books.layers == family_of(model.config).retrieval_layers(model.config)
    assert books.whitener.shape[0] == len(books.layers)
    other = next(n for n in CONFIGS if CONFIGS[n]().model_type != model.config.model_type)
    with pytest.raises(ValueError, match="model_type"):
        books.validate(CONFIGS[other]())


def test_gemma3_sliding_layers_keep_an_exact_window():
    """Gemma 3's sliding layers get transformers' sliding-window cache layers, its global layers A2ATS layers."""
    model = build("gemma3-sliding")
    assert family_of(model.config).retrieval_layers(model.config) == [1]
    books = calibrate(model, CharTokenizer(), [TEXT], n_centroids=16, max_tokens=1500, chunk_size=1024,
                      uuid_tokens=0, kmeans_iters=3, window=16, sink=4, progress=False)
    cache = A2ATSCache(books)
    assert type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer" and cache.layers[1] in cache.a2ats_layers


def test_phi3_short_prompt_warns_about_the_longrope_switch():
    """On a longrope model, a prompt shorter than the switch warns that transformers will drop the cache when
    generation crosses it; a longer prompt keeps the A2ATSCache to the end (test_generates_at_three_percent)."""
    model = build("phi3-longrope-partial")
    books = calibrate(model, CharTokenizer(), [TEXT], n_centroids=16, max_tokens=1500, chunk_size=1024,
                      uuid_tokens=0, kmeans_iters=3, window=16, sink=4, progress=False)
    with pytest.warns(UserWarning, match="drops the cache"):
        greedy(model, prompt(LONG - 40), A2ATSCache(books), new_tokens=2)
