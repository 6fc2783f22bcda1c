"""Programmatic dependent launch (PDL): on Hopper and later, a kernel launched with it is scheduled while the kernel
before it on the stream still runs and waits for that kernel (its writes visible) before its first memory access;
a captured step's chains of short kernels (the top-K's select and scans, the lookup table, re-ranking's scores and
keep: ~10 a layer of a few microseconds each) so overlap each launch's ramp with the previous kernel's tail."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

PDL = False  # launch the step's Triton kernels with PDL where the device has it (a bench.tune_step knob)


@functools.cache
def _has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> dict:
    """A launch's PDL arguments on ``device``: the kernel's ``PDL`` constant, and Triton's ``launch_pdl`` where it
    applies (a CUDA device of compute capability 9 or more, not the interpreter, which runs programs in turn)."""
    on = (PDL and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
          and _has_pdl(device.index if device.index is not None else torch.cuda.current_device()))
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """With PDL, the first statement of a kernel: wait for the kernel before it on the stream, then let the next
    one be scheduled (its programs wait in turn, so every kernel still sees all earlier kernels' writes)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
