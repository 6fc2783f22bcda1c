"""`calibrate`: collect pre-RoPE keys and windowed-RoPE queries from a model with forward hooks, build Codebooks."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

import torch
from torch import nn
from tqdm.auto import tqdm

from .codebooks import Codebooks, check_supported, fingerprint, weights_signature
from .quantization import kmeans, second_moment, whitening
from .rope import RoPE


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (modules with ``layer_idx``, ``q_proj`` and ``k_proj``)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def _text_of(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "text" in item:  # rows of a `datasets` dataset
        return item["text"]
    raise TypeError(f"calibration texts must be strings or rows with a 'text' field, got {type(item).__name__}")


def token_stream(tokenizer, texts: Iterable, max_tokens: int) -> torch.Tensor:
    """Concatenated token ids of ``texts`` (each separated by EOS), cut at ``max_tokens``."""
    ids: list[int] = []
    for item in texts:
        ids += tokenizer(_text_of(item), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def uuid_texts(seed: int) -> Iterator[str]:
    """An endless, seeded stream of lines of random UUIDs (the reference's out-of-distribution calibration data)."""
    rng = random.Random(seed)
    while True:
        yield " ".join(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(64))


class _Collector:
    """Forward hooks on q_proj/k_proj of every layer: keys [layers, Hkv, N, D] and query second moments."""

    def __init__(self, model: nn.Module, total_tokens: int, offset: int):
        self.attentions = attention_modules(model)
        cfg = fingerprint(model.config)
        self.hkv, self.dim = cfg["num_key_value_heads"], cfg["head_dim"]
        self.group = cfg["num_attention_heads"] // self.hkv
        device = next(model.parameters()).device
        n_layers = len(self.attentions)
        self.keys = torch.empty(n_layers, self.hkv, total_tokens, self.dim, dtype=torch.float32, device=device)
        self.moments = torch.zeros(n_layers, self.hkv, self.dim, self.dim, dtype=torch.float64, device=device)
        self.query_count = 0
        self.filled = 0
        self.rope = RoPE.for_attention(self.attentions[0])
        self.offset = offset
        self.handles = []
        for i, attn in enumerate(self.attentions):
            self.handles.append(attn.k_proj.register_forward_hook(self._key_hook(i)))
            self.handles.append(attn.q_proj.register_forward_hook(self._query_hook(i)))

    def _heads(self, out: torch.Tensor) -> torch.Tensor:
        b, t, _ = out.shape
        return out.view(b, t, -1, self.dim).transpose(1, 2)  # [B, H, T, D]

    def _key_hook(self, i: int):
        def hook(module, args, out):
            k = self._heads(out)[0].float()  # batch of one
            self.keys[i, :, self.filled : self.filled + k.shape[1]] = k

        return hook

    def _query_hook(self, i: int):
        def hook(module, args, out):
            q = self.rope.at(self._heads(out), self.offset)[0]  # [Hq, T, D]
            q = q.reshape(self.hkv, self.group * q.shape[1], self.dim)
            self.moments[i] += second_moment(q).double()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def calibrate(
    model: nn.Module,
    tokenizer,
    texts: Iterable,
    n_centroids: int = 4096,
    max_tokens: int = 65536,
    chunk_size: int = 8192,
    uuid_tokens: int = 16384,
    kmeans_iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    window: int = 64,
    offset: int = 2048,
    sink: int = 8,
    progress: bool = True,
) -> Codebooks:
    """Build query-aware codebooks for ``model`` from calibration ``texts`` (+ ``uuid_tokens`` of random UUIDs).

    Runs the texts through the model in ``chunk_size`` pieces, recording pre-RoPE keys and the second moment of
    windowed-RoPE queries (position ``offset``) per (layer, KV head) with forward hooks, then whitens the keys by
    the moments' Cholesky factor and runs batched k-means with ``n_centroids`` centroids.
    """
    check_supported(model.config)
    if n_centroids < 2 or n_centroids > 65536:
        raise ValueError(f"n_centroids must lie in [2, 65536] (codes are uint16), got {n_centroids}")
    started = time.perf_counter()
    ids = token_stream(tokenizer, texts, max_tokens)
    if uuid_tokens > 0:
        ids = torch.cat([ids, token_stream(tokenizer, uuid_texts(seed), uuid_tokens)])
    if len(ids) < n_centroids:
        raise ValueError(f"calibration has {len(ids)} tokens, fewer than n_centroids={n_centroids}; pass more text")
    device = next(model.parameters()).device
    collector = _Collector(model, len(ids), offset)
    try:
        chunks = range(0, len(ids), chunk_size)
        for start in tqdm(chunks, desc="calibration forward", disable=not progress):
            piece = ids[start : start + chunk_size][None].to(device)
            model.base_model(input_ids=piece, use_cache=False)
            collector.filled += piece.shape[1]
    finally:
        collector.remove()
    first_attention = collector.attentions[0]
    n_layers, hkv, n, d = collector.keys.shape
    whitener = whitening(collector.moments.view(n_layers * hkv, d, d))
    z = collector.keys.view(n_layers * hkv, n, d) @ whitener
    del collector
    result = kmeans(z, n_centroids, max_iters=kmeans_iters, tol=tol, seed=seed, progress=progress)
    calibration = {
        "model": getattr(model.config, "_name_or_path", ""),
        "model_revision": getattr(model.config, "_commit_hash", None),
        "text_tokens": int(len(ids) - min(uuid_tokens, len(ids))),
        "uuid_tokens": int(uuid_tokens),
        "kmeans_iterations": result.iterations,
        "kmeans_objective": result.objective,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return Codebooks(
        whitener=whitener.view(n_layers, hkv, d, d).cpu(),
        whitened_centroids=result.centroids.view(n_layers, hkv, n_centroids, d).cpu(),
        fingerprint={**fingerprint(model.config), "weights_signature": weights_signature(first_attention)},
        window=window,
        offset=offset,
        sink=sink,
        calibration=calibration,
    )
