"""`A2ATSConfig`: an A2ATSCache's settings, validated once and immutable, which its layers read directly."""

from __future__ import annotations

from dataclasses import dataclass

from .codebooks import check_int

BUDGETS = ("query_head", "kv_head")
OFFLOADS = ("cpu", "none", "auto")


def check_topk(topk: float | int) -> None:
    """TypeError / ValueError unless ``topk`` is a fraction in (0, 1] or a positive int budget."""
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise TypeError(f"topk must be a float fraction in (0, 1] or a positive int token budget, got {topk!r}")
    if isinstance(topk, int) and topk <= 0:
        raise ValueError(f"topk as a token budget must be a positive int, got {topk}")
    if isinstance(topk, float) and not 0.0 < topk <= 1.0:
        raise ValueError(f"topk as a fraction must lie in (0, 1], got {topk}")


@dataclass(frozen=True)
class A2ATSConfig:
    """What :class:`~a2ats_hf.cache.A2ATSCache` takes besides its codebooks and scorer (see it for each setting),
    with ``window`` and ``sink`` resolved from the codebooks' defaults. Every field is checked on construction."""

    window: int
    sink: int
    topk: float | int = 0.03
    budget: str = "query_head"
    max_length: int | None = None
    offload: str = "cpu"
    gpu_kv_budget: int | None = None
    dense_below: int = 4096
    rerank: int | None = None
    gpu_share: float = 0.0
    row_cache: float | None = None

    def __post_init__(self):
        check_topk(self.topk)
        check_int("window", self.window, 1)
        check_int("sink", self.sink, 0)
        if self.max_length is not None:
            check_int("max_length", self.max_length, 1)
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {self.offload!r}")
        if self.gpu_kv_budget is not None and (self.offload != "auto" or self.gpu_kv_budget < 0):
            raise ValueError(f'gpu_kv_budget must be a number of bytes >= 0 with offload="auto", got '
                             f"{self.gpu_kv_budget!r} with offload={self.offload!r}")
        check_int("dense_below", self.dense_below, 0)
        if self.rerank is not None:  # None: the default, where it serves (see A2ATSCache.rerank)
            check_int("rerank", self.rerank, 1)
        if self.rerank is not None and self.rerank > 1 and self.offload == "cpu":
            raise ValueError(f'rerank={self.rerank} re-ranks by the keys on the device: it needs offload="none" or '
                             '"auto" (with offload="cpu" no layer could)')
        self.check_offloaded_option(
            "gpu_share", lambda f: 0 <= f <= 1, "the fraction of an offloaded layer's selected rows the GPU attends "
            "itself, in [0, 1]", "splits the rows of layers whose K/V is in CPU memory, which the GPU reads in place "
            "from one pinned buffer per layer")
        if self.row_cache is not None:  # None: the default, where it serves (see rows_wanted)
            self.check_offloaded_option(
                "row_cache", lambda r: r == 0 or r >= 2, "how many budgets of recently picked rows an offloaded layer "
                "keeps on the device, 0 (none) or at least 2", "keeps rows of layers whose K/V is in CPU memory, in "
                "slots sized once")
        if self.row_cache and self.gpu_share not in (0, 1):
            raise ValueError(f"row_cache={self.row_cache} combines with gpu_share 0 (the CPU attends the misses) or 1 "
                             f"(the GPU reads them), got {self.gpu_share}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")

    @property
    def rows_wanted(self) -> float:
        """Budgets of recent picks each offloaded layer keeps on the device: ``row_cache`` where given; by default
        2 where a cache offloads, sizes them once (``max_length``) and serves them (``gpu_share`` 0 or 1), which
        the placement then keeps only on a GPU with room for them (:meth:`~a2ats_hf.placement.Placement.check`)."""
        if self.row_cache is not None:
            return self.row_cache
        return 2.0 if self.offload != "none" and self.max_length is not None and self.gpu_share in (0, 1) else 0.0

    def check_offloaded_option(self, name: str, valid, meaning: str, what: str) -> None:
        """ValueError unless option ``name`` is a number ``valid`` accepts (``meaning`` says which), and, where set,
        the cache offloads (``what`` it does with the offloaded layers needs "cpu" or "auto") with ``max_length``."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ValueError(f"{name} is {meaning}, got {value!r}")
        if value and (self.offload == "none" or self.max_length is None):
            raise ValueError(f'{name}={value} {what}: it needs offload="cpu" or "auto" (got {self.offload!r}) and '
                             f"max_length (got {self.max_length!r})")
