"""`Placement`: where each layer of a cache keeps its K/V (the device or CPU memory), and the check, before anything
is allocated, that it all fits."""

from __future__ import annotations

import torch

from .config import A2ATSConfig
from .store import DeviceKVStore, KVStore, Store, check_memory, kv_bytes


class Placement:
    """One cache's placement of its ``layers`` A2ATS layers under ``config.offload``: "none" keeps every layer's K/V
    on the device, "cpu" in CPU memory, "auto" on the device while ``config.gpu_kv_budget`` (default: 90% of the
    device's free memory less 2 GiB, read when the first layer allocates) lasts. An offloaded layer with a row
    cache keeps ``row_slots`` rows per (row, KV head) on the device besides."""

    def __init__(self, config: A2ATSConfig, layers: int, row_slots: int = 0):
        self.config, self.layers, self.row_slots = config, layers, row_slots
        self.device_left: int | None = None  # what "auto" may still place on the device, set by the first layer

    def reset(self) -> None:
        """A new prompt: the budget is read again."""
        self.device_left = None

    def check(self, key_states: torch.Tensor) -> None:
        """Before the first layer allocates: fail if every layer's K/V for the prompt (or ``max_length``) would
        not fit where it is kept (CPU memory, or the device's with ``offload="none"``), or the codes, sinks and
        window would not fit on the device."""
        b, h, t, d = key_states.shape
        config, layers = self.config, self.layers
        if config.max_length is not None and t > config.max_length:
            raise ValueError(f"The prompt has {t} tokens, more than this A2ATSCache's max_length={config.max_length}.")
        tokens, device, dtype = max(t, config.max_length or 0), key_states.device, key_states.dtype
        resident = {"none": layers, "cpu": 0}.get(config.offload)
        if resident is None:  # "auto": the layers within the device budget stay on the device
            resident = min(layers, self.device_budget(device) // kv_bytes(b, h, d, dtype, tokens, 1))
        local = layers * b * h * (2 * (config.sink + config.window) * d * dtype.itemsize + 2 * tokens)  # ring, codes
        slots = b * h * (self.row_slots * (2 * d * dtype.itemsize + 12) + 4 * (tokens + 1)) if self.row_slots else 0
        on_device = local + resident * kv_bytes(b, h, d, dtype, tokens, 1) + (layers - resident) * slots
        offloaded = (layers - resident) * kv_bytes(b, h, d, dtype, tokens)
        kv = f"The K/V of {layers - resident} layers x batch {b} x {tokens} tokens"
        slots_held = f", and {self.row_slots} row-cache slots per row and KV head of the others" if slots else ""
        local = (f"the codes, {config.sink} sinks and {config.window}-token window of {layers} layers (with the K/V of "
                 f"{resident} layers kept on {device}{slots_held})")
        if device.type == "cuda":
            check_memory(on_device, local[0].upper() + local[1:], device)
            check_memory(offloaded, kv)
        else:
            check_memory(on_device + offloaded, f"{kv}, with {local},")

    def device_budget(self, device: torch.device) -> int:
        """Bytes of K/V that offload="auto" may still place on the device (fixed by the first layer)."""
        if self.device_left is None:
            if self.config.gpu_kv_budget is not None:
                self.device_left = self.config.gpu_kv_budget
            elif device.type == "cuda":
                self.device_left = max(int(0.9 * torch.cuda.mem_get_info(device)[0]) - 2 * 2**30, 0)
            else:
                self.device_left = 0  # a CPU model: CPU memory is where "offloading" leads anyway
        return self.device_left

    def new_store(self, key_states: torch.Tensor) -> Store:
        """Where a layer keeps its K/V, from its prompt's keys [B, Hkv, T, D]: the device (room for ``max_length``
        or the prompt) under offload="none", or under "auto" while the budget lasts; CPU memory otherwise."""
        b, h, t, d = key_states.shape
        device, dtype = key_states.device, key_states.dtype
        capacity = max(t, self.config.max_length or 0)
        resident = self.config.offload == "none"
        if self.config.offload == "auto":
            need = kv_bytes(b, h, d, dtype, capacity, 1)
            resident = need <= self.device_budget(device)
            self.device_left -= need if resident else 0
        if resident:
            return DeviceKVStore(b, h, d, dtype, device, capacity)
        return KVStore(b, h, d, dtype, block_size=capacity if self.config.gpu_share else None)  # one block: mapped
