"""How a decode step scores the far tokens before the top-K: A2ATS's lookup tables (distance-bucketed, the default,
and the paper's windowed RoPE), and the baselines the evaluation suite compares them with, behind one interface.

Every scorer returns a score table ``lut`` [B, Hq, M] (or, under the per-KV-head rule, the KV group's summed
[B, Hkv, M]) and each stored token's entry in it ``codes`` [B, Hkv, N]
(token j of KV head h scores ``lut[:, q, codes[:, h, j]]`` for the query heads q of h), so one top-K kernel
(:func:`a2ats_hf.kernels.select_topk`, its budget rules and tie-breaking) serves them all. A2ATS's table has one
column per centroid; the exact oracle's and random selection's one per token; Quest's one per page.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import kernels
from .encoding import lookup_table
from .kernels import code_histogram
from .kernels.reference import group_query
from .rope import bucket_turns, compose, distance_buckets

if TYPE_CHECKING:
    from .memo import PassMemo
    from .rope import RoPE
    from .store import Store


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer reads of one layer's decode step, handed to it whole (the layer builds it:
    :meth:`a2ats_hf.cache.A2ATSLayer.score_inputs`).

    ``query`` [B, Hq, D] post-RoPE at ``position`` [B or 1, 1]; ``far`` [B, W] this step's candidates and ``codes``
    [B, Hkv, W] each stored token's code over the step's W columns, a view of ``code_buffer`` [B, Hkv, capacity];
    ``histogram`` [B, Hkv, M] the candidates' codes where the layer keeps it (for a scorer that
    ``reads_code_histogram``); ``length`` the tokens stored, this step's included, as the host counts them;
    ``device_length`` [1] the same count on the device in a capture-ready step (W is then the step's fixed width and
    the columns past the length are masked), else None; ``memo`` what the layers of the pass share; ``store`` the
    layer's K/V (read by the baselines that look at every key); ``budget`` the cache's budget rule; ``first_token``
    [B] the column of each row's first real token (after left padding), None where every row starts at 0."""

    query: torch.Tensor
    position: torch.Tensor
    scaling: float
    far: torch.Tensor
    codes: torch.Tensor
    code_buffer: torch.Tensor
    histogram: torch.Tensor | None
    centroids: torch.Tensor
    rope: "RoPE"
    offset: int
    window: int
    length: int
    device_length: torch.Tensor | None
    memo: "PassMemo"
    store: "Store"
    budget: str = "query_head"
    first_token: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.codes.shape[-1]

    @functools.cached_property
    def table_query(self) -> torch.Tensor:
        """The query a table ranks by and re-ranking scores with: ``query``, or under the per-KV-head ``budget``
        rule the KV group's queries summed (:func:`group_query`: the table, its products and the top-K's sum over
        the group shrink by the group's size). The rotated tables sum as they read instead (:meth:`summed`)."""
        return group_query(self.query, self.codes.shape[1]) if self.summed else self.query

    @property
    def summed(self) -> bool:
        """Whether the table ranks by each KV group's summed query (the per-KV-head rule)."""
        return self.budget == "kv_head"


@dataclass
class Scorer:
    """Scores of a step's far tokens. ``retrieves`` False: nothing is retrieved (sinks + window alone); ``keys``:
    the codebooks' kind the scorer reads codes of (None: it reads no codes); ``reads_code_histogram``: it hands the
    top-K the layer's histogram of the candidates' codes, which the layer then keeps up to date.

    ``key_bits``: the top-K ranks its scores by their float32 order's top ``key_bits`` bits, ties to the lower
    token index (32: exactly; 16: bfloat16's precision, which a wide table's split select takes in half the
    rounds).

    ``reranks``: exact ``q . k`` re-ranking of R x the budget sharpens its choice, so the cache re-ranks by default
    where a layer's K/V is on the device (the codebooks' scorers; baselines and ablations stay as published).

    A cache holds the scorer it was given; each of its layers scores with its own copy (:meth:`for_layer`), which
    owns whatever the scorer keeps from step to step for that layer."""

    name = "base"
    retrieves = True
    keys = None  # type: str | None
    reads_code_histogram = False
    key_bits = 32
    reranks = False

    def for_layer(self) -> "Scorer":
        """A copy with the same settings and no state of its own yet, for one layer."""
        return dataclasses.replace(self)

    def scores(self, step: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(lut [B, Hq, M], codes [B, Hkv, W], histogram [B, Hkv, M] of the far candidates' codes or None)."""
        raise NotImplementedError

    def held(self) -> tuple[torch.Tensor, ...]:
        """Device tensors kept for the layer (counted by ``A2ATSCache.memory_footprint``, and addresses a captured
        step reads)."""
        return ()

    def forget(self) -> None:
        """Drop what is kept, after the layer's rows or length changed other than by appending (beam search, a
        crop, a new prompt): it is rebuilt from the step's inputs at the next step."""

    def stepped(self) -> None:
        """After a capture-ready step, replayed or not (no Python runs in a replay): move on what is counted on the
        host, as the graph runner moves the store's length."""


def token_codes(step: ScoreInputs, page: int = 1) -> torch.Tensor:
    """[B, Hkv, W] int32: each stored token's own column (``page`` 1) or its page's."""
    b, h, n = step.codes.shape
    return (torch.arange(n, device=step.codes.device, dtype=torch.int32) // page).expand(b, h, n)


@dataclass
class KeyMirror(Scorer):
    """A baseline that reads every stored (post-RoPE) key: it keeps a float32 copy of the layer's on the device,
    extended by the columns stored since its last call (for evaluation, not serving)."""

    def __post_init__(self):
        self.mirror: torch.Tensor | None = None

    def stored_keys(self, step: ScoreInputs) -> torch.Tensor:
        """All stored keys [B, Hkv, N, D], float32 on the query's device."""
        n, have = step.length, self.mirror
        done = 0 if have is None or have.shape[2] > n else have.shape[2]
        if done < n:
            new = step.store.to_tensors(start=done)[0].to(step.query.device).float()
            self.mirror = have = new if done == 0 else torch.cat([have, new], dim=2)
        return have

    def held(self):
        return () if self.mirror is None else (self.mirror,)

    def forget(self):
        self.mirror = None


@dataclass
class WindowedRoPE(Scorer):
    """A2ATS: the query rotated to the codebooks' offset b scores every centroid; tokens score by their code."""

    name = "wrope"
    keys = "pre_rope"
    reranks = True
    reads_code_histogram = True

    def scores(self, step):
        position = step.position.expand(step.query.shape[0], 1)
        rotation = step.rope.windowed_rotation(position, step.offset, step.query.device)
        lut = kernels.rotated_lookup_table(step.query, rotation, step.centroids, None, step.summed)
        return lut, step.codes, step.histogram


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
    key_bits = 16  # its table is buckets x centroids wide (~70K columns at 128K): two rounds of 8 bits, not four
    reranks = True

    def __post_init__(self):
        if self.per_octave < 1 or self.rotation not in ("mean", "center"):
            raise ValueError(f'per_octave must be >= 1 and rotation "mean" or "center", got {self.per_octave}, '
                             f'{self.rotation!r}')
        self.state: BucketColumns | None = None

    def turns(self, step: ScoreInputs):
        """(cos, sin [B, 1, buckets, D'] turning a post-RoPE query at the step's position by each bucket's rotation,
        bucket of each distance 0..W-1 [W], the first distance of buckets 1, 2, ... [buckets - 1]), once per pass:
        the layers of a pass share them. Only each row's real distances count (up to its first real token; in a
        capture-ready step W is the step's width and the length on the device sets them)."""
        rope, width, position, device = step.rope, step.width, step.position, step.query.device

        def compute():
            length = step.device_length if step.device_length is not None else step.length
            if step.first_token is not None:  # a left-padded row's distances end at its first real token
                length = length - step.first_token
            elif not isinstance(length, torch.Tensor):
                length = None  # every distance of the step counts
            cos, sin, bucket, starts = bucket_turns(rope, width - 1, position, step.window, self.per_octave,
                                                    self.rotation, device, length)
            cos, sin = compose(rope.inverse_rotation(position, device), (cos, sin))  # un-rotate, then turn
            return cos, sin, bucket, starts

        return step.memo(("distance", self.per_octave, self.rotation, width, position, step.far, device), compute)

    def columns(self, step: ScoreInputs, bucket: torch.Tensor, starts: torch.Tensor,
                width: int) -> tuple[BucketColumns, kernels.ColumnMove | None]:
        """The layer's :class:`BucketColumns` at the step's length, with a histogram at least ``width`` columns
        wide, and the move that brings them there from the last step's (run by the lookup table's launch), or none
        where they were rebuilt (after a prompt, when the buffers are too small, or after steps that did not move
        them). A capture-ready step moves them with the length on the device; its buffers hold the layer's whole
        capacity, so they keep their addresses."""
        static = step.device_length is not None
        n, m, state, move = step.length, step.centroids.shape[1], self.state, None
        fits = state is not None and state.histogram.shape[-1] >= width and state.buffer.shape[-1] >= step.width
        if fits and state.length == n - 1:
            move = kernels.ColumnMove(state.buffer, state.histogram, step.code_buffer, step.far, starts,
                                      step.device_length if static else n, m, step.window)
        elif not (fits and state.length == n):
            capacity = step.code_buffer.shape[-1] if static else 2 * n
            buckets = int(distance_buckets(torch.tensor([capacity - 1]), step.window, self.per_octave)) + 1
            buffer = torch.zeros(*step.codes.shape[:2], capacity, dtype=torch.int32, device=step.far.device)
            buffer[:, :, :n] = bucket[:n].flip(0) * m + step.code_buffer[:, :, :n].to(torch.int32)  # j: n-1-j back
            histogram = code_histogram(buffer[:, :, :n], step.far[:, :n], max(buckets * m, width))
            state = self.state = BucketColumns(n, buffer, histogram)
        state.length = n - static  # a capture-ready step's: moved on with the store's by :meth:`stepped`
        return state, move

    def stepped(self):
        if self.state is not None:
            self.state.length += 1

    def scores(self, step):
        cos, sin, bucket, starts = self.turns(step)
        width = cos.shape[2] * step.centroids.shape[1]  # the table's: buckets * M
        state, move = self.columns(step, bucket, starts, width)
        lut = kernels.rotated_lookup_table(step.query, (cos, sin), step.centroids, move, step.summed)  # [B, H, width]
        return lut, state.buffer[:, :, : step.width], state.histogram[:, :, :width]

    def held(self):
        return () if self.state is None else (self.state.buffer, self.state.histogram)

    def forget(self):
        self.state = None


@dataclass
class PostRoPE(Scorer):
    """Ablation: codebooks of post-RoPE keys (each code holds its token's position), scored by the true query."""

    name = "postrope"
    keys = "post_rope"
    reads_code_histogram = True

    def scores(self, step):
        query = step.table_query
        return lookup_table(query, step.centroids, query.shape[1] // step.codes.shape[1]), step.codes, step.histogram


@dataclass
class Exact(KeyMirror):
    """The oracle: exact attention logits against every stored key (the true top-K)."""

    name = "oracle"

    def scores(self, step):
        keys = self.stored_keys(step)
        b, hkv, n, d = keys.shape
        q = step.query.float().view(b, hkv, -1, d)
        lut = torch.einsum("bkgd,bknd->bkgn", q, keys).reshape(b, -1, n) * step.scaling
        return lut, token_codes(step), None


@dataclass
class Quest(KeyMirror):
    """Quest (Tang et al., 2024): per page of ``page`` tokens, an upper bound of q.k from the page's elementwise key
    minimum and maximum, ``sum_d max(q_d min_d, q_d max_d)``; a page's tokens share its score."""

    page: int = 16
    name = "quest"

    def scores(self, step):
        keys = self.stored_keys(step)
        b, hkv, n, d = keys.shape
        pages = -(-n // self.page)
        padded = torch.nn.functional.pad(keys, (0, 0, 0, pages * self.page - n), mode="replicate")
        paged = padded.view(b, hkv, pages, self.page, d)
        low, high = paged.amin(3), paged.amax(3)  # [B, Hkv, P, D]
        q = step.query.float().view(b, hkv, -1, 1, d)
        bound = torch.maximum(q * low[:, :, None], q * high[:, :, None]).sum(-1)  # [B, Hkv, G, P]
        return bound.reshape(b, -1, pages), token_codes(step, self.page), None


@dataclass
class Random(Scorer):
    """Uniformly random selection among the far tokens (seeded; each layer draws from its own generator)."""

    seed: int = 0
    name = "random"

    def __post_init__(self):
        self.generator: torch.Generator | None = None

    def scores(self, step):
        device = step.query.device
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        b, hq, _ = step.query.shape
        return torch.rand(b, hq, step.width, generator=self.generator, device=device), token_codes(step), None


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
