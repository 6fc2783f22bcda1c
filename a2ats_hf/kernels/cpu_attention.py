"""CPU sparse attention over the offloaded store: a C++ kernel built on first use, with the torch reference
as fallback.

The kernel (``csrc/sparse_attention.cpp``) gathers the selected rows straight from the store's blocks and attends
them in parallel over (row, KV head, chunk) tasks on torch's thread pool. It is compiled once per machine by
``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed; ninja is a dependency). Without a compiler the
torch reference runs instead, with a warning; ``A2ATS_CPU_KERNEL=torch`` forces it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

from . import reference

SOURCE = Path(__file__).with_name("csrc") / "sparse_attention.cpp"


def _machine_tag() -> str:
    """Distinguishes CPUs, since the kernel is built for the one it runs on (-march=native)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags} {torch.__version__}".encode()).hexdigest()[:10]


@functools.cache
def extension() -> object | None:
    """The compiled kernel module, or None where it cannot be built (the torch reference is used then)."""
    if os.environ.get("A2ATS_CPU_KERNEL", "").lower() == "torch":
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        name = f"a2ats_cpu_{_machine_tag()}"
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
        if not any(root.glob(f"*/{name}/{name}*.so")):
            print("a2ats: building the CPU attention kernel (once per machine, about a minute)...", file=sys.stderr)
        flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
        return load(
            name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, unsupported platform
        warnings.warn(f"A2ATS CPU kernel could not be built ({error!s:.300}); using the slower torch reference.")
        return None


def sparse_attention(
    query: torch.Tensor, store, indices: torch.Tensor, counts: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`a2ats_hf.kernels.reference.sparse_attention`: query [B, Hq, D], indices [B, Hkv, K]
    (first ``counts`` [B, Hkv] valid, ascending) into a :class:`~a2ats_hf.store.KVStore`; returns out [B, Hq, D]
    and lse [B, Hq], float32 on the CPU."""
    ext = extension()
    if ext is None or store.length == 0:
        return reference.sparse_attention(query, store, indices, counts, scaling)
    query = query.detach().to("cpu", torch.float32).contiguous()
    indices = indices.to("cpu", torch.int32).contiguous()
    counts = counts.to("cpu", torch.int32).contiguous()
    out, lse = ext.sparse_attention(query, store.key_blocks, store.value_blocks, indices, counts, float(scaling))
    return out, lse
