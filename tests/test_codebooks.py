"""Codebooks: safetensors + JSON round trip, integrity checks, and validation that names every mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, MistralConfig

from a2ats_hf import Codebooks
from a2ats_hf.codebooks import CONFIG_NAME, WEIGHTS_NAME, fingerprint


def config(**overrides) -> LlamaConfig:
    values = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return LlamaConfig(**{**values, **overrides})


def books_for(cfg) -> Codebooks:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 16, 16, generator=gen)
    whitener = torch.linalg.cholesky(a @ a.transpose(-1, -2) + 16 * torch.eye(16))
    centroids = torch.randn(3, 2, 37, 16, generator=gen)
    return Codebooks(whitener, centroids, fingerprint(cfg), window=32, offset=1024, sink=4, calibration={"seed": 3})


def test_round_trip_is_bit_exact(tmp_path):
    """save_pretrained/from_pretrained keep every tensor and setting exactly; only safetensors and JSON are written."""
    books = books_for(config())
    books.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = Codebooks.from_pretrained(tmp_path)
    for name in ("whitener", "whitened_centroids", "centroids"):
        assert torch.equal(getattr(loaded, name), getattr(books, name)), name
    assert loaded.config_dict() == books.config_dict()
    post = books_for(config())
    post.keys = "post_rope"
    post.save_pretrained(tmp_path / "post")
    assert Codebooks.from_pretrained(tmp_path / "post").keys == "post_rope"


def test_centroids_are_mapped_back_to_key_space():
    """centroids @ L == whitened centroids (c = c' L^-1)."""
    books = books_for(config())
    torch.testing.assert_close(books.centroids @ books.whitener, books.whitened_centroids, atol=1e-4, rtol=1e-4)


def test_validate_accepts_the_right_model():
    books_for(config()).validate(config())


@pytest.mark.parametrize("change, field", [({"num_hidden_layers": 4}, "num_hidden_layers"),
                                            ({"num_key_value_heads": 4}, "num_key_value_heads"),
                                            ({"head_dim": 32}, "head_dim"),
                                            ({"rope_theta": 500000.0}, "rope_parameters")])
def test_validate_names_the_mismatch(change, field):
    """Each mismatched field is named in the error."""
    with pytest.raises(ValueError, match=field):
        books_for(config()).validate(config(**change))


def test_validate_lists_every_mismatch():
    """Several mismatches are all reported at once."""
    with pytest.raises(ValueError) as error:
        books_for(config()).validate(config(num_hidden_layers=5, head_dim=32))
    assert "num_hidden_layers" in str(error.value) and "head_dim" in str(error.value)


def test_validate_rejects_unsupported_architectures():
    """Another model type raises NotImplementedError listing what is supported; a supported one with other shapes
    names the mismatching fields."""
    with pytest.raises(NotImplementedError, match="supported: Llama-style"):
        books_for(config()).validate(GPTNeoXConfig(hidden_size=64, num_attention_heads=4))
    with pytest.raises(ValueError, match="model_type: codebooks have 'llama', model has 'mistral'"):
        books_for(config()).validate(MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                   sliding_window=None))


@pytest.mark.parametrize("make", [
    lambda: MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=256),
    lambda: Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             attn_logit_softcapping=50.0),
], ids=["sliding-window-everywhere", "softcapping"])
def test_configurations_a2ats_cannot_serve(make):
    """A model whose every layer slides, or one with attention logit soft-capping, is refused with the reason."""
    with pytest.raises((ValueError, NotImplementedError), match="sliding window of 256|soft-capping"):
        fingerprint(make())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_tensors_fail_the_checksum(tmp_path, damage):
    """An altered or truncated tensor file is refused with a checksum error."""
    books_for(config()).save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        Codebooks.from_pretrained(tmp_path)


def test_missing_files_and_wrong_version(tmp_path):
    """A folder without codebooks, or of another format version, fails clearly."""
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        Codebooks.from_pretrained(tmp_path)
    books_for(config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        Codebooks.from_pretrained(tmp_path)
