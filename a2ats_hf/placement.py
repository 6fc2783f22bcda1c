"""`Placement`: where each layer of a cache keeps its K/V (the device or CPU memory), and the check, before anything
is allocated, that it all fits."""

from __future__ import annotations

import torch

from .config import A2ATSConfig
from .store import DeviceKVStore, KVStore, Store, check_memory, kv_bytes


def device_budget(device: torch.device) -> int:
    """Bytes of the device's memory the K/V may take by default: 90% of what is free less 2 GiB for activations;
    0 on a CPU (CPU memory is where offloading leads anyway)."""
    if device.type != "cuda":
        return 0
    return max(int(0.9 * torch.cuda.mem_get_info(device)[0]) - 2 * 2**30, 0)


class Placement:
    """One cache's placement of its ``layers`` A2ATS layers under ``config.offload``: "none" keeps every layer's K/V
    on the device, "cpu" in CPU memory, "auto" on the device for as many layers as ``config.gpu_kv_budget``
    (default: :func:`device_budget`, read when the first layer allocates) holds, the first layers first. An
    offloaded layer with a row cache keeps ``row_slots`` rows per (row, KV head) on the device besides, and "auto"
    takes those from the same budget; the default row cache (``row_cache=None``) is kept only where that budget
    holds every layer's slots beside the codes and windows."""

    def __init__(self, config: A2ATSConfig, layers: int, row_slots: int = 0):
        self.config, self.layers, self.wanted_slots, self.row_slots = config, layers, row_slots, row_slots
        self.resident_left: int | None = None  # layers "auto" still keeps on the device, set by the first layer
        self.budget_read: int | None = None  # this prompt's :meth:`budget`, read once

    def reset(self) -> None:
        """A new prompt: the budget is read again."""
        self.resident_left = self.budget_read = None

    def slot_bytes(self, key_states: torch.Tensor, tokens: int) -> int:
        """Device bytes of one offloaded layer's row cache (its slots' K/V, token and stamp, and the token -> slot
        map) for keys shaped like ``key_states`` [B, Hkv, T, D] and room for ``tokens``."""
        b, h, _, d = key_states.shape
        return b * h * (self.row_slots * (2 * d * key_states.dtype.itemsize + 12) + 4 * (tokens + 1)) \
            if self.row_slots else 0

    def local_bytes(self, key_states: torch.Tensor, tokens: int) -> int:
        """Device bytes every layer keeps wherever its K/V is: the codes of ``tokens`` and the ring of sinks and
        window, for keys shaped like ``key_states`` [B, Hkv, T, D]."""
        b, h, _, d = key_states.shape
        window = self.config.sink + self.config.window
        return self.layers * b * h * (2 * window * d * key_states.dtype.itemsize + 2 * tokens)

    def resident(self, key_states: torch.Tensor, tokens: int) -> int:
        """How many layers keep their K/V on the device: all under "none", none under "cpu"; under "auto" as many as
        the budget holds beside the row-cache slots of the layers it offloads (fixed by the first layer)."""
        if self.config.offload != "auto":
            return {"none": self.layers, "cpu": 0}[self.config.offload]
        if self.resident_left is None:
            b, h, _, d = key_states.shape
            layer = kv_bytes(b, h, d, key_states.dtype, tokens, 1)
            slots = self.slot_bytes(key_states, tokens)
            budget = self.budget(key_states.device)
            # r layers on the device and the others' slots: r * layer + (layers - r) * slots <= budget
            room = budget - self.layers * slots
            self.resident_left = min(self.layers, max(room // max(layer - slots, 1), 0)) if room > 0 else 0
        return self.resident_left

    def budget(self, device: torch.device) -> int:
        """Bytes of ``device`` memory "auto"'s K/V and the offloaded layers' row caches may take: ``gpu_kv_budget``,
        else :func:`device_budget`, read once a prompt (the row caches and "auto" settle on the same figure)."""
        if self.config.gpu_kv_budget is not None:
            return self.config.gpu_kv_budget
        if self.budget_read is None:
            self.budget_read = device_budget(device)
        return self.budget_read

    def settle_rows(self, key_states: torch.Tensor, tokens: int) -> None:
        """Each prompt's row-cache slots: those asked for (the memory check refuses them where they do not fit);
        by default, those of :attr:`~a2ats_hf.config.A2ATSConfig.rows_wanted` where every layer's fit the device's
        :meth:`budget` beside the codes and windows (on a GPU: it pays where PCIe or the CPU would bring the rows),
        else none: a default never turns a cache that fits into a memory error."""
        self.row_slots = self.wanted_slots
        if self.config.row_cache is None and self.row_slots:
            device = key_states.device
            needed = self.layers * self.slot_bytes(key_states, tokens) + self.local_bytes(key_states, tokens)
            if device.type == "cpu" or needed > self.budget(device):
                self.row_slots = 0

    def check(self, key_states: torch.Tensor) -> None:
        """Before the first layer allocates: settle the row caches (:meth:`settle_rows`), then fail if every
        layer's K/V for the prompt (or ``max_length``) would not fit where it is kept (CPU memory, or the device's
        with ``offload="none"``), or the codes, sinks and window would not fit on the device."""
        b, h, t, d = key_states.shape
        config, layers = self.config, self.layers
        if config.max_length is not None and t > config.max_length:
            raise ValueError(f"The prompt has {t} tokens, more than this A2ATSCache's max_length={config.max_length}.")
        tokens, device, dtype = max(t, config.max_length or 0), key_states.device, key_states.dtype
        self.settle_rows(key_states, tokens)
        resident = self.resident(key_states, tokens)
        local, slots = self.local_bytes(key_states, tokens), self.slot_bytes(key_states, tokens)
        on_device = local + resident * kv_bytes(b, h, d, dtype, tokens, 1) + (layers - resident) * slots
        offloaded = (layers - resident) * kv_bytes(b, h, d, dtype, tokens)
        kv = f"The K/V of {layers - resident} layers x batch {b} x {tokens} tokens"
        slots_held = f", and {self.row_slots} row-cache slots per row and KV head of the others" if slots else ""
        held = (f"the codes, {config.sink} sinks and {config.window}-token window of {layers} layers (with the K/V of "
                f"{resident} layers kept on {device}{slots_held})")
        if device.type == "cuda":
            check_memory(on_device, held[0].upper() + held[1:], device)
            check_memory(offloaded, kv)
        else:
            check_memory(on_device + offloaded, f"{kv}, with {held},")

    def new_store(self, key_states: torch.Tensor) -> Store:
        """Where a layer keeps its K/V, from its prompt's keys [B, Hkv, T, D]: the device (room for ``max_length``
        or the prompt) while :meth:`resident` layers are left to place; CPU memory otherwise."""
        b, h, t, d = key_states.shape
        device, dtype = key_states.device, key_states.dtype
        capacity = max(t, self.config.max_length or 0)
        if self.config.offload == "auto":
            resident = self.resident(key_states, capacity) > 0
            self.resident_left -= resident
        else:
            resident = self.config.offload == "none"
        if resident:
            return DeviceKVStore(b, h, d, dtype, device, capacity)
        return KVStore(b, h, d, dtype, block_size=capacity if self.config.gpu_share else None)  # one block: mapped
