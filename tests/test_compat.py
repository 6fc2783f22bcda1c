"""The transformers-version shim: the cache goes to a model under the name its forward takes."""

from __future__ import annotations

import inspect
import warnings

from a2ats_hf import A2ATSCache, cache_argument

from conftest import generate, ids_of


def test_cache_argument_uses_the_models_name_for_the_cache(tiny):
    """Under the name the model's forward takes (``cache`` in newer transformers, ``past_key_values`` before), so
    generation neither warns about the old name nor rejects the new one."""
    model, books = tiny
    cache = A2ATSCache(books)
    ((name, value),) = cache_argument(model, cache).items()
    assert value is cache and name in inspect.signature(model.forward).parameters
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        generate(model, ids_of(1, 40), cache, new=2)
    assert cache.get_seq_length() == 41
