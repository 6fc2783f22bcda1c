"""The hand-off between a GPU and the CPU in an offloaded layer's decode step: the selection and the query go to
the CPU, the CPU attention's output and log-sum-exp come back, through pinned host buffers allocated once per GPU
and lane and reused by every layer and step, so each copy is asynchronous and the host waits exactly once per
layer: for the selection to land.

Reuse is safe because one host thread runs the layers of a lane in turn on one stream: a layer's copies into the
buffers are queued after the previous layer's copies out of them, and the CPU writes the output buffers only after
the wait for its layer's selection, which was queued after the previous layer's copy of them back to the GPU. The
two halves of a pipelined step (:mod:`a2ats_hf.graphs`) interleave their layers, so each has a lane of its own.
"""

from __future__ import annotations

import math

import torch


class HandOff:
    """Pinned host buffers of one GPU's hand-offs, each grown (by doubling) to the largest step seen."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.ready = torch.cuda.Event()

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous pinned tensor of ``shape`` (a copy into a strided host tensor would not be asynchronous)."""
        numel, held = math.prod(shape), self.buffers.get(name)
        if held is None or held.numel() < numel or held.dtype != dtype:
            size = max(numel, 2 * held.numel() if held is not None and held.dtype == dtype else 0)
            held = self.buffers[name] = torch.empty(size, dtype=dtype, pin_memory=True)
        return held[:numel].view(shape)

    def send(self, indices: torch.Tensor, counts: torch.Tensor, query: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queue the copies of a selection (int32 ``indices`` [B, Hkv, K], ``counts`` [B, Hkv]) and the query [B, Hq,
        D] (as float32) to the CPU, then the ``ready`` event; returns their host buffers, to read after
        ``ready.synchronize()``."""
        sent = []
        for name, tensor, dtype in (("indices", indices, torch.int32), ("counts", counts, torch.int32),
                                    ("query", query, torch.float32)):
            host = self.buffer(name, tuple(tensor.shape), dtype)
            host.copy_(tensor.to(dtype), non_blocking=True)
            sent.append(host)
        if not torch.cuda.is_current_stream_capturing():  # (a captured step's is recorded by the graph runner)
            self.ready.record(torch.cuda.current_stream(self.device))
        return tuple(sent)

    def outputs(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host buffers for the CPU attention's output [B, Hq, D] and log-sum-exp [B, Hq] (float32)."""
        return (self.buffer("out", tuple(query.shape), torch.float32),
                self.buffer("lse", tuple(query.shape[:2]), torch.float32))


_HAND_OFFS: dict[tuple[torch.device, int], HandOff] = {}


def hand_off(device: torch.device, lane: int = 0) -> HandOff:
    """The :class:`HandOff` of ``device`` (one per GPU and ``lane``, kept for the process): the parts of a
    pipelined step each use a lane of their own, as one part's CPU attention runs while the other's selection is
    copied out."""
    if (device, lane) not in _HAND_OFFS:
        _HAND_OFFS[device, lane] = HandOff(device)
    return _HAND_OFFS[device, lane]
