"""calibrate(): hooks collect the right keys, results are deterministic, bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from a2ats_hf import A2ATSCache, cache_argument, calibrate
from a2ats_hf.calibration import _Collector, token_stream
from a2ats_hf.encoding import encode
from a2ats_hf.families import attention_modules

from conftest import DEVICE, CharTokenizer, tiny_model

TEXT = " ".join(f"alpha{i % 31} beta{i % 7}" for i in range(600))


def small(model, texts, **kwargs):
    options = dict(n_centroids=16, max_tokens=1500, chunk_size=500, uuid_tokens=300, kmeans_iters=5, progress=False)
    return calibrate(model, CharTokenizer(), texts, **{**options, **kwargs})


def test_shapes_and_record(tiny):
    """Codebooks cover every (layer, KV head) and record how they were built."""
    model, _ = tiny
    books = small(model, [TEXT])
    assert books.whitener.shape == (2, 2, 16, 16) and books.whitened_centroids.shape == (2, 2, 16, 16)
    assert books.calibration["text_tokens"] == 1500 and books.calibration["uuid_tokens"] == 300
    assert books.calibration["kmeans_iterations"] >= 1
    books.validate(model.config)


def test_deterministic_and_hooks_removed(tiny):
    """The same seed gives identical codebooks, and calibration leaves no hooks behind and gives the model its
    attention implementation back (it runs with the recording one)."""
    model, _ = tiny
    a, b = small(model, [TEXT]), small(model, iter([TEXT]))
    assert torch.equal(a.whitened_centroids, b.whitened_centroids) and torch.equal(a.whitener, b.whitener)
    for attn in attention_modules(model):
        assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks
    assert model.config._attn_implementation == "a2ats"


def test_plain_kmeans_ablation(tiny):
    """query_aware=False: the whitener is a multiple of the identity, so k-means ran on the keys themselves."""
    books = small(tiny[0], [TEXT], query_aware=False)
    eye = torch.eye(16).expand_as(books.whitener)
    scale = books.whitener[..., :1, :1]
    assert torch.allclose(books.whitener, scale * eye, atol=1e-6) and not books.calibration["query_aware"]
    assert small(tiny[0], [TEXT]).calibration["query_aware"]


def test_post_rope_ablation_quantizes_rotated_keys(tiny):
    """keys="post_rope": a cache encodes the keys as rotated (no RoPE undone), and its codes are the codebooks'
    nearest centroids of those keys."""
    model, _ = tiny
    books = small(model, [TEXT], keys="post_rope")
    assert books.keys == "post_rope"
    cache = A2ATSCache(books, scoring="postrope")
    ids = torch.tensor([[ord(c) % 256 for c in TEXT[:90]]], device=DEVICE)
    with torch.no_grad():
        model(ids, **cache_argument(model, cache))
    layer = cache.layers[1]
    keys = layer.store.to_tensors()[0].to(DEVICE)
    expected = encode(keys, books.whitener[1].to(DEVICE), books.whitened_centroids[1].to(DEVICE))
    assert torch.equal(layer.codes.long(), expected)
    with pytest.raises(ValueError, match="keys"):
        small(model, [TEXT], keys="rotated")


def test_distance_buckets_weighed_by_attention_mass(tiny):
    """queries="distance": with all attention on one key 86-149 tokens back from the last 64 queries (window 16),
    buckets 2 and 3 ([64, 128), [128, 256)) carry all the weight, 42 and 22 probes' worth; the other buckets'
    turned queries vanish."""
    model, _ = tiny
    cfg = model.config
    collector = _Collector(model, 300, 2048, "pre_rope", "distance", window=16, sink=4)
    t, d, hkv = 300, cfg.head_dim, cfg.num_key_value_heads
    key = torch.zeros(1, hkv, t, d, device=DEVICE)
    key[..., 150, :] = 10.0
    query = torch.ones(1, cfg.num_attention_heads, t, d, device=DEVICE)
    bucket = torch.arange(t, device=DEVICE).clamp(min=16).div(16).log2().floor().long()
    expected = torch.tensor([0, 0, 42 / 64, 22 / 64, 0], device=DEVICE).expand(hkv, 5)
    assert torch.allclose(collector.bucket_mass(query, key, bucket), expected, atol=1e-5)
    turned = collector.distance_queries(query, key, torch.arange(t, device=DEVICE)[None])
    norms = turned.view(hkv, -1, 5, t, d).pow(2).sum(dim=(1, 3, 4)).sqrt()
    assert (norms[:, [0, 1, 4]] < 1e-3).all() and (norms[:, [2, 3]] > 1).all()


def test_distance_codebooks(tiny):
    """queries="distance" builds pre-RoPE codebooks the "distance" scorer decodes with; other key kinds refuse."""
    model, _ = tiny
    books = small(model, [TEXT], queries="distance")
    assert books.calibration["queries"] == "distance" and books.keys == "pre_rope"
    assert not torch.allclose(books.whitener, small(model, [TEXT]).whitener)
    cache = A2ATSCache(books, topk=0.2, scoring="distance")
    ids = torch.tensor([[ord(c) % 256 for c in TEXT[:300]]], device=DEVICE)
    with torch.no_grad():
        model.generate(ids, **cache_argument(model, cache), max_new_tokens=3, do_sample=False)
    assert cache.stats.far_selected > 0
    with pytest.raises(ValueError, match="queries"):
        small(model, [TEXT], queries="distance", keys="post_rope")


def test_dataset_rows_are_accepted(tiny):
    """Rows with a "text" field (as a `datasets` dataset yields) work like strings."""
    model, _ = tiny
    assert torch.equal(small(model, [{"text": TEXT}]).whitener, small(model, [TEXT]).whitener)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_centroids": 1}, ValueError, r"n_centroids must be in \[2, 65536\], got 1"),
    ({"n_centroids": 0}, ValueError, "n_centroids"), ({"n_centroids": -4}, ValueError, "n_centroids"),
    ({"n_centroids": 70000}, ValueError, "n_centroids"),
    ({"n_centroids": "64"}, TypeError, "n_centroids must be an int, got str '64'"),
    ({"n_centroids": True}, TypeError, "n_centroids must be an int, got bool"),
    ({"n_centroids": 16.0}, TypeError, "n_centroids must be an int, got float"),
    ({"max_tokens": "1500"}, TypeError, "max_tokens"), ({"max_tokens": 0}, ValueError, "max_tokens"),
    ({"max_tokens": 100}, ValueError, "max_tokens=100 caps the calibration text below the 512 text tokens"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"), ({"chunk_size": 1.5}, TypeError, "chunk_size"),
    ({"kmeans_iters": 0}, ValueError, "kmeans_iters"), ({"uuid_tokens": -1}, ValueError, "uuid_tokens"),
    ({"window": 0}, ValueError, "window"), ({"sink": -1}, ValueError, "sink"), ({"offset": None}, TypeError, "offset"),
    ({"seed": "0"}, TypeError, "seed"), ({"tol": "1e-4"}, TypeError, "tol"), ({"tol": -1.0}, ValueError, "tol"),
    ({"query_aware": "False"}, TypeError, "query_aware must be True or False"),
])
def test_bad_arguments(tiny, kwargs, error, match):
    """Arguments of the wrong type or out of range are refused up front, naming the argument."""
    with pytest.raises(error, match=match):
        small(tiny[0], [TEXT], **kwargs)


@pytest.mark.parametrize("texts", [TEXT, TEXT.encode(), bytearray(TEXT.encode())], ids=["str", "bytes", "bytearray"])
def test_one_string_is_refused(tiny, texts):
    """One string (say open(f).read()) in place of a list would calibrate on its single characters: TypeError
    saying to pass [text]."""
    with pytest.raises(TypeError, match=r"pass \[text\]"):
        small(tiny[0], texts)


def test_a_mapping_is_refused(tiny):
    """A mapping (a DatasetDict iterates over its split names) is refused."""
    with pytest.raises(TypeError, match="DatasetDict"):
        small(tiny[0], {"train": [TEXT]})


@pytest.mark.parametrize("texts, found", [([], 0), (["abc"], 4), (["x" * 300, "y" * 100], 402)])
def test_too_little_text_is_refused(tiny, texts, found):
    """No text, or less than 512 tokens (or n_centroids, if more), is refused naming the count and the minimum:
    the random-UUID tokens alone would make the codebooks."""
    with pytest.raises(ValueError, match=f"texts gave {found} tokens; at least 512 are needed"):
        small(tiny[0], texts)
    with pytest.raises(ValueError, match="texts gave 520 tokens; at least 600 are needed"):
        small(tiny[0], ["z" * 519], n_centroids=600, max_tokens=1000)


def test_the_signature_covers_every_served_layer(tiny):
    """Calibration records every served layer's weights signature: the same as Codebooks.sign() of the model."""
    model, books = tiny
    layers = books.weights_signature["layers"]
    assert len(layers) == len(books.layers) == 2 and all(entry["norm"] > 0 and "fp16" in entry for entry in layers)
    assert copy.copy(books).sign(model).weights_signature == books.weights_signature


def test_token_stream_stops_at_max_tokens():
    """The stream is cut at max_tokens and does not read further than needed."""
    def texts():
        yield "a" * 10
        yield "b" * 10
        raise AssertionError("read too far")

    assert len(token_stream(CharTokenizer(), texts(), 15)) == 15


def test_cache_codes_match_hooked_pre_rope_keys(tiny):
    """Codes the cache derives by inverting RoPE name the same centroids as codes of the k_proj outputs (the
    model's pre-RoPE keys); centroids closer than rounding (duplicates of one cluster) count as the same."""
    model, books = tiny
    ids = torch.randint(2, 256, (1, 100), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    keys = {}
    handles = [a.k_proj.register_forward_hook(lambda m, i, o, idx=a.layer_idx: keys.__setitem__(idx, o))
               for a in attention_modules(model)]
    cache = A2ATSCache(books)
    with torch.no_grad():
        model(ids, **cache_argument(model, cache))
    for h in handles:
        h.remove()
    for idx, layer in enumerate(cache.layers):
        pre = keys[idx].view(1, 100, 2, 16).transpose(1, 2)
        centroids = books.whitened_centroids[idx].to(DEVICE)  # [Hkv, M, D]
        expected = encode(pre, books.whitener[idx].to(DEVICE), centroids)
        named = [centroids.gather(1, c[0][..., None].expand(-1, -1, 16)) for c in (layer.codes.long(), expected)]
        agree = ((named[0] - named[1]).norm(dim=-1) <= 1e-4 * centroids.norm(dim=-1).max()).float().mean()
        assert agree > 0.99, f"layer {idx}: {agree:.3f}"


def test_unsupported_model_type(tiny):
    """calibrate refuses architectures it does not support."""
    model = tiny_model()
    model.config.model_type = "gpt2"
    with pytest.raises(NotImplementedError, match="supported"):
        small(model, [TEXT])
