"""`PassMemo`: what the layers of one forward pass share, computed by the first layer that needs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class PassMemo:
    """A dict cleared at the start of every forward pass. Keys may hold tensors, which stand for their storage,
    shape and stride: every layer of a pass sees the same position ids and mask tensors, and a new pass may reuse
    their memory, which is why the memo cannot outlive the pass."""

    def __init__(self):
        self.values: dict[tuple, Any] = {}

    def __call__(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for in this pass, the kept value after that."""
        key = tuple((t.data_ptr(), t.shape, t.stride()) if isinstance(t, torch.Tensor) else str(t) for t in key)
        if key not in self.values:
            self.values[key] = compute()
        return self.values[key]

    def clear(self) -> None:
        self.values.clear()
