"""RoPE inverse and windowed RoPE, computed with the model's own rotary embedding.

A post-RoPE vector at position p is ``x * cos_p + rotate_half(x) * sin_p``, where ``cos``/``sin`` carry the
rope type's attention scaling s (YaRN's and longrope's factor). Using the model's rotary module for ``cos``/``sin``
means every RoPE type transformers implements (llama3, linear, dynamic, yarn, longrope) is honoured without
re-deriving it here. Undoing RoPE turns back the angle only and leaves s on the rotated dimensions, and the
windowed-RoPE rotation turns by the angle only, so a windowed query's score against an un-rotated key equals the
true score at that distance, also where only the leading dimensions rotate (partial rotary, as in transformers).
All arithmetic is done in float32.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from .memo import PassMemo


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _partial(rotate):
    """Apply ``rotate`` to the leading ``cos.shape[-1]`` dimensions of ``x`` and pass the others through."""

    def wrapped(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dim = cos.shape[-1]
        if dim == x.shape[-1]:
            return rotate(x, cos, sin)
        return torch.cat([rotate(x[..., :dim], cos, sin), x[..., dim:]], dim=-1)

    wrapped.__doc__ = rotate.__doc__
    return wrapped


@_partial
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ([..., T, D]) by ``cos``/``sin`` ([..., T, D'], broadcast over heads; D' <= D)."""
    return x * cos + rotate_half(x) * sin


def angle(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of the rotation alone: divided by the scaling ``sqrt(cos^2 + sin^2)`` that some RoPE types
    (longrope, YaRN) fold into them."""
    scale = torch.sqrt(cos * cos + sin * sin)
    return cos / scale, sin / scale


def inverse(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of the rotation that turns :func:`apply_rope`'s angle back without its scaling, so the
    scaling stays on what it un-rotates."""
    cos, sin = angle(cos, sin)
    return cos, -sin


def compose(first: tuple[torch.Tensor, torch.Tensor], then: tuple[torch.Tensor, torch.Tensor]):
    """``cos``, ``sin`` of the rotation ``first`` followed by ``then`` (the pairs multiply as complex numbers)."""
    (c1, s1), (c2, s2) = first, then
    return c1 * c2 - s1 * s2, c1 * s2 + s1 * c2


def find_rotary_class(attention: nn.Module) -> type[nn.Module]:
    """The ``*RotaryEmbedding`` class defined beside an attention module's class (e.g. ``LlamaRotaryEmbedding``)."""
    module = sys.modules[type(attention).__module__]
    names = [n for n in vars(module) if n.endswith("RotaryEmbedding") and isinstance(getattr(module, n), type)]
    if not names:
        raise NotImplementedError(f"No rotary embedding class found beside {type(attention).__name__}.")
    return getattr(module, min(names, key=len))


class RoPE:
    """The rotations of one model: ``cos``/``sin`` at any positions, their inverse, and windowed RoPE of queries.

    ``kwargs`` go to the rotary module's forward (Gemma 3's layer type). The module is copied once per device, so
    layers spread over devices do not move it back and forth.
    """

    def __init__(self, rotary: nn.Module, *, memo: PassMemo | None = None, **kwargs):
        self.rotary, self.kwargs = rotary, kwargs
        self.on_device: dict[str, nn.Module] = {}
        self.memo = PassMemo() if memo is None else memo  # a forward pass's rotations (a cache gives its own memo)

    def new_step(self) -> None:
        """Forget what the previous forward pass kept."""
        self.memo.clear()

    @classmethod
    def for_attention(cls, attention: nn.Module, memo: PassMemo | None = None) -> "RoPE":
        """A private rotary embedding of the model's own class and config, so its dynamic state is not shared."""
        from .families import family_of

        config = attention.config
        return cls(find_rotary_class(attention)(config), memo=memo, **family_of(config).rope_kwargs(config))

    def cos_sin(self, position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos``, ``sin`` of shape [B, 1, T, D] for ``position_ids`` [B, T], computed once per forward
        pass for the same positions (every layer of a pass sees the same ``position_ids`` storage)."""
        return self.memo(("cos_sin", position_ids, device), lambda: self._compute(position_ids, device))

    def _compute(self, position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if str(device) not in self.on_device:
            self.on_device[str(device)] = copy.deepcopy(self.rotary).to(device)
        dummy = torch.empty(0, dtype=torch.float32, device=device)
        cos, sin = self.on_device[str(device)](dummy, position_ids.to(device), **self.kwargs)
        return cos.float().unsqueeze(1), sin.float().unsqueeze(1)

    def inverse_rotation(self, position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` [B, 1, T, D'] that un-rotate post-RoPE vectors at ``position_ids`` [B, T] (kept for the
        pass)."""
        return self.memo(("invert", position_ids, device), lambda: inverse(*self.cos_sin(position_ids, device)))

    def invert(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Un-rotated version (float32) of post-RoPE ``x`` [B, H, T, D] at ``position_ids`` [B, T]."""
        return apply_rope(x.float(), *self.inverse_rotation(position_ids, x.device))

    def turns(self, positions: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Angle-only ``cos``, ``sin`` [B, 1, P, D'] of the rotations to ``positions`` [P] (or [B, P]), with the
        frequencies the model uses at ``position_ids`` [B, T] (longrope switches them with the sequence length: the
        rotary module sees those positions beside ``positions``)."""
        b, p = position_ids.shape[0], positions.shape[-1]
        device = positions.device
        cos, sin = self._compute(torch.cat([positions.expand(b, p), position_ids.to(device)], dim=1), device)
        return angle(cos[:, :, :p], sin[:, :, :p])

    def windowed_rotation(self, position_ids: torch.Tensor, offset: int, device: torch.device):
        """``cos``, ``sin`` [B, 1, T, D'] turning post-RoPE queries at ``position_ids`` [B, T] as if they sat at
        position ``offset``, in one rotation (the inverse at ``position_ids`` composed with the angle to
        ``offset``, kept for the pass)."""
        def rotation():
            turn = self.turns(torch.full((1,), offset, device=device), position_ids)  # no host-to-device copy
            return compose(self.inverse_rotation(position_ids, device), turn)

        return self.memo(("wrope", offset, position_ids, device), rotation)

    def windowed_query(self, query: torch.Tensor, position_ids: torch.Tensor, offset: int) -> torch.Tensor:
        """WRoPE query: post-RoPE ``query`` [B, H, T, D] at ``position_ids`` [B, T] turned by
        :meth:`windowed_rotation`. Its dot product with a pre-RoPE key equals the true score at relative distance
        ``offset``."""
        return apply_rope(query.float(), *self.windowed_rotation(position_ids, offset, query.device))


def distance_buckets(distance: torch.Tensor, window: int, per_octave: int) -> torch.Tensor:
    """Bucket of each distance: ``per_octave`` buckets per doubling of the distance from the window's edge on
    (distances inside the window share the first)."""
    octaves = torch.log2(distance.clamp(min=window).float() / window)
    return (octaves * per_octave + 1e-6).floor().long()


def bucket_turns(rope: RoPE, longest: int, position_ids: torch.Tensor, window: int, per_octave: int = 1,
                 rotation: str = "mean", device: torch.device | None = None, length: torch.Tensor | None = None):
    """(cos, sin [B, 1, buckets, D'], bucket of each distance 0..``longest`` [longest + 1], the first distance of
    buckets 1, 2, ... [buckets - 1]) on ``device`` (default: ``position_ids``'): the rotation standing for each
    distance bucket, the mean of its distances' rotations or the rotation to its geometric centre. The bucket count
    comes from ``longest`` on the host, so nothing waits on the device. With ``length`` [1] or [B] (each row's real
    tokens: a capture-ready step's length on the device, less a left-padded row's padding), only distances below it
    count, and a bucket none of them reaches gets a zero rotation.

    The mean over a bucket's n distances a, ..., a + n - 1 of the rotation by d * theta (per frequency theta) has a
    closed form, the rotation to the bucket's middle scaled by sin(n theta / 2) / (n sin(theta / 2)): the cost is
    per bucket, not per distance (at 128K the per-distance sum was most of a captured step's extra time)."""
    device = device or position_ids.device
    distance = torch.arange(longest + 1, device=device)
    count = int(distance_buckets(torch.tensor([longest]), window, per_octave)) + 1
    bucket = distance_buckets(distance, window, per_octave).clamp(max=count - 1)
    starts = torch.searchsorted(bucket, torch.arange(count + 1, device=device))  # bucket k: starts[k] on
    if rotation == "mean":
        end = starts[1:] if length is None else torch.minimum(starts[1:], length[:, None])  # below the length count
        low = starts[:-1, None].double()  # [buckets, 1]
        n = (end - starts[:-1]).clamp(min=0).double().view(-1, 1, count, 1)  # [1 or B, 1, buckets, 1]
        cos1, sin1 = rope.turns(torch.ones(1, dtype=torch.long, device=device), position_ids)  # one step: theta
        theta = torch.atan2(sin1.double(), cos1.double())  # [B, 1, 1, D']
        half = torch.sin(theta / 2)
        ratio = torch.sin(n * theta / 2) / torch.where(n > 0, n * half, torch.ones_like(half))
        spread = torch.where(half.abs() > 1e-12, ratio, 1.0) * (n > 0)  # theta -> 0: n equal rotations average to one
        middle = theta * (low + (n - 1) / 2)
        cos, sin = (torch.cos(middle) * spread).float(), (torch.sin(middle) * spread).float()
    else:
        low = window * 2.0 ** (torch.arange(count, device=device) / per_octave)
        center = (low * 2.0 ** (0.5 / per_octave)).round().long().clamp(max=longest)
        if length is not None:
            center = torch.minimum(center, length[:, None] - 1)  # [1 or B, buckets]
        cos, sin = rope.turns(center, position_ids)
    return cos, sin, bucket, starts[1:-1]
