"""A2ATSCache: argument checks, reuse rules, reset, memory footprint, wrong codebooks, unsupported models."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM

from a2ats_hf import A2ATSCache, Codebooks, cache_argument

from conftest import DEVICE, generate, ids_of, tiny_model


@pytest.mark.parametrize("topk", [0, 0.0, -0.5, 1.5, -3, True, "0.1", None])
def test_bad_topk_is_rejected(tiny, topk):
    """topk <= 0, > 1 as a float, a non-positive int or a non-number is refused up front."""
    with pytest.raises((ValueError, TypeError), match="topk"):
        A2ATSCache(tiny[1], topk=topk)


@pytest.mark.parametrize("kwargs", [{"budget": "layer"}, {"window": 0}, {"sink": -1}, {"offload": "disk"},
                                    {"gpu_kv_budget": 2**30}, {"offload": "auto", "gpu_kv_budget": -1},
                                    {"dense_below": -1}])
def test_bad_options_are_rejected(tiny, kwargs):
    """Unknown budget rules or offload modes, an empty window, negative sinks, a device budget without
    offload="auto" or below zero, a dense threshold that is not a token count are refused."""
    with pytest.raises(ValueError):
        A2ATSCache(tiny[1], **kwargs)


@pytest.mark.parametrize("kwargs", [{"window": 2.5}, {"window": "64"}, {"window": True}, {"sink": "4"},
                                    {"max_length": "foo"}, {"max_length": 0}, {"sink": 1.0}, {"dense_below": 0.5}])
def test_option_types_are_checked_where_given(tiny, kwargs):
    """Windows, sinks and lengths that are not ints in range are refused by the constructor, naming the option
    (they failed inside torch at the first forward)."""
    (name,) = kwargs
    with pytest.raises((TypeError, ValueError), match=name):
        A2ATSCache(tiny[1], **kwargs)


def test_a_path_instead_of_codebooks_says_how_to_load_them(tiny, tmp_path):
    with pytest.raises(TypeError, match="from_pretrained"):
        A2ATSCache(str(tmp_path))


def test_cache_outside_the_a2ats_attention_is_refused(tiny):
    """A model loaded with sdpa gets only the new token's K/V back from the cache's layers: refused at the first
    decode step with the fix in the message, instead of garbage tokens."""
    _, books = tiny
    model = tiny_model(attn="sdpa")
    with pytest.raises(RuntimeError, match='attn_implementation="a2ats"'):
        generate(model, ids_of(1, 60), A2ATSCache(books, topk=1.0), new=3)


def test_empty_input_is_refused(tiny):
    model, books = tiny
    with pytest.raises(ValueError, match="empty input"):
        model(ids_of(1, 0), **cache_argument(model, A2ATSCache(books)))


def test_attention_mask_changed_mid_decoding_is_refused(tiny):
    """The cache derives each row's sinks, first real token and candidates from the mask: a later mask that
    differs for stored tokens is refused; one that only extends the mask is fine."""
    model, books = tiny
    ids = ids_of(2, 60)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = A2ATSCache(books, topk=1.0)
    out = model(ids, attention_mask=mask, **cache_argument(model, cache))
    step = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([mask, torch.ones_like(step)], 1)
    model(step, attention_mask=mask, **cache_argument(model, cache))
    changed = torch.cat([mask, torch.ones_like(step)], 1)
    changed[0, 30] = 0
    with pytest.raises(ValueError, match="attention mask changed"):
        model(step, attention_mask=changed, **cache_argument(model, cache))


def test_reuse_needs_reset(tiny):
    """A finished cache refuses another batch size until reset(); then it reproduces the first run."""
    model, books = tiny
    cache = A2ATSCache(books, topk=0.1)
    first = generate(model, ids_of(1, 150), cache)
    with pytest.raises(RuntimeError, match="batch"):
        generate(model, ids_of(2, 150), cache)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.equal(generate(model, ids_of(1, 150), cache), first)


def test_conversation_continues_like_dynamic_cache(tiny):
    """A second turn (several new tokens into a filled cache) attends every earlier token exactly: at topk=1.0 both
    turns match sdpa with a DynamicCache."""
    model, books = tiny
    reference = tiny_model("sdpa")
    outputs = []
    for m, cache in ((model, A2ATSCache(books, topk=1.0)), (reference, DynamicCache(config=reference.config))):
        first = generate(m, ids_of(1, 150), cache)
        second = generate(m, torch.cat([first, ids_of(1, 40, seed=5)], dim=1), cache)
        outputs.append(second)
    assert torch.equal(*outputs)


@pytest.mark.parametrize("topk", [1.0, 0.1])
def test_chunked_prefill_equals_one_shot(tiny, topk):
    """transformers' prefill_chunk_size: a left-padded batch prefilled in chunks (the short row's first chunk is all
    padding) generates what a one-shot prefill generates."""
    model, books = tiny
    ids = ids_of(2, 300, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :120] = 0
    ids[1, :120] = 0

    def run(chunk):
        cache = A2ATSCache(books, topk=topk)
        return model.generate(ids, attention_mask=mask, **cache_argument(model, cache), max_new_tokens=8,
                              do_sample=False, pad_token_id=0, prefill_chunk_size=chunk)

    assert torch.equal(run(64), run(None))


def test_model_usable_with_other_caches_after_a_failure(tiny):
    """After an A2ATS failure the same model still generates with a DynamicCache, as sdpa does."""
    model, books = tiny
    cache = A2ATSCache(books)
    generate(model, ids_of(1, 100), cache)
    with pytest.raises(RuntimeError):
        generate(model, ids_of(2, 100), cache)
    reference = tiny_model("sdpa")
    ids = ids_of(1, 80, seed=3)
    expected = generate(reference, ids, DynamicCache(config=reference.config))
    assert torch.equal(generate(model, ids, DynamicCache(config=model.config)), expected)


def test_memory_footprint(tiny):
    """Device bytes are codes (a buffer grown by doubling) + their histogram (windowed RoPE's; the distance scorer's
    columns: the next test) + sinks + window; CPU bytes are the whole K/V store."""
    model, books = tiny
    cache = A2ATSCache(books, topk=0.1, window=16, sink=4, scoring="wrope")
    generate(model, ids_of(1, 300), cache, new=5)
    n = cache.get_seq_length()
    assert n == 304  # the last token is produced but not yet fed back
    layers, heads, dim = books.num_layers, 2, 16
    capacity = 600  # 300 prompt codes, doubled at the first decode step
    assert cache.layers[0].code_buffer.shape[-1] == capacity
    device = layers * heads * (capacity * 2 + books.n_centroids * 4 + (4 + 16) * dim * 4 * 2)  # uint16, int32, float32
    fp = cache.memory_footprint()
    assert fp["device_bytes"] == device
    assert fp["cpu_bytes"] >= layers * heads * n * dim * 4 * 2
    for layer in cache.layers:  # no view keeps the prompt's K/V alive on the device
        for t in (layer.local_keys, layer.local_values):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_memory_footprint_without_offload(tiny):
    """offload="none": the K/V buffers count as device bytes, nothing on the CPU."""
    model, books = tiny
    footprints = {}
    for offload in ("cpu", "none"):  # windowed RoPE: a device store this short attends whole, holding no scorer state
        cache = A2ATSCache(books, topk=0.1, offload=offload, scoring="wrope")
        generate(model, ids_of(1, 300), cache, new=5)
        footprints[offload] = cache.memory_footprint()
    stored = sum(layer.store.nbytes for layer in cache.a2ats_layers)
    assert footprints["none"] == {"device_bytes": footprints["cpu"]["device_bytes"] + stored, "cpu_bytes": 0}


def test_memory_footprint_counts_what_the_scorer_keeps(tiny):
    """The distance scorer's (bucket, code) columns and histogram, and the oracle's key copy, are device memory too;
    the layer's code histogram is kept only for a scorer that reads it (windowed RoPE)."""
    model, books = tiny
    device_bytes, histograms = {}, {}
    for scoring in ("wrope", "distance", "oracle"):
        cache = A2ATSCache(books, topk=0.1, scoring=scoring)
        generate(model, ids_of(1, 200), cache, new=3)
        device_bytes[scoring] = cache.memory_footprint()["device_bytes"]
        histograms[scoring] = sum(0 if layer.histogram is None else layer.histogram.nbytes
                                  for layer in cache.a2ats_layers)
        held = sum(t.numel() * t.element_size() for layer in cache.a2ats_layers for t in layer.scorer.held())
        assert (held > 0) == (scoring != "wrope") and (histograms[scoring] > 0) == (scoring == "wrope")
        assert device_bytes[scoring] - device_bytes["wrope"] == held + histograms[scoring] - histograms["wrope"]


def test_prompt_keys_are_not_kept_on_the_device(tiny):
    """Right after a long prompt, sinks and window hold their own copy: the prompt's K/V live only in the CPU
    store."""
    model, books = tiny
    cache = A2ATSCache(books, window=16, sink=4)
    with torch.no_grad():
        model(ids_of(1, 500), **cache_argument(model, cache))
    layer = cache.layers[0]
    assert layer.local_keys.shape[2] == 4 + 16 and layer.local_keys.untyped_storage().nbytes() == 20 * 2 * 16 * 4


@pytest.mark.parametrize("scoring", ["wrope", "oracle", "distance"])
def test_dropped_cache_frees_its_store_at_once(tiny, scoring):
    """No reference cycle holds a dropped cache: its CPU store (GiBs in real use) is freed without the cycle
    collector, after generation and with a scorer that keeps state per layer."""
    model, books = tiny
    cache = A2ATSCache(books, topk=0.1, scoring=scoring)
    generate(model, ids_of(2, 300), cache, new=3)
    store = weakref.ref(cache.layers[0].store.blocks[0])
    gc.disable()
    try:
        del cache
        assert store() is None
    finally:
        gc.enable()


def test_codes_live_beside_the_window(tiny):
    """Codes are uint16, one per stored token, on the keys' device."""
    model, books = tiny
    cache = A2ATSCache(books)
    generate(model, ids_of(2, 90), cache, new=3)
    layer = cache.layers[0]
    assert layer.codes.dtype == torch.uint16 and layer.codes.shape == (2, 2, cache.get_seq_length())
    assert int(layer.codes.long().max()) < books.n_centroids


def test_codebooks_for_another_model_fail_clearly(tiny):
    """Codebooks of a 2-layer model on a 3-layer model: the error names the mismatched field."""
    model, books = tiny
    other = tiny_model(num_hidden_layers=3)
    wrong = Codebooks(torch.cat([books.whitener, books.whitener[:1]]),
                      torch.cat([books.whitened_centroids, books.whitened_centroids[:1]]), books.fingerprint)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        generate(other, ids_of(1, 50), A2ATSCache(wrong))
    theta = tiny_model(rope_theta=500000.0)
    with pytest.raises(ValueError, match="rope_parameters"):
        generate(theta, ids_of(1, 50), A2ATSCache(books))


def test_unsupported_architecture(tiny):
    """A model type outside the supported list raises NotImplementedError naming what is supported."""
    config = GPTNeoXConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=6, max_position_embeddings=4096)
    model = GPTNeoXForCausalLM(config).eval().to(DEVICE)
    model.set_attn_implementation("a2ats")
    with pytest.raises(NotImplementedError, match="gpt_neox.*supported: Llama-style"):
        generate(model, ids_of(1, 40), A2ATSCache(tiny[1]))


def test_codebooks_of_other_weights_fail_clearly(tiny):
    """Same architecture, other weights (another revision or a fine-tune): the error says so."""
    _, books = tiny
    tuned = tiny_model()
    with torch.no_grad():
        tuned.model.layers[0].self_attn.k_proj.weight.mul_(1.1)
    with pytest.raises(ValueError, match="weights_signature"):
        generate(tuned, ids_of(1, 50), A2ATSCache(books))
    assert books.weights_signature["layers"][0]["norm"] > 0


def test_layers_spread_over_devices_by_accelerate(tiny, tmp_path):
    """A model dispatched by accelerate over a device map (layer 1 in CPU memory beside a GPU, or here offloaded to
    disk, brought in by accelerate's hooks) decodes at topk=1.0 exactly like sdpa + DynamicCache, with each layer's
    codes and window on the device the layer runs on (with a GPU, accelerate runs CPU-mapped layers there)."""
    from transformers import AutoModelForCausalLM

    model, books = tiny
    model.save_pretrained(tmp_path / "model")
    first, second = (DEVICE, "cpu") if DEVICE.type == "cuda" else ("cpu", "disk")
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                  "model.layers.1": second, "model.norm": second, "lm_head": second}
    split = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map, attn_implementation="a2ats",
                                                 offload_folder=tmp_path / "offload").eval()
    assert split.hf_device_map["model.layers.1"] == second
    ids = ids_of(2, 90)
    expected = generate(tiny_model("sdpa"), ids, DynamicCache())
    cache = A2ATSCache(books, topk=1.0)
    assert torch.equal(generate(split, ids.to(first), cache).to(expected.device), expected)
    for layer, module in zip(cache.layers, split.model.layers):
        hook = getattr(module, "_hf_hook", None)
        runs_on = torch.device(getattr(hook, "execution_device", None) or next(module.parameters()).device)
        assert layer.codes.device.type == layer.local_keys.device.type == runs_on.type


def test_torch_compile_fullgraph_names_the_graph_route(tiny):
    """torch.compile(fullgraph=True) of a model holding an A2ATSCache stops with an error that says what to use
    instead; without fullgraph the cache's part runs eagerly between compiled pieces, and decodes as eager does."""
    model, books = tiny
    ids = ids_of(1, 40)

    def logits(forward):
        cache = A2ATSCache(books, topk=0.5, offload="none")
        with torch.no_grad():
            forward(input_ids=ids, **cache_argument(model, cache))
            return forward(input_ids=ids[:, :1], position_ids=torch.tensor([[40]], device=DEVICE),
                           **cache_argument(model, cache)).logits

    torch._dynamo.reset()
    with pytest.raises(Exception, match="capture_decoding"):
        logits(torch.compile(model.forward, backend="eager", fullgraph=True))
    assert torch.equal(logits(torch.compile(model.forward, backend="eager")), logits(model.forward))
    torch._dynamo.reset()


def test_settings_live_in_one_immutable_config(tiny):
    """The cache's settings are one validated, frozen A2ATSConfig that its layers hold; the cache's attributes read
    it and cannot be assigned."""
    from a2ats_hf import A2ATSConfig

    books = tiny[1]
    cache = A2ATSCache(books, topk=0.05, window=32, budget="kv_head")
    assert cache.config == A2ATSConfig(window=32, sink=books.sink, topk=0.05, budget="kv_head")
    assert all(layer.config is cache.config for layer in cache.a2ats_layers)
    assert (cache.topk, cache.window, cache.budget) == (0.05, 32, "kv_head")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.config.topk = 0.5
    with pytest.raises(AttributeError):
        cache.topk = 0.5
    with pytest.raises(ValueError, match="offload must be one of"):
        A2ATSConfig(window=8, sink=0, offload="gpu")


@pytest.mark.parametrize("offload, scoring, rerank, budget, expected", [
    ("none", "distance", None, "query_head", 6), ("none", "wrope", None, "query_head", 6),
    ("auto", "distance", None, "query_head", 6), ("none", "distance", None, "kv_head", 4),
    ("cpu", "distance", None, "query_head", 1), ("none", "distance", 1, "query_head", 1),
    ("none", "distance", 3, "kv_head", 3), ("none", "oracle", None, "query_head", 1),
    ("none", "quest", None, "query_head", 1), ("none", "random", None, "query_head", 1),
    ("none", "postrope", None, "query_head", 1)])
def test_rerank_defaults_per_budget_rule_where_the_keys_are_on_the_device(tiny, offload, scoring, rerank, budget,
                                                                          expected):
    """Re-ranking is on by default for the codebooks' scorers wherever a layer's K/V can be on the device (R = 6
    per query head, 4 per KV head), off with offload="cpu" and for the baselines and ablations (which stay as
    published); a given R is kept."""
    books = tiny[1]
    if scoring == "postrope":  # (it reads codes of post-RoPE keys)
        books = dataclasses.replace(books, keys="post_rope")
    cache = A2ATSCache(books, offload=offload, scoring=scoring, rerank=rerank, budget=budget)
    assert cache.rerank == expected and cache.config.rerank == rerank
