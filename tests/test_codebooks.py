"""Codebooks: safetensors + JSON round trip, integrity checks, and validation that names every mismatch."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, LlamaForCausalLM, MistralConfig

from a2ats_hf import Codebooks
from a2ats_hf.codebooks import CONFIG_NAME, SIGNATURE_TOLERANCE, WEIGHTS_NAME, _signature_of, fingerprint

from conftest import tiny_model


def config(**overrides) -> LlamaConfig:
    values = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=64)
    return LlamaConfig(**{**values, **overrides})


def unsigned_books(cfg) -> Codebooks:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 16, 16, generator=gen)
    whitener = torch.linalg.cholesky(a @ a.transpose(-1, -2) + 16 * torch.eye(16))
    centroids = torch.randn(3, 2, 37, 16, generator=gen)
    return Codebooks(whitener, centroids, fingerprint(cfg), window=32, offset=1024, sink=4, calibration={"seed": 3})


def books_for(cfg) -> Codebooks:
    """Random codebooks for ``cfg``, signed with a random model of it (as calibrate() signs its codebooks)."""
    torch.manual_seed(0)
    return unsigned_books(cfg).sign(LlamaForCausalLM(cfg))


def saved(tmp_path, edit=None, tensors=None):
    """Save books_for(config()) to tmp_path, then apply ``edit`` to its config dict and ``tensors`` to its tensors
    (recomputing the checksum so only the edit is wrong); returns the folder."""
    books_for(config()).save_pretrained(tmp_path)
    weights, config_path = tmp_path / WEIGHTS_NAME, tmp_path / CONFIG_NAME
    cfg = json.loads(config_path.read_text())
    if tensors is not None:
        values = load_file(str(weights))
        tensors(values)
        save_file(values, str(weights))
        cfg["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    if edit is not None:
        edit(cfg)
    config_path.write_text(json.dumps(cfg))
    return tmp_path


def attentions(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


def validate_every_layer(books: Codebooks, model) -> None:
    """What the cache does on each layer's first forward."""
    for attention in attentions(model):
        books.validate(model.config, attention)


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
    """A folder without codebooks, or of another format version, fails clearly: the old format (one layer's norm
    for a signature) says to re-calibrate, a newer one to upgrade."""
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        Codebooks.from_pretrained(tmp_path)
    saved(tmp_path, lambda cfg: cfg.update(format_version=99))
    with pytest.raises(ValueError, match="format_version=99.*upgrade"):
        Codebooks.from_pretrained(tmp_path)
    saved(tmp_path, lambda cfg: cfg.update(format_version=1))
    with pytest.raises(ValueError, match="format_version=1.*Re-calibrate"):
        Codebooks.from_pretrained(tmp_path)


@pytest.mark.parametrize("content", ["", '{"format_version": 2, "n_cent'], ids=["empty", "truncated"])
def test_unreadable_config_names_the_file(tmp_path, content):
    """An empty or truncated config is refused with its path, not a bare JSONDecodeError."""
    saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / CONFIG_NAME} is not valid JSON"):
        Codebooks.from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["sha256", "weights_signature", "fingerprint", "n_centroids", "keys",
                                   "fingerprint.head_dim", "fingerprint.a2ats_layers"])
def test_required_fields(tmp_path, field):
    """A config without the checksum, the weights signature or any other field is refused, naming the field:
    deleting a field never turns a check off."""
    def drop(cfg):
        parent, _, name = field.rpartition(".")
        del (cfg[parent] if parent else cfg)[name]

    saved(tmp_path, drop)
    with pytest.raises(ValueError, match=f"lacks the required field '{field}'"):
        Codebooks.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, match", [
    (lambda cfg: cfg.update(n_centroids=38), "n_centroids=38 but the tensors have 37"),
    (lambda cfg: cfg["fingerprint"].update(head_dim=32), "fingerprint.head_dim=32 but the tensors have 16"),
    (lambda cfg: cfg["fingerprint"].update(a2ats_layers=[0, 1]), r"len\(fingerprint.a2ats_layers\)=2"),
    (lambda cfg: cfg["fingerprint"].update(a2ats_layers=[0, 1, 7]), "a2ats_layers=.*below num_hidden_layers"),
    (lambda cfg: cfg["weights_signature"]["layers"].pop(), "2 layer entries for the 3 layers"),
    (lambda cfg: cfg["weights_signature"]["layers"][1]["probes"].pop(), "weights_signature of layer 1 is malformed"),
    (lambda cfg: cfg["weights_signature"].update(scheme="norm"), "scheme 'norm'"),
    (lambda cfg: cfg.update(weights_signature=None), "weights_signature is null"),
    (lambda cfg: cfg.update(window="64"), "window must be an int"),
    (lambda cfg: cfg.update(sink=-1), "sink must be >= 0"),
], ids=["n_centroids", "head_dim", "layers", "layer-index", "signature-layers", "signature-probes", "scheme",
        "null-signature", "window", "sink"])
def test_config_disagreeing_with_the_tensors(tmp_path, edit, match):
    """A config edited so it disagrees with the tensors (or malformed) is refused, naming what disagrees."""
    saved(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        Codebooks.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, value", [("whitened_centroids", float("nan")), ("whitener", float("inf"))])
def test_non_finite_tensors_are_refused(tmp_path, name, value):
    """A NaN or inf in a tensor is refused naming the tensor, on load (even with the checksum recomputed to match)
    and on construction."""
    def poison(tensors):
        tensors[name][1, 0, 5, 3] = value

    saved(tmp_path, tensors=poison)
    with pytest.raises(ValueError, match=f"{name} holds 1 non-finite values"):
        Codebooks.from_pretrained(tmp_path)
    books = books_for(config())
    tensors = {"whitener": books.whitener.clone(), "whitened_centroids": books.whitened_centroids.clone()}
    poison(tensors)
    with pytest.raises(ValueError, match=f"{name} holds 1 non-finite values"):
        Codebooks(tensors["whitener"], tensors["whitened_centroids"], books.fingerprint)


def test_construction_refuses_inconsistent_tensors():
    """Tensors of disagreeing shapes, or a whitener that is no Cholesky factor, are refused on construction."""
    books = books_for(config())
    with pytest.raises(ValueError, match="disagree"):
        Codebooks(books.whitener[:2], books.whitened_centroids, books.fingerprint)
    with pytest.raises(ValueError, match="lower triangular"):
        Codebooks(books.whitener.transpose(-1, -2), books.whitened_centroids, books.fingerprint)
    with pytest.raises(ValueError, match="3 layer entries for the 2 layers"):
        Codebooks(books.whitener[:2], books.whitened_centroids[:2], {**books.fingerprint, "a2ats_layers": [0, 1]},
                  weights_signature=books.weights_signature)


def test_unsigned_codebooks_are_not_saved(tmp_path):
    """Codebooks built without a model carry no weights signature: the cache can use them, but saving them (whose
    loading requires the signature) is refused and says how to sign them."""
    books = unsigned_books(config())
    books.validate(config(), attentions(LlamaForCausalLM(config()))[0])  # nothing to compare: no error
    with pytest.raises(ValueError, match=r"books.sign\(model\)"):
        books.save_pretrained(tmp_path)


@contextlib.contextmanager
def key_weight_changed(attention, change):
    """``attention``'s key projection weight replaced by ``change(weight)`` for the duration."""
    original = attention.k_proj.weight.data
    attention.k_proj.weight.data = change(original.clone())
    try:
        yield
    finally:
        attention.k_proj.weight.data = original


def noise(weight, fraction=0.01, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return weight + fraction * weight.std() * torch.randn(weight.shape, generator=gen).to(weight)


def rerandomised(weight, seed=2):
    return torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)).to(weight) * weight.std()


FINE_TUNES = {"noise 1%": (0, noise), "scale x1.0005": (0, lambda w: w * 1.0005), "last layer re-randomised":
              (-1, rerandomised)}


@pytest.mark.parametrize("tune", FINE_TUNES)
def test_a_fine_tune_is_refused(tiny, tune):
    """+1% noise on one layer's key weight, a x1.0005 scale, or a re-randomised later layer: the layer's
    signature differs, and validate names the layer."""
    model, books = tiny
    layer, change = FINE_TUNES[tune]
    attention = attentions(model)[layer]
    validate_every_layer(books, model)
    with key_weight_changed(attention, change), pytest.raises(
            ValueError, match=f"weights_signature of layer {attention.layer_idx} .* another revision or a fine-tune"):
        validate_every_layer(books, model)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.bfloat16,), (torch.float16,),
                                    (torch.float16, torch.float32)], ids=lambda d: "->".join(map(str, d)))
def test_the_same_weights_in_another_dtype_are_accepted(tiny, dtypes):
    """The calibrated float32 weights loaded as bfloat16 or float16 (or round-tripped through them) pass: the
    signature rounds to bfloat16 (and keeps a float16-path copy for float32 weights)."""
    model, books = tiny
    other = tiny_model()
    for dtype in dtypes:
        other.to(dtype)
    validate_every_layer(books, other)


def test_a_bfloat16_checkpoint_in_float32_is_compared_as_it_is(tiny):
    """Codebooks calibrated on a bfloat16 checkpoint held in float32 (its values on the bfloat16 grid): the same
    checkpoint in bfloat16 or float16 passes, while float32 weights off that grid, x1.0005 (which rounds back to
    the same bfloat16 values) or +1% noise, are refused."""
    _, books = tiny
    checkpoint = tiny_model().to(torch.bfloat16).float()
    books = copy.copy(books).sign(checkpoint)
    assert all(entry["grid"] == "bfloat16" for entry in books.weights_signature["layers"])
    for dtype in (torch.bfloat16, torch.float16):
        validate_every_layer(books, tiny_model().to(torch.bfloat16).to(dtype))
    for change in (lambda w: w * 1.0005, noise):
        with key_weight_changed(attentions(checkpoint)[1], change), pytest.raises(ValueError, match="layer 1"):
            validate_every_layer(books, checkpoint)


def test_quantized_key_weights_are_skipped_with_one_warning(tiny):
    """A key weight that is not floating point (packed, quantized) cannot be compared: one warning, no error."""
    model, books = tiny
    books = copy.copy(books)
    books._warned_unchecked = False  # the session's codebooks may have warned already (an accelerate-offloaded test)
    other = tiny_model()
    for attention in attentions(other):
        attention.k_proj.weight = torch.nn.Parameter(torch.ones_like(attention.k_proj.weight, dtype=torch.int8),
                                                     requires_grad=False)
    with pytest.warns(UserWarning, match="cannot be compared") as caught:
        validate_every_layer(books, other)
    assert len(caught) == 1


def test_layers_a2ats_does_not_serve_are_ignored(tiny):
    """validate with an attention module of a layer the codebooks do not cover checks the config alone; a module
    without layer_idx is refused."""
    model, books = tiny
    books.validate(model.config, SimpleNamespace(layer_idx=7, config=model.config))
    with pytest.raises(ValueError, match="layer_idx"):
        books.validate(model.config, SimpleNamespace(config=model.config))


def test_signature_of_a_large_layer_is_cheap():
    """A [1024, 4096] key weight's signature takes a few ms (the probe vectors are cached per shape and device)."""
    weight = torch.randn(1024, 4096) * 0.02
    _signature_of(weight)
    times = []
    for _ in range(5):
        start = time.process_time()
        _signature_of(weight)
        times.append(time.process_time() - start)
    assert min(times) < 0.05, times  # ~5 ms of CPU time (2 threads) on the development machine


@pytest.mark.slow
def test_smollm2_fine_tunes_refused_other_dtypes_accepted(smollm2):
    """On the real SmolLM2-135M (30 layers, float32): its weights round-tripped through bfloat16 or float16 pass on
    every layer; +1% noise on layer 17, x1.0005 on layer 0, or layer 29 re-randomised are each refused."""
    model, _ = smollm2
    cfg = model.config
    layers, hkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    books = Codebooks(torch.eye(d).expand(layers, hkv, d, d).clone(), torch.randn(layers, hkv, 16, d),
                      fingerprint(cfg)).sign(model)
    for dtype in (torch.bfloat16, torch.float16):
        for attention in attentions(model):
            with key_weight_changed(attention, lambda w: w.to(dtype).float()):
                books.validate(cfg, attention)
    for layer, change in ((17, noise), (0, lambda w: w * 1.0005), (29, rerandomised)):
        with key_weight_changed(attentions(model)[layer], change), pytest.raises(
                ValueError, match=f"weights_signature of layer {layer} "):
            validate_every_layer(books, model)
    assert SIGNATURE_TOLERANCE == 1e-4
