"""`calibrate`: collect pre-RoPE keys and windowed-RoPE queries from a model with forward hooks, build Codebooks."""

from __future__ import annotations

import numbers
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .codebooks import KEYS, SIGNATURE_SCHEME, Codebooks, check_int, check_supported, fingerprint, layer_signature
from .families import attention_modules
from .kmeans import kmeans, second_moment, whitening
from .rope import RoPE, apply_rope, bucket_turns

# The fewest text tokens calibrate() accepts (or n_centroids, if larger): below this the query moments and the keys'
# clusters come from a handful of tokens, or from the random UUIDs alone.
MIN_TEXT_TOKENS = 512
RECORDER = "a2ats_recorder"  # the attribute a calibration in progress sets on each attention module it records


def _text_of(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "text" in item:  # rows of a `datasets` dataset
        return item["text"]
    raise TypeError(f"calibration texts must be strings or rows with a 'text' field, got {type(item).__name__}")


def _check_texts(texts) -> None:
    """TypeError for ``texts`` that are not an iterable of texts: one string (its characters would be the texts),
    bytes, or a mapping (a DatasetDict iterates over its split names)."""
    if isinstance(texts, (str, bytes, bytearray)):
        raise TypeError(f"calibration texts must be a list (or other iterable) of strings, got one "
                        f"{type(texts).__name__} of length {len(texts)}, whose single characters would be the texts: "
                        "pass [text]")
    if isinstance(texts, Mapping):
        raise TypeError(f"calibration texts must be a list of strings or dataset rows, got a {type(texts).__name__} "
                        "(for a DatasetDict pass one split, e.g. dataset['train']; for one row, [row])")
    if not isinstance(texts, Iterable):
        raise TypeError(f"calibration texts must be a list (or other iterable) of strings, got {type(texts).__name__}")


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


def recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """The "a2ats_calibration" attention: exact sdpa that also hands the post-RoPE query and key to the
    calibration in progress (set on the attention module while it runs), so keys come from the model's own modules
    whatever their projection layout."""
    collector = getattr(module, RECORDER, None)
    if collector is not None:
        collector.record(module, query, key, kwargs.get("position_ids"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class _Collector:
    """Keys [layers, Hkv, N, D] and query second moments of the retrieval layers: pre-RoPE keys and windowed-RoPE
    queries, or (``keys="post_rope"``) both as the model rotated them, or (``queries="distance"``) pre-RoPE keys and
    the queries turned by each distance bucket's rotation, each bucket weighted by the attention mass it carries."""

    def __init__(self, model: nn.Module, total_tokens: int, offset: int, keys: str, queries: str, window: int,
                 sink: int):
        cfg = fingerprint(model.config)
        self.layers = {idx: i for i, idx in enumerate(cfg["a2ats_layers"])}
        self.attentions = {m.layer_idx: m for m in attention_modules(model)}
        self.hkv, self.dim = cfg["num_key_value_heads"], cfg["head_dim"]
        self.group = cfg["num_attention_heads"] // self.hkv
        device = next(model.parameters()).device
        self.keys = torch.empty(len(self.layers), self.hkv, total_tokens, self.dim, dtype=torch.float32, device=device)
        self.moments = torch.zeros(len(self.layers), self.hkv, self.dim, self.dim, dtype=torch.float64, device=device)
        self.filled = 0
        self.rope_layer = cfg["a2ats_layers"][0]
        self.rope = RoPE.for_attention(self.attentions[self.rope_layer])
        self.offset, self.post_rope = offset, keys == "post_rope"
        self.distance, self.window, self.sink = queries == "distance", window, sink
        self.signatures: dict[int, dict | None] = {}  # layer -> weights signature, taken while its weights are in

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None):
        i = self.layers.get(module.layer_idx)
        if i is None:  # a sliding-window layer
            return
        if module.layer_idx not in self.signatures:  # inside the forward: weights offloaded by accelerate are loaded
            self.signatures[module.layer_idx] = layer_signature(module)
        t = key.shape[2]
        if position_ids is None:
            position_ids = torch.arange(t, device=key.device)[None]
        if self.post_rope:
            keys, q = key[0], query[0]
        else:
            keys = self.rope.invert(key[:1], position_ids[:1])[0]  # batch of one: [Hkv, T, D]
            if self.distance:
                q = self.distance_queries(query[:1], key[:1], position_ids[:1])
            else:
                q = self.rope.windowed_query(query[:1], position_ids[:1], self.offset)[0]  # [Hq, T, D]
        self.keys[i, :, self.filled : self.filled + t] = keys.to(self.keys.device)
        q = q.reshape(self.hkv, -1, self.dim)
        self.moments[i] += second_moment(q).double().to(self.moments.device)

    def bucket_mass(self, query: torch.Tensor, key: torch.Tensor, bucket: torch.Tensor,
                    probes: int = 64) -> torch.Tensor:
        """[Hkv, buckets]: each distance bucket's share of the retrievable attention mass (beyond the sinks and the
        window) of the KV head's queries, measured on the chunk's last ``probes`` post-RoPE queries."""
        t = key.shape[2]
        last = query[0, :, -probes:].float()  # [Hq, P, D]
        logits = last @ key[0].float().repeat_interleave(self.group, 0).transpose(1, 2) / self.dim**0.5  # [Hq, P, T]
        columns = torch.arange(t, device=key.device)
        gap = columns[t - last.shape[1] :, None] - columns[None]  # each key's distance from each probe
        far = (gap >= self.window) & (columns >= self.sink)[None]
        probs = logits.masked_fill(gap < 0, float("-inf")).softmax(-1) * far
        mass = torch.zeros(probs.shape[0], int(bucket.max()) + 1, device=key.device)
        mass.index_add_(1, bucket[gap.clamp(min=0)].flatten(), probs.flatten(1))
        mass = mass.view(self.hkv, self.group, -1).sum(1)
        return mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)

    def distance_queries(self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[Hkv, G * buckets * T, D]: the chunk's pre-RoPE queries turned by each distance bucket's mean rotation
        and scaled by the square root of the bucket's :meth:`bucket_mass`, so their second moment weighs the
        buckets as attention does."""
        t = key.shape[2]
        cos, sin, bucket, _ = bucket_turns(self.rope, t - 1, position_ids, self.window, device=key.device)
        weight = self.bucket_mass(query, key, bucket)
        unrotated = self.rope.invert(query, position_ids)[0]  # [Hq, T, D]
        turned = apply_rope(unrotated[:, None], cos[0, :, :, None], sin[0, :, :, None])  # [Hq, buckets, T, D]
        turned = turned.view(self.hkv, self.group, -1, t, self.dim) * weight.sqrt()[:, None, :, None, None]
        return turned.reshape(self.hkv, -1, self.dim)


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
    query_aware: bool = True,
    keys: str = "pre_rope",
    queries: str = "wrope",
    progress: bool = True,
) -> Codebooks:
    """Build query-aware codebooks for ``model`` from calibration ``texts`` (+ ``uuid_tokens`` of random UUIDs).

    Runs the texts through the model in ``chunk_size`` pieces with the "a2ats_calibration" attention, recording
    pre-RoPE keys and the second moment of windowed-RoPE queries (position ``offset``) per (layer, KV head) of the
    layers A2ATS serves, then whitens the keys by the moments' Cholesky factor and runs batched k-means with
    ``n_centroids`` centroids.

    Ablations, for the evaluation suite: ``query_aware=False`` is plain k-means on the keys (no whitening);
    ``keys="post_rope"`` quantizes the keys as the model rotated them, weighted by the true queries' moments.
    ``queries="distance"`` weighs the error by the queries the "distance" scorer uses: turned by each distance
    bucket's mean rotation, each bucket weighted by the attention mass it carries in the calibration text.
    """
    check_supported(model.config)
    _check_texts(texts)
    if keys not in KEYS:
        raise ValueError(f"keys must be one of {KEYS}, got {keys!r}")
    if queries not in ("wrope", "distance") or (queries == "distance" and keys != "pre_rope"):
        raise ValueError(f'queries must be "wrope" or "distance" (with keys="pre_rope"), got {queries!r}')
    n_centroids = check_int("n_centroids", n_centroids, 2, 65536)  # codes are uint16
    max_tokens, chunk_size = check_int("max_tokens", max_tokens, 1), check_int("chunk_size", chunk_size, 1)
    uuid_tokens, kmeans_iters = check_int("uuid_tokens", uuid_tokens, 0), check_int("kmeans_iters", kmeans_iters, 1)
    seed, window = check_int("seed", seed, 0), check_int("window", window, 1)
    offset, sink = check_int("offset", offset, 0), check_int("sink", sink, 0)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a number, got {type(tol).__name__} {tol!r}")
    if not 0 <= tol < float("inf"):
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    for name, flag in (("query_aware", query_aware), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
    needed = max(n_centroids, MIN_TEXT_TOKENS)
    if max_tokens < needed:
        raise ValueError(f"max_tokens={max_tokens} caps the calibration text below the {needed} text tokens needed "
                         f"(n_centroids={n_centroids}, and never fewer than {MIN_TEXT_TOKENS})")
    started = time.perf_counter()
    ids = token_stream(tokenizer, texts, max_tokens)
    text_tokens = len(ids)
    if text_tokens < needed:
        raise ValueError(f"The calibration texts gave {text_tokens} tokens; at least {needed} are needed "
                         f"(n_centroids={n_centroids}, and never fewer than {MIN_TEXT_TOKENS}; the random-UUID "
                         "tokens do not count). Pass more text.")
    if uuid_tokens > 0:
        ids = torch.cat([ids, token_stream(tokenizer, uuid_texts(seed), uuid_tokens)])
    device = next(model.parameters()).device
    collector = _Collector(model, len(ids), offset, keys, queries, window, sink)
    implementation = model.config._attn_implementation
    model.set_attn_implementation("a2ats_calibration")
    for attention in collector.attentions.values():
        setattr(attention, RECORDER, collector)
    try:
        chunks = range(0, len(ids), chunk_size)
        for start in tqdm(chunks, desc="calibration forward", disable=not progress):
            piece = ids[start : start + chunk_size][None].to(device)
            collector.rope.new_step()
            model.base_model(input_ids=piece, use_cache=False)
            collector.filled += piece.shape[1]
    finally:
        for attention in collector.attentions.values():
            delattr(attention, RECORDER)
        model.set_attn_implementation(implementation)
    signatures = [collector.signatures.get(idx) or layer_signature(collector.attentions[idx])
                  for idx in collector.layers]
    n_layers, hkv, n, d = collector.keys.shape
    if not query_aware:  # identity moments: the whitener is a multiple of I, k-means runs on the keys themselves
        collector.moments.copy_(torch.eye(d, dtype=torch.float64))
    whitener = whitening(collector.moments.view(n_layers * hkv, d, d))
    z = collector.keys.view(n_layers * hkv, n, d)
    for i in range(len(z)):  # whitened in place, one head at a time: the keys are the largest buffer
        z[i] = z[i] @ whitener[i]
    del collector
    result = kmeans(z, n_centroids, max_iters=kmeans_iters, tol=tol, seed=seed, progress=progress)
    calibration = {
        "model": getattr(model.config, "_name_or_path", ""),
        "model_revision": getattr(model.config, "_commit_hash", None),
        "text_tokens": text_tokens,
        "uuid_tokens": int(uuid_tokens),
        "kmeans_iterations": result.iterations,
        "kmeans_objective": result.objective,
        "seed": seed,
        "query_aware": query_aware,
        "queries": queries,
        "seconds": round(time.perf_counter() - started, 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return Codebooks(
        whitener=whitener.view(n_layers, hkv, d, d).cpu(),
        whitened_centroids=result.centroids.view(n_layers, hkv, n_centroids, d).cpu(),
        fingerprint=fingerprint(model.config),
        weights_signature={"scheme": SIGNATURE_SCHEME, "layers": signatures},
        window=window,
        offset=offset,
        sink=sink,
        calibration=calibration,
        keys=keys,
    )
