"""How a decode step scores the far tokens before the top-K: A2ATS's windowed-RoPE lookup table, and the
baselines the evaluation suite compares it with, behind one interface.

Every scorer returns a score table ``lut`` [B, Hq, M] and each stored token's entry in it ``codes`` [B, Hkv, N]
(token j of KV head h scores ``lut[:, q, codes[:, h, j]]`` for the query heads q of h), so one top-K kernel
(:func:`a2ats_hf.kernels.select_topk`, its budget rules and tie-breaking) serves them all. A2ATS's table has one
column per centroid; the exact oracle's and random selection's one per token; Quest's one per page.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import kernels
from .encoding import lookup_table
from .kernels import code_histogram
from .rope import bucket_turns, compose, distance_buckets

if TYPE_CHECKING:
    from .cache import A2ATSLayer


@dataclass
class Scorer:
    """Scores of a step's far tokens. ``retrieves`` False: nothing is retrieved (sinks + window alone); ``keys``:
    the codebooks' kind the scorer reads codes of (None: it reads no codes); ``reads_code_histogram``: it hands the
    top-K the layer's histogram of the candidates' codes, which the layer then keeps up to date."""

    name = "base"
    retrieves = True
    keys = None  # type: str | None
    reads_code_histogram = False

    def scores(self, layer: "A2ATSLayer", query: torch.Tensor, position_ids: torch.Tensor, scaling: float,
               far: torch.Tensor):
        """(lut [B, Hq, M], codes [B, Hkv, N], histogram [B, Hkv, M] of the far candidates' codes or None);
        ``far`` [B, N] marks this step's candidates."""
        raise NotImplementedError

    def held(self, layer: "A2ATSLayer") -> tuple[torch.Tensor, ...]:
        """Device tensors the scorer keeps for ``layer`` (counted by ``A2ATSCache.memory_footprint``)."""
        return ()

    def forget(self, layer: "A2ATSLayer") -> None:
        """Drop what the scorer keeps for ``layer``, after its rows or length changed other than by appending
        (beam search, a crop): it is rebuilt from the layer at the next step."""

    def stepped(self, layer: "A2ATSLayer") -> None:
        """After a capture-ready step, replayed or not (no Python runs in a replay): move on what the scorer counts
        on the host, as the graph runner moves the store's length."""


def token_codes(layer: "A2ATSLayer", page: int = 1) -> torch.Tensor:
    """[B, Hkv, N] int32: each stored token's own column (``page`` 1) or its page's."""
    b, h, _ = layer.codes.shape
    n = layer.store.length
    return (torch.arange(n, device=layer.device, dtype=torch.int32) // page).expand(b, h, n)


@dataclass
class KeyMirror(Scorer):
    """A baseline that reads every stored (post-RoPE) key: it keeps a float32 copy per layer on the device, extended
    by the columns stored since its last call (for evaluation, not serving)."""

    def __post_init__(self):
        self.mirror: dict = {}

    def stored_keys(self, layer: "A2ATSLayer", device: torch.device) -> torch.Tensor:
        """All stored keys [B, Hkv, N, D], float32 on ``device``."""
        n, have = layer.store.length, self.mirror.get(layer)
        done = 0 if have is None or have.shape[2] > n else have.shape[2]
        if done < n:
            new = layer.store.to_tensors(start=done)[0].to(device).float()
            self.mirror[layer] = have = new if done == 0 else torch.cat([have, new], dim=2)
        return have

    def held(self, layer):
        return tuple(t for t in [self.mirror.get(layer)] if t is not None)

    def forget(self, layer):
        self.mirror.pop(layer, None)


@dataclass
class WindowedRoPE(Scorer):
    """A2ATS: the query rotated to the codebooks' offset b scores every centroid; tokens score by their code."""

    name = "wrope"
    keys = "pre_rope"
    reads_code_histogram = True

    def scores(self, layer, query, position_ids, scaling, far):
        cache = layer.cache
        b = query.shape[0]
        rotation = cache.rope.windowed_rotation(position_ids[:, -1:].expand(b, 1), cache.codebooks.offset, query.device)
        return kernels.rotated_lookup_table(query, rotation, layer.centroids), layer.codes, layer.histogram


@dataclass
class BucketColumns:
    """One layer's (bucket, code) column of every stored token, in a buffer grown by doubling, and the histogram of
    the far candidates' columns [B, Hkv, >= buckets * M], as of ``length`` stored tokens (as the host counts them:
    a capture-ready step's count is moved on after it, replayed or not, by :meth:`Scorer.stepped`)."""

    length: int
    buffer: torch.Tensor
    histogram: torch.Tensor


@dataclass
class DistanceBuckets(Scorer):
    """Distance-aware A2ATS: the far tokens fall into distance buckets growing geometrically from the window's edge,
    each bucket scores every centroid with the query turned by the bucket's ``rotation`` ("mean": the mean of its
    distances' rotations, so a token's score is its expected score over the bucket and the pairs that turn fast
    within it fade; "center": the rotation to its geometric centre), and a token scores its bucket's entry for its
    code. Codes stay pre-RoPE and position-free; the table grows with the bucket count, not with N.

    Each layer's (bucket, code) columns and their histogram move on by one token per decode step (one token crosses
    each bucket edge; one leaves the window) instead of being rebuilt over all N."""

    per_octave: int = 1
    rotation: str = "mean"
    name = "distance"
    keys = "pre_rope"

    def __post_init__(self):
        if self.per_octave < 1 or self.rotation not in ("mean", "center"):
            raise ValueError(f'per_octave must be >= 1 and rotation "mean" or "center", got {self.per_octave}, '
                             f'{self.rotation!r}')
        self.state = weakref.WeakKeyDictionary()  # a layer's KVStore -> BucketColumns: a new prompt's store starts
        # afresh, and the columns go with the store

    def turns(self, layer: "A2ATSLayer", position_ids: torch.Tensor, device: torch.device):
        """(cos, sin [B, 1, buckets, D'] turning a post-RoPE query at ``position_ids`` [B, 1] by each bucket's
        rotation, bucket of each distance 0..N-1 [N], the first distance of buckets 1, 2, ... [buckets - 1]), once
        per pass: the layers of a pass share them. In a capture-ready step N is the step's width, and the length on
        the device decides which distances count."""
        rope, width, static = layer.cache.rope, layer.width, layer.cache.static
        length = None if static is None else static.length

        def compute():
            cos, sin, bucket = bucket_turns(rope, width - 1, position_ids, layer.config.window, self.per_octave,
                                            self.rotation, device, length)
            cos, sin = compose(rope.inverse_rotation(position_ids, device), (cos, sin))  # un-rotate, then turn
            return cos, sin, bucket, torch.searchsorted(bucket, torch.arange(1, cos.shape[2], device=device))

        key = ("distance", self.per_octave, self.rotation, width, position_ids, device)
        return layer.cache.pass_memo(key, compute)

    def columns(self, layer: "A2ATSLayer", far: torch.Tensor, bucket: torch.Tensor, starts: torch.Tensor,
                width: int) -> BucketColumns:
        """The layer's :class:`BucketColumns` at its current length, with a histogram at least ``width`` columns
        wide: moved on from the last step's, or rebuilt (after a prompt, when the buffers are too small, or after
        steps that did not move them). A capture-ready step moves them with the length on the device; its buffers
        hold the layer's whole capacity, so they keep their addresses."""
        static = layer.cache.static is not None
        n = layer.store.length + static  # tokens with this step's: the runner moves a capture-ready step's length
        state = self.state.get(layer.store)
        fits = state is not None and state.histogram.shape[-1] >= width and state.buffer.shape[-1] >= layer.width
        if fits and state.length == n - 1:
            kernels.move_bucket_columns(state.buffer, state.histogram, layer.code_buffer, far, starts,
                                        layer.length, layer.centroids.shape[1], layer.config.window)
        elif not (fits and state.length == n):
            capacity = layer.code_buffer.shape[-1] if static else 2 * n
            m = layer.centroids.shape[1]
            buckets = int(distance_buckets(torch.tensor([capacity - 1]), layer.config.window, self.per_octave)) + 1
            buffer = torch.zeros(*layer.codes.shape[:2], capacity, dtype=torch.int32, device=far.device)
            buffer[:, :, :n] = bucket[:n].flip(0) * m + layer.code_buffer[:, :, :n].to(torch.int32)  # j: n-1-j back
            histogram = code_histogram(buffer[:, :, :n], far[:, :n], max(buckets * m, width))
            state = self.state[layer.store] = BucketColumns(n, buffer, histogram)
        state.length = n - static  # a capture-ready step's: moved on with the store's by :meth:`stepped`
        return state

    def stepped(self, layer):
        state = self.state.get(layer.store)
        if state is not None:
            state.length += 1

    def scores(self, layer, query, position_ids, scaling, far):
        cos, sin, bucket, starts = self.turns(layer, position_ids[:, -1:], query.device)
        lut = kernels.rotated_lookup_table(query, (cos, sin), layer.centroids)  # [B, Hq, buckets * M]
        state = self.columns(layer, far, bucket, starts, lut.shape[-1])
        return lut, state.buffer[:, :, : layer.width], state.histogram[:, :, : lut.shape[-1]]

    def held(self, layer):
        state = self.state.get(layer.store)
        return () if state is None else (state.buffer, state.histogram)

    def forget(self, layer):
        self.state.pop(layer.store, None)


@dataclass
class PostRoPE(Scorer):
    """Ablation: codebooks of post-RoPE keys (each code holds its token's position), scored by the true query."""

    name = "postrope"
    keys = "post_rope"
    reads_code_histogram = True

    def scores(self, layer, query, position_ids, scaling, far):
        lut = lookup_table(query, layer.centroids, query.shape[1] // layer.codes.shape[1])
        return lut, layer.codes, layer.histogram


@dataclass
class Exact(KeyMirror):
    """The oracle: exact attention logits against every stored key (the true top-K)."""

    name = "oracle"

    def scores(self, layer, query, position_ids, scaling, far):
        keys = self.stored_keys(layer, query.device)
        b, hkv, n, d = keys.shape
        q = query.float().view(b, hkv, -1, d)
        lut = torch.einsum("bkgd,bknd->bkgn", q, keys).reshape(b, -1, n) * scaling
        return lut, token_codes(layer), None


@dataclass
class Quest(KeyMirror):
    """Quest (Tang et al., 2024): per page of ``page`` tokens, an upper bound of q.k from the page's elementwise key
    minimum and maximum, ``sum_d max(q_d min_d, q_d max_d)``; a page's tokens share its score."""

    page: int = 16
    name = "quest"

    def scores(self, layer, query, position_ids, scaling, far):
        keys = self.stored_keys(layer, query.device)
        b, hkv, n, d = keys.shape
        pages = -(-n // self.page)
        padded = torch.nn.functional.pad(keys, (0, 0, 0, pages * self.page - n), mode="replicate")
        paged = padded.view(b, hkv, pages, self.page, d)
        low, high = paged.amin(3), paged.amax(3)  # [B, Hkv, P, D]
        q = query.float().view(b, hkv, -1, 1, d)
        bound = torch.maximum(q * low[:, :, None], q * high[:, :, None]).sum(-1)  # [B, Hkv, G, P]
        return bound.reshape(b, -1, pages), token_codes(layer, self.page), None


@dataclass
class Random(Scorer):
    """Uniformly random selection among the far tokens (seeded)."""

    seed: int = 0
    name = "random"

    def __post_init__(self):
        self.generator: torch.Generator | None = None

    def scores(self, layer, query, position_ids, scaling, far):
        if self.generator is None or self.generator.device != query.device:
            self.generator = torch.Generator(device=query.device).manual_seed(self.seed)
        b, hq, _ = query.shape
        lut = torch.rand(b, hq, layer.store.length, generator=self.generator, device=query.device)
        return lut, token_codes(layer), None


@dataclass
class WindowOnly(Scorer):
    """Sinks + window alone (StreamingLLM): no far token is retrieved."""

    name = "window"
    retrieves = False


SCORERS = {cls.name: cls for cls in (WindowedRoPE, DistanceBuckets, PostRoPE, Exact, Quest, Random, WindowOnly)}


def scorer_of(scoring: str | Scorer) -> Scorer:
    """A scorer from its name ("wrope", "distance", "postrope", "oracle", "quest", "random", "window") or itself."""
    if isinstance(scoring, Scorer):
        return scoring
    if scoring not in SCORERS:
        raise ValueError(f"scoring must be one of {sorted(SCORERS)} or a Scorer, got {scoring!r}")
    return SCORERS[scoring]()
