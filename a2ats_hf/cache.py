"""`A2ATSCache`: a transformers `Cache` whose layers keep codes and a local window on the device and the full
K/V in CPU memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .codebooks import Codebooks
from .quantization import encode
from .rope import RoPE
from .store import KVStore

BUDGETS = ("query_head", "kv_head")


def check_topk(topk: float | int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise TypeError(f"topk must be a float fraction in (0, 1] or a positive int token budget, got {topk!r}")
    if isinstance(topk, int) and topk <= 0:
        raise ValueError(f"topk as a token budget must be a positive int, got {topk}")
    if isinstance(topk, float) and not 0.0 < topk <= 1.0:
        raise ValueError(f"topk as a fraction must lie in (0, 1], got {topk}")


@dataclass
class AttendedStats:
    """Running totals over decode steps, summed over layers, rows and KV heads."""

    steps: int = 0
    far_selected: int = 0
    far_tokens: int = 0
    attended: int = 0
    past_tokens: int = 0

    @property
    def far_fraction(self) -> float:
        """Mean fraction of far tokens retrieved per KV head."""
        return self.far_selected / max(self.far_tokens, 1)

    @property
    def attended_fraction(self) -> float:
        """Mean fraction of all past tokens attended (retrieved far tokens plus sinks and window)."""
        return self.attended / max(self.past_tokens, 1)


class A2ATSLayer(CacheLayerMixin):
    """One layer: full K/V in a CPU :class:`KVStore`, codes [B, Hkv, N] and sinks + window K/V on the device."""

    is_sliding = False

    def __init__(self, cache: "A2ATSCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.store = KVStore(b, h, d, key_states.dtype)
        self.codes = torch.empty(b, h, 0, dtype=torch.uint16, device=self.device)
        self.window_keys = self.window_values = key_states[:, :, :0]
        self.sink_keys = torch.zeros(b, h, self.cache.sink, d, dtype=self.dtype, device=self.device)
        self.sink_values = torch.zeros_like(self.sink_keys)
        self.first_token = torch.zeros(b, dtype=torch.long, device=self.device)  # column of each row's first real token
        books = self.cache.codebooks
        self.whitener = books.whitener[self.layer_idx].to(self.device)
        self.whitened_centroids = books.whitened_centroids[self.layer_idx].to(self.device)
        self.centroids = books.centroids[self.layer_idx].to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new post-RoPE K/V and return them, tagged so the "a2ats" attention finds this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.store.shape[0]:
            raise RuntimeError(
                f"This A2ATSCache holds a batch of {self.store.shape[0]} rows but got {key_states.shape[0]}; "
                "call cache.reset() or create a new A2ATSCache for a new batch."
            )
        elif key_states.shape[-2] > 1:
            raise RuntimeError(
                f"This A2ATSCache already holds {self.store.length} tokens and cannot take a new {key_states.shape[-2]}"
                "-token prompt (continuing a finished generation); call cache.reset() or create a new A2ATSCache."
            )
        self.store.append(key_states, value_states)
        w = self.cache.window
        self.window_keys = torch.cat([self.window_keys, key_states], dim=-2)[:, :, -w:]
        self.window_values = torch.cat([self.window_values, value_states], dim=-2)[:, :, -w:]
        key_states.a2ats_layer = value_states.a2ats_layer = self
        return key_states, value_states

    # The "a2ats" attention calls the methods below, which need positions and padding that `update` does not see.

    def append_codes(self, keys: torch.Tensor, position_ids: torch.Tensor, rope: RoPE) -> None:
        """Encode new post-RoPE keys [B, Hkv, T, D] at ``position_ids`` [B, T] and append their codes."""
        pre = rope.invert(keys, position_ids.expand(keys.shape[0], -1))
        codes = encode(pre, self.whitener, self.whitened_centroids).to(torch.uint16)
        self.codes = torch.cat([self.codes, codes], dim=-1)

    def set_first_tokens(self, valid: torch.Tensor) -> None:
        """Record each row's first real column from the prefill's key validity [B, N] and fill the sinks."""
        self.first_token = valid.long().argmax(-1)
        self.write_sinks(0, self.store.length)

    def write_sinks(self, start: int, end: int) -> None:
        """Copy columns [start, end) that fall among each row's first ``sink`` real tokens into the sink slots."""
        if self.cache.sink == 0:
            return
        cols = self.first_token[:, None] + torch.arange(self.cache.sink, device=self.device)  # [B, S]
        inside = (cols >= start) & (cols < end)
        if not inside.any():
            return
        keys, values = self.store.gather(cols.clamp(max=end - 1).cpu()[:, None, :].expand(-1, self.store.shape[1], -1))
        mask = inside[:, None, :, None]
        self.sink_keys = torch.where(mask, keys.to(self.device), self.sink_keys)
        self.sink_values = torch.where(mask, values.to(self.device), self.sink_values)

    def get_seq_length(self) -> int:
        return self.store.length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the abstract name in older transformers 5.x (5.4)

    def reset(self) -> None:
        self.is_initialized = False
        for name in ("store", "codes", "window_keys", "window_values", "sink_keys", "sink_values"):
            self.__dict__.pop(name, None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("A2ATSCache does not support beam search yet.")

    def nbytes(self) -> tuple[int, int]:
        """(device bytes, CPU bytes) held by this layer."""
        if not self.is_initialized:
            return 0, 0
        tensors = (self.codes, self.window_keys, self.window_values, self.sink_keys, self.sink_values)
        return sum(t.numel() * t.element_size() for t in tensors), self.store.nbytes


class A2ATSCache(Cache):
    """KV cache for A2ATS decoding: use with a model loaded with ``attn_implementation="a2ats"``.

    Args:
        codebooks: the model's :class:`Codebooks`.
        topk: far tokens retrieved per step, a fraction in (0, 1] of each row's far tokens or a positive int budget.
        window: most recent tokens always attended exactly (default: the codebooks' window).
        sink: first tokens always attended exactly (default: the codebooks' sink).
        budget: "query_head" (top-K per query head, united over the KV group, as in the paper) or "kv_head".
    """

    def __init__(
        self,
        codebooks: Codebooks,
        topk: float | int = 0.03,
        window: int | None = None,
        sink: int | None = None,
        budget: str = "query_head",
    ):
        check_topk(topk)
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        self.codebooks, self.topk, self.budget = codebooks, topk, budget
        self.window = codebooks.window if window is None else window
        self.sink = codebooks.sink if sink is None else sink
        if self.window < 1 or self.sink < 0:
            raise ValueError(f"window must be >= 1 and sink >= 0, got window={self.window}, sink={self.sink}")
        self.rope: RoPE | None = None
        self.stats = AttendedStats()
        super().__init__(layers=[A2ATSLayer(self, i) for i in range(codebooks.num_layers)])

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        topk: float | int = 0.03,
        window: int | None = None,
        sink: int | None = None,
        budget: str = "query_head",
        **hub_kwargs,
    ) -> "A2ATSCache":
        """A cache with the codebooks stored next to a model (``a2ats/`` in its folder or Hub repository).

        ``hub_kwargs`` (subfolder, revision, cache_dir, local_files_only, token) go to ``Codebooks.from_pretrained``.
        """
        books = Codebooks.from_pretrained(model_id_or_path, **hub_kwargs)
        return cls(books, topk=topk, window=window, sink=sink, budget=budget)

    def bind(self, attention: nn.Module) -> RoPE:
        """Check the codebooks against the model on first use and build its RoPE helper."""
        if self.rope is None:
            self.codebooks.validate(attention.config, attention if attention.layer_idx == 0 else None)
            self.rope = RoPE.for_attention(attention)
        return self.rope

    def budget_for(self, n_far: torch.Tensor) -> torch.Tensor:
        """Tokens to retrieve per row from its number of far tokens."""
        if isinstance(self.topk, float):
            return torch.ceil(n_far.double() * self.topk).long().clamp(max=n_far)
        return n_far.clamp(max=self.topk)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.stats = AttendedStats()

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held on the device (codes, sinks, window) and on the CPU (full K/V)."""
        device, cpu = map(sum, zip(*(layer.nbytes() for layer in self.layers)))
        return {"device_bytes": device, "cpu_bytes": cpu}
