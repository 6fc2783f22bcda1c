"""Plain torch references for the A2ATS kernels: encoding new keys, the lookup table of a turned query, the
distance scorer's columns moving on by a token, a capture-ready step's writes (the new token's K/V, the leaving
token's code), top-K selection from a LUT, attention with log-sum-exp, merge.

These define the semantics the fast kernels must reproduce, and are the fallback on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoding import encode, lookup_table
from ..rope import apply_rope


def encode_keys(
    keys: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None, whitener: torch.Tensor,
    whitened_centroids: torch.Tensor, norms: torch.Tensor, out: torch.Tensor, column: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes of new keys [B, Hkv, T, D] written into ``out`` [B, Hkv, T] (a slice of a code buffer; with ``column``
    [1], a device tensor, the whole buffer, written at columns ``column + t``) and returned:
    each key un-rotated by ``rotation`` (``cos``, ``sin`` [B, 1, T, D'] of the inverse RoPE; None for codebooks of
    post-RoPE keys), whitened by ``whitener`` [Hkv, D, D] and matched to its nearest ``whitened_centroids``
    [Hkv, M, D] (squared ``norms`` [Hkv, 1, M]); see :func:`a2ats_hf.encoding.encode`."""
    if rotation is not None:
        keys = apply_rope(keys.float(), *rotation)
    codes = encode(keys, whitener, whitened_centroids, norms)
    if column is None:
        return out.copy_(codes)
    bits = out.view(torch.int16) if out.dtype == torch.uint16 else out  # index_copy_ has no uint16 kernel
    at = column + torch.arange(codes.shape[2], device=column.device)
    bits.index_copy_(2, at, codes.to(out.dtype).view(bits.dtype))
    return out


@dataclass(frozen=True)
class ColumnMove:
    """The arguments of :func:`move_bucket_columns`, handed to :func:`rotated_lookup_table` so that a GPU moves the
    distance scorer's columns in the table's launch (the move is a few loads and atomic additions a (row, KV head):
    a launch of its own cost more than its work)."""

    columns: torch.Tensor
    histogram: torch.Tensor
    codes: torch.Tensor
    far: torch.Tensor
    starts: torch.Tensor
    n: int | torch.Tensor
    m: int
    window: int


def group_query(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Each KV group's queries [B, Hq, D] summed, [B, Hkv, D] float32: the group's summed q . k, what the per-KV-head
    budget rule ranks by, is the summed query's q . k. One kernel: the sum casts as it reads."""
    return query.unflatten(1, (kv_heads, -1)).sum(2, dtype=torch.float32)


def rotated_lookup_table(
    query: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None, centroids: torch.Tensor,
    move: ColumnMove | None = None, summed: bool = False,
) -> torch.Tensor:
    """LUT [B, Hq, R * M] (float32) of ``query`` [B, Hq, D] turned by each of R rotations (``cos``, ``sin``
    [B, 1, R, D']; None: as it is, R = 1) against each KV head's ``centroids`` [Hkv, M, D]: column ``r * M + m``
    scores centroid m under rotation r; see :func:`a2ats_hf.encoding.lookup_table`. ``summed``: [B, Hkv, R * M],
    of each KV group's queries summed (:func:`group_query`). With ``move``, the distance scorer's columns are
    moved on too (:func:`move_bucket_columns`; the table does not read them)."""
    if summed:
        query = group_query(query, centroids.shape[0])
    query = query.float()[:, :, None]
    if rotation is not None:  # [B, Hq, R, D] (expanded first: with partial rotary the rest passes through R times)
        query = apply_rope(query.expand(-1, -1, rotation[0].shape[2], -1), *rotation)
    b, hq, turns, d = query.shape
    hkv, m = centroids.shape[0], centroids.shape[1]
    lut = lookup_table(query.reshape(b, hq * turns, d), centroids, hq * turns // hkv).view(b, hq, turns * m)
    if move is not None:
        move_bucket_columns(**vars(move))
    return lut


def move_bucket_columns(
    columns: torch.Tensor, histogram: torch.Tensor, codes: torch.Tensor, far: torch.Tensor, starts: torch.Tensor,
    n: int | torch.Tensor, m: int, window: int,
) -> None:
    """The distance scorer's (bucket, code) columns moved on to ``n`` stored tokens, in place: ``columns``
    [B, Hkv, >= n] int32 (``bucket * m + code`` of each token, as of n - 1 tokens), ``histogram`` [B, Hkv, W] int32
    of the far candidates' columns. The new token (its ``codes`` [B, Hkv, >= n] entry) enters bucket 0; the tokens
    now at each later bucket's first distance (``starts`` [buckets - 1], ascending) move up a bucket; the token that
    just left the ``window`` becomes a candidate. ``far`` [B, N] marks the candidates. ``n`` may be a device tensor
    [1] (a capture-ready step: ``far`` is then as wide as the step, and starts past the tokens move nothing)."""
    if isinstance(n, torch.Tensor):
        return _move_bucket_columns_masked(columns, histogram, codes, far, starts, n, m, window)
    columns[:, :, n - 1] = codes[:, :, n - 1].to(torch.int32)
    moved = (n - 1) - starts
    old = columns.index_select(2, moved)
    columns.index_copy_(2, moved, old + m)
    weight = far.index_select(1, moved)[:, None].expand_as(old).to(torch.int32)
    index, weights = [old, old + m], [-weight, weight]
    left = n - 1 - window
    if left >= 0:
        index.append(columns[:, :, left : left + 1])
        weights.append(far[:, None, left : left + 1].expand(-1, old.shape[1], -1).to(torch.int32))
    histogram.scatter_add_(-1, torch.cat(index, dim=-1).long(), torch.cat(weights, dim=-1))


def _move_bucket_columns_masked(columns, histogram, codes, far, starts, n, m, window) -> None:
    """:func:`move_bucket_columns` over the step's whole width with the length on the device: every column's
    distance from the new token decides its move, so no shape depends on ``n``."""
    width = far.shape[1]
    cols = torch.arange(width, device=far.device)
    distance = (n - 1) - cols
    crossing = (distance[:, None] == starts[None]).any(1) & (distance >= 0)  # [W]: at a bucket's first distance
    view = columns[:, :, :width]
    old = view.clone()
    new = torch.where(distance == 0, codes[:, :, :width].to(torch.int32), torch.where(crossing, old + m, old))
    view.copy_(new)
    moving = (far & crossing)[:, None].expand_as(old).to(torch.int32)
    leaving = (far & (distance == window))[:, None].expand_as(old).to(torch.int32)  # left the window just now
    weights = torch.cat([-moving, moving, leaving], dim=-1)
    index = torch.cat([old, old + m, new], dim=-1).long()
    histogram.scatter_add_(-1, torch.where(weights != 0, index, 0), weights)  # columns past n hold no token


def check_key_bits(key_bits: int) -> None:
    if key_bits not in (8, 16, 24, 32):
        raise ValueError(f"key_bits must be 8, 16, 24 or 32, got {key_bits!r}")


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """float32 scores -> int64 keys in [0, 2**32) whose order is the scores' (the kernels' unsigned keys)."""
    bits = scores.float().contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -1 - bits, bits + 2**31)


def ranked(scores: torch.Tensor, key_bits: int = 32) -> torch.Tensor:
    """Indices ordering ``scores`` [..., N] from the highest, as the kernels rank them: by the top ``key_bits``
    bits of their float32 order (scores equal in those bits tie), ties to the lower index."""
    check_key_bits(key_bits)
    if key_bits < 32:
        scores = order_keys(scores) >> (32 - key_bits)
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


@dataclass(frozen=True)
class Keep:
    """Re-ranking's keep after a select's exact scores (:func:`keep_top`): the top ``k`` [B] (``k_max`` >= every
    k) of the candidates, per query head and united over the KV group or, under ``budget="kv_head"``, of the
    group's summed scores, ranked by their top ``key_bits`` bits."""

    k: torch.Tensor
    k_max: int
    budget: str = "query_head"
    key_bits: int = 32


def select_topk(
    lut: torch.Tensor,
    codes: torch.Tensor,
    candidates: torch.Tensor,
    k: torch.Tensor,
    budget: str = "query_head",
    histogram: torch.Tensor | None = None,
    k_max: int | None = None,
    key_bits: int = 32,
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep: Keep | None = None,
) -> tuple[torch.Tensor, ...]:
    """Choose far tokens to attend from approximate scores ``lut[h, codes[j]]``.

    Args:
        lut: [B, Hq, M] scores of every centroid for every query head (with ``budget="kv_head"``, the KV group's
            summed scores [B, Hkv, M] are taken as they are).
        codes: [B, Hkv, N] integer codes of the stored keys.
        candidates: [B, N] bool, the tokens that may be selected (far, not padding).
        k: [B] long, the per-row budget (already clamped to the number of candidates).
        budget: "query_head" takes the top ``k`` of every query head and unites them over the KV group;
            "kv_head" takes one top ``k`` per KV head from the group's summed scores.
        histogram, k_max: what the fast kernel may be given to spare it work (the candidates' code histogram, a
            host-side bound on ``k``); the reference needs neither.
        key_bits: the scores ranked by the top ``key_bits`` bits of their float32 order (8, 16, 24 or 32; 16:
            bfloat16's precision, rounded down), scores equal in those bits tying; fewer take the kernel fewer
            rounds (re-ranking's candidates, whose order the exact scores set anyway).
        exact: (query [B, H, D], keys [B, Hkv, >= N, D]): re-ranking's candidates, scored exactly too (H: the
            lut's heads; :func:`candidate_scores`).
        keep: with ``exact``, re-ranking's keep of the candidates by those scores (:class:`Keep`, :func:`keep_top`),
            whose rows and counts are then returned instead (the kernel zeroes the keep's words with its own).

    Returns:
        indices [B, Hkv, K] (ascending token indices, padded with 0) and counts [B, Hkv]; with ``exact``, their
        exact scores [B, H, K] third (past each count: -inf here, not written by the kernel).
        Ties are broken towards the lower token index.
    """
    if keep is not None and exact is None:
        raise ValueError("select_topk's keep needs exact scores: pass exact=(query, keys) too")
    b, hq, m = lut.shape
    hkv, n = codes.shape[1], codes.shape[2]
    group = hq // hkv
    if budget == "kv_head":
        lut = lut.view(b, hkv, group, m).sum(2)
    elif budget != "query_head":
        raise ValueError(f"budget must be 'query_head' or 'kv_head', got {budget!r}")
    heads = lut.shape[1]
    code_idx = codes.long().repeat_interleave(heads // hkv, dim=1)  # [B, heads, N]
    scores = lut.gather(-1, code_idx).masked_fill(~candidates[:, None, :], float("-inf"))
    order = ranked(scores, key_bits)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=lut.device).expand_as(order))
    chosen = (rank < k.view(b, 1, 1)) & candidates[:, None, :]
    chosen = chosen.view(b, hkv, heads // hkv, n).any(2)
    counts = chosen.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    indices = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    indices = indices.masked_fill(torch.arange(width, device=lut.device) >= counts[..., None], 0)
    if exact is None:
        return indices, counts
    scores = candidate_scores(*exact, indices, counts)
    if keep is None:
        return indices, counts, scores
    return keep_top(indices, counts, scores, keep.k, keep.k_max, keep.budget, keep.key_bits)


def write_token(
    key: torch.Tensor, value: torch.Tensor, store_keys: torch.Tensor | None, store_values: torch.Tensor | None,
    local_keys: torch.Tensor, local_values: torch.Tensor, column: torch.Tensor, sink: int, window: int,
) -> None:
    """One new token's ``key`` / ``value`` [B, Hkv, 1, D] written at ``column`` [1] (a device tensor) of the store's
    buffers [B, Hkv, capacity, D] (None: the store is not on the device; the ring alone) and at slot ``sink + column
    % window`` of the local ones [B, Hkv, sink + window, D], in their dtypes."""
    slot = sink + column % window
    for target, new, at in ((store_keys, key, column), (store_values, value, column), (local_keys, key, slot),
                            (local_values, value, slot)):
        if target is not None:
            target.index_copy_(2, at, new.to(target.dtype))


def count_leaving(histogram: torch.Tensor, codes: torch.Tensor, far: torch.Tensor, column: int | torch.Tensor,
                  offset: int) -> None:
    """The token at ``column + offset`` (``column`` a host int, or [1] a device tensor in a capture-ready step; a
    negative sum: no token) counted into ``histogram`` [B, Hkv, M] at its code (``codes`` [B, Hkv, >= column])
    where ``far`` [B, >= column] marks it a candidate, in place."""
    if isinstance(column, int):
        at = column + offset
        if at >= 0:
            code, counted = codes[:, :, at : at + 1].long(), far[:, None, at : at + 1]
            histogram.scatter_add_(-1, code, counted.expand_as(code).to(histogram.dtype))
        return
    at = column + offset
    code = codes.index_select(2, at.clamp(min=0)).long()
    counted = far.index_select(1, at.clamp(min=0))[:, None] & (at >= 0)
    histogram.scatter_add_(-1, code, counted.expand_as(code).to(histogram.dtype))


def code_histogram(codes: torch.Tensor, candidates: torch.Tensor, m: int) -> torch.Tensor:
    """[B, Hkv, M] int32: how many candidate tokens of each (row, KV head) carry each code."""
    b, hkv, _ = codes.shape
    hist = torch.zeros(b, hkv, m, dtype=torch.int32, device=codes.device)
    weights = candidates[:, None, :].expand(b, hkv, -1).to(torch.int32)
    return hist.scatter_add_(-1, codes.long(), weights)


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query per head, returning output and log-sum-exp (float32 accumulation).

    query [B, Hq, D]; keys/values [B, Hkv, L, D] (query head h reads KV head h // group); valid [B, Hkv, L] bool.
    Returns out [B, Hq, D] and lse [B, Hq] (``-inf`` and zero output where nothing is valid).
    """
    b, hq, d = query.shape
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, d)
    logits = torch.einsum("bkgd,bkld->bkgl", q, keys.float()) * scaling
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.einsum("bkgl,bkld->bkgd", weights, values.float())
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def candidate_scores(
    query: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Exact ``q . k`` of each (row, KV head)'s candidate rows, for re-ranking: query [B, H, D] (H a multiple of
    Hkv: each KV group's query heads, or one summed query per KV head), keys [B, Hkv, >= N, D], candidates
    ``indices`` [B, Hkv, C] (the first ``counts`` [B, Hkv] of each valid). Returns [B, H, C] float32, -inf past
    the counts."""
    b, hkv, c = indices.shape
    d = keys.shape[-1]
    valid = torch.arange(c, device=indices.device) < counts[..., None]
    rows = torch.where(valid, indices.long(), 0)[..., None].expand(-1, -1, -1, d)
    scores = torch.einsum("bkgd,bkcd->bkgc", query.float().view(b, hkv, -1, d), keys.gather(2, rows).float())
    return scores.masked_fill(~valid[:, :, None], float("-inf")).reshape(b, -1, c)


def gather_chosen(
    indices: torch.Tensor, counts: torch.Tensor, chosen: torch.Tensor, chosen_counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranking's kept rows: the candidates ``indices`` [B, Hkv, C] (the first ``counts`` [B, Hkv] valid) at the
    positions ``chosen`` [B, Hkv, K] (ascending, the first ``chosen_counts`` valid), less the chosen positions past
    ``counts`` (a head with fewer candidates than its budget also chose its padding, which scores -inf and so comes
    last). Returns (rows [B, Hkv, K], 0 past each count; counts [B, Hkv] int32)."""
    kept = torch.minimum(chosen_counts, counts).to(torch.int32)
    valid = torch.arange(chosen.shape[-1], device=chosen.device) < kept[..., None]
    return indices.gather(-1, chosen.long() * valid) * valid, kept


def scores_within_counts(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``scores`` [B, H, C] with -inf past each KV head's ``counts`` [B, Hkv] (what the select left unwritten)."""
    past = torch.arange(scores.shape[-1], device=scores.device) >= counts[..., None]
    return scores.masked_fill(past.repeat_interleave(scores.shape[1] // counts.shape[1], dim=1), float("-inf"))


def keep_top(
    indices: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, k_max: int,
    budget: str = "query_head", key_bits: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranking's keep: of each (row, KV head)'s candidates ``indices`` [B, Hkv, C] (the first ``counts`` valid,
    ascending), the top ``k`` [B] (``k_max`` >= every k) by ``scores`` [B, Hq or Hkv, C] (:func:`candidate_scores`;
    past the counts not read), per query head and united over the group or, with ``budget="kv_head"``, one top k
    of the group's summed scores; ties to the lower index; scores ranked by their top ``key_bits`` bits as
    :func:`select_topk` ranks them.
    Returns (rows [B, Hkv, W] ascending, 0 past each count, W at least the largest count; counts [B, Hkv]
    int32)."""
    b, hkv, c = indices.shape
    scores = scores_within_counts(scores, counts)
    positions = torch.arange(c, device=indices.device).expand(b, hkv, c)
    every = torch.ones(b, c, dtype=torch.bool, device=indices.device)
    chosen, chosen_counts = select_topk(scores, positions, every, k, budget, k_max=min(k_max, c), key_bits=key_bits)
    return gather_chosen(indices, counts, chosen, chosen_counts)


def sparse_attention(
    query: torch.Tensor, store, indices: torch.Tensor, counts: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` [B, Hq, D] over the rows ``indices`` [B, Hkv, K] (first ``counts`` valid) of a
    :class:`~a2ats_hf.store.KVStore` or :class:`~a2ats_hf.store.DeviceKVStore`, computed where the store lives.
    Returns out [B, Hq, D], lse [B, Hq] (float32)."""
    device = store.device
    indices, counts = indices.to(device), counts.to(device)
    keys, values = store.gather(indices)
    valid = torch.arange(indices.shape[-1], device=device) < counts[..., None]
    return attention_with_lse(query.to(device), keys, values, valid, scaling)


@dataclass
class FarRows:
    """Far tokens to attend besides the local ones by the device's kernel: rows ``indices`` [B, Hkv, K] (the first
    ``counts`` [B, Hkv] of each list) of a :class:`~a2ats_hf.store.DeviceKVStore` (on the device, or views of a
    pinned CPU store's one block, read over PCIe: ``KVStore.mapped``)."""

    store: object
    indices: torch.Tensor
    counts: torch.Tensor


def local_and_far_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float, far: FarRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the local keys (as :func:`attention_with_lse`) and the far rows together: out [B, Hq, D],
    lse [B, Hq]."""
    out, lse = attention_with_lse(query, keys, values, valid, scaling)
    far_out, far_lse = (t.to(query.device) for t in sparse_attention(query, far.store, far.indices, far.counts,
                                                                      scaling))
    return merge_attention(out, lse, far_out, far_lse), torch.logaddexp(lse, far_lse)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine two attentions over disjoint key sets by their log-sum-exps: out [B, H, D], lse [B, H] (on ``out_a``'s
    device)."""
    out_b, lse_b = out_b.to(out_a.device), lse_b.to(lse_a.device)
    lse = torch.logaddexp(lse_a, lse_b)
    finite = lse.nan_to_num(neginf=0.0)
    wa = torch.exp(lse_a - finite)[..., None]
    wb = torch.exp(lse_b - finite)[..., None]
    return out_a * wa + out_b * wb


AGE_CAP = 255  # a row cache's slots picked this many steps ago or more are equally old (empty ones too)


def split_rows(
    slot: torch.Tensor, stamp: torch.Tensor, sought: torch.Tensor, found: torch.Tensor, indices: torch.Tensor,
    counts: torch.Tensor, now: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A selection (``indices`` [B, H, K], the first ``counts`` [B, H] valid) split by a row cache's token -> slot
    map ``slot`` [B, H, N + 1] into the slots holding selected rows and the selected rows it lacks, each in the
    selection's order: (hit_slots [B, H, K] int32, hit_counts, miss_indices [B, H, K], miss_counts), zeros past
    the counts. The hits' ``stamp`` [B, H, S] becomes ``now`` (a host int or a device tensor [1]); ``sought`` and
    ``found`` [B, H] count the selected rows and the hits, in place."""
    k = indices.shape[-1]
    columns = torch.arange(k, device=indices.device)
    valid = columns < counts[..., None]
    held = slot.gather(-1, indices.long().clamp(0, slot.shape[-1] - 2))
    hit = valid & (held >= 0)
    order = torch.where(hit, 0, 1 + (~valid).long()).argsort(dim=-1, stable=True)  # hits, misses, padding
    hit_counts = hit.sum(-1)
    miss_counts = counts - hit_counts
    sought += counts
    found += hit_counts
    hit_slots = torch.where(columns < hit_counts[..., None], held.gather(-1, order), 0)
    stamp.scatter_reduce_(-1, hit_slots.long(), torch.where(columns < hit_counts[..., None], now, -1), "amax")
    shifted = (columns + hit_counts[..., None]).clamp(max=k - 1)  # past the hits
    miss_indices = torch.where(columns < miss_counts[..., None], indices.gather(-1, order).gather(-1, shifted), 0)
    return (hit_slots.int(), hit_counts.to(counts.dtype), miss_indices.to(indices.dtype),
            miss_counts.to(counts.dtype))


def fill_rows(
    keys: torch.Tensor, values: torch.Tensor, token: torch.Tensor, stamp: torch.Tensor, slot: torch.Tensor,
    miss_indices: torch.Tensor, miss_counts: torch.Tensor, source: torch.Tensor, now: int | torch.Tensor,
    by_token: bool = False, hits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The first F misses of a split (``miss_indices`` [B, H, K], ``miss_counts`` [B, H]) brought into a row cache,
    in place: into the slots picked longest ago, as many as come (age ``now - stamp`` in [0, :data:`AGE_CAP`];
    ties, and every slot at the cap, by slot number), the j-th miss into the j-th of those in slot order. Their K/V
    come from ``source``: the misses' rows in order, [B, H, F, 2, D] (what the CPU copied out), or with
    ``by_token`` a store's block [B, H, >= N, 2, D] read at each miss's token, and then F = K (every miss). The
    slots' ``keys`` / ``values`` [B, H, S, D], ``token`` and ``stamp`` [B, H, S] and the token -> slot map ``slot``
    [B, H, N + 1] follow. Where ``hits`` (the split's hit slots [B, H, >= hit count + F] and hit counts [B, H]) are
    given, the filled slots are listed after the hits and counted with them: every selected row is then in the
    slots the list names."""
    f = miss_indices.shape[-1] if by_token else source.shape[2]
    coming_counts = miss_counts.clamp(max=f)
    age = (now - stamp).clamp(0, AGE_CAP)
    oldest = age.neg().argsort(dim=-1, stable=True)[..., :f]  # [B, H, F], oldest first
    columns = torch.arange(f, device=stamp.device)
    coming = columns < coming_counts[..., None]
    victims = torch.where(coming, oldest, stamp.shape[-1]).sort(dim=-1).values  # the first coming, in slot order
    victims = torch.where(coming, victims, oldest)  # (padding: slots left as they are)
    new = miss_indices[..., :f].long()
    old = token.gather(-1, victims).long()
    spare = slot.shape[-1] - 1  # the column masked writes go to
    slot.scatter_(-1, torch.where(coming & (old >= 0), old, spare), -1)
    slot.scatter_(-1, torch.where(coming, new, spare), victims.int())
    token.scatter_(-1, victims, torch.where(coming, new, old).int())
    stamp.scatter_(-1, victims, torch.where(coming, now, stamp.gather(-1, victims)))
    slot[..., spare] = -1
    if by_token:
        at = new.clamp(0, source.shape[2] - 1).to(source.device)
        source = source.gather(2, at[..., None, None].expand(-1, -1, -1, *source.shape[3:]))
    source = source.to(keys.device)
    for half, held in enumerate((keys, values)):
        index = victims[..., None].expand(-1, -1, -1, held.shape[-1])
        rows = source[..., half, :].to(held.dtype)
        held.scatter_(2, index, torch.where(coming[..., None], rows, held.gather(2, index)))
    if hits is not None and f > 0:
        hit_slots, hit_counts = hits
        listed = torch.arange(hit_slots.shape[-1], device=hit_slots.device) - hit_counts[..., None]  # j past the hits
        filled = (listed >= 0) & (listed < coming_counts[..., None])
        hit_slots.copy_(torch.where(filled, victims.gather(-1, listed.clamp(0, f - 1).long()), hit_slots))
        hit_counts += coming_counts.to(hit_counts.dtype)
