"""End to end on the real SmolLM2-135M-Instruct with Jane Austen's prose (CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from a2ats_eval.assets import demo_codebooks, prompt_ids
from a2ats_hf import A2ATSCache, cache_argument

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def books(smollm2, austen):
    """The demo's codebooks (1024 centroids from three novels, Persuasion held out), built once and cached."""
    model, tokenizer = smollm2
    return demo_codebooks(model, tokenizer, austen)


def generate(model, ids, cache, mask=None, new=16):
    out = model.generate(ids, attention_mask=mask, **cache_argument(model, cache), max_new_tokens=new, do_sample=False)
    return out[:, ids.shape[1]:]


def test_codebooks_match_the_model(smollm2, books):
    """Calibrated codebooks validate against SmolLM2's config."""
    books.validate(smollm2[0].config)


def test_topk_one_is_full_attention(smollm2, books, austen):
    """topk=1.0 reproduces sdpa + DynamicCache greedy output on a 1.5K-token prompt."""
    model, tokenizer = smollm2
    ids = tokenizer(austen["Persuasion"][:7000], return_tensors="pt")["input_ids"]
    expected = generate(model, ids, DynamicCache(config=model.config), new=24)
    assert torch.equal(generate(model, ids, A2ATSCache(books, topk=1.0), new=24), expected)


def test_left_padded_batch_equals_rows_alone(smollm2, books, austen):
    """A left-padded batch of two passages gives each row's own greedy output at topk=0.05."""
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    texts = [austen["Emma"][20000:24000], austen["Persuasion"][30000:31500]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    together = generate(model, batch["input_ids"], A2ATSCache(books, topk=0.05), batch["attention_mask"])
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        alone = generate(model, ids, A2ATSCache(books, topk=0.05))
        assert torch.equal(together[i, : alone.shape[1]], alone[0])


def test_sparse_retrieval_finds_the_needle(smollm2, books, austen):
    """At topk=0.03 (the demo's 1024-centroid codebooks), the fact buried at 60% of a 6K-token prompt is
    retrieved, as full attention retrieves it."""
    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, austen["Persuasion"], tokens=6000, depth=0.6)
    full = tokenizer.decode(generate(model, ids, DynamicCache(config=model.config))[0])
    cache = A2ATSCache(books, topk=0.03)
    sparse = tokenizer.decode(generate(model, ids, cache)[0])
    assert "7341" in full
    assert "7341" in sparse
    assert cache.stats.far_fraction < 0.1
