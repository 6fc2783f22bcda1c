"""`AttendedStats`: what a cache's decode steps attended, counted without making the host wait on the GPU."""

from __future__ import annotations

import copy

import torch


class AttendedStats:
    """Running totals over decode steps, summed over layers, rows and KV heads.

    Counts known on the device stay there, so decoding never waits on the GPU for bookkeeping, and cost one
    in-place add per layer: the selected rows' counts accumulate per (row, KV head), and the candidates, locally
    attended and past tokens (the same at every layer of a pass) once per pass, times the layers that saw it. They
    are read on access.
    """

    def __init__(self):
        self.steps = 0
        self.heads = 1  # KV heads per layer: the device totals are per KV head
        self.layer_steps = 0  # (layer, step) pairs
        self.far_selected_host = 0  # where the CPU received the selection
        self.selected_counts: torch.Tensor | None = None  # [B, Hkv] retrieved rows, where they stayed on the device
        self.device_totals: torch.Tensor | None = None  # far tokens, attended on the device, past tokens, per pass

    def add(self, selected: int | torch.Tensor, per_head: torch.Tensor, heads: int, first: bool) -> None:
        """One layer's step: tokens selected (a host count, or the device's counts [B, Hkv]), and [far tokens,
        locally attended, past] per KV head (``first``: the pass's first layer, which adds them for all)."""
        if isinstance(selected, torch.Tensor):
            if self.selected_counts is None:
                self.selected_counts = torch.zeros(selected.shape, dtype=torch.int64, device=selected.device)
            self.selected_counts += selected.to(self.selected_counts.device, non_blocking=True)
        else:
            self.far_selected_host += selected
        self.heads, self.layer_steps, self.steps = heads, self.layer_steps + 1, self.steps + first
        if first:
            if self.device_totals is None:
                self.device_totals = torch.zeros_like(per_head, dtype=torch.int64)
            self.device_totals += per_head.to(self.device_totals.device, non_blocking=True)

    def rows(self, start: int, stop: int, shape: tuple[int, int], device: torch.device) -> "AttendedStats":
        """The statistics of rows [start, stop) of a batch of ``shape`` (rows, KV heads) on ``device``, for one part of
        a pipelined decode step: the device counts it adds land in this object's (row slices of its per-row counts,
        the same pass totals); the host's counts of steps are this object's to keep (the graph runner's)."""
        if self.selected_counts is None:
            self.selected_counts = torch.zeros(shape, dtype=torch.int64, device=device)
        if self.device_totals is None:
            self.device_totals = torch.zeros(3, dtype=torch.int64, device=device)
        self.heads = shape[1]
        part = copy.copy(self)
        part.selected_counts = self.selected_counts[start:stop]
        return part

    def new_batch(self) -> None:
        """Before the batch's rows change in number: the device's per-row counts so far move to the host total."""
        if self.selected_counts is not None:
            self.far_selected_host += int(self.selected_counts.sum())
            self.selected_counts = None

    @property
    def far_selected(self) -> int:
        device = 0 if self.selected_counts is None else int(self.selected_counts.sum())
        return self.far_selected_host + device

    def _totals(self) -> list[int]:
        if self.device_totals is None:
            return [0, 0, 0]
        layers = self.layer_steps // max(self.steps, 1)
        return [int(t) * self.heads * layers for t in self.device_totals.tolist()]

    @property
    def far_tokens(self) -> int:
        return self._totals()[0]

    @property
    def attended(self) -> int:
        return self.far_selected + self._totals()[1]

    @property
    def past_tokens(self) -> int:
        return self._totals()[2]

    @property
    def far_fraction(self) -> float:
        """Mean fraction of far tokens retrieved per KV head."""
        return self.far_selected / max(self.far_tokens, 1)

    @property
    def attended_fraction(self) -> float:
        """Mean fraction of all past tokens attended (retrieved far tokens plus sinks and window)."""
        return self.attended / max(self.past_tokens, 1)
