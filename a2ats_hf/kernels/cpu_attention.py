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
import time
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


STALE_LOCK_S = 600  # a build takes about a minute; a lock this old was left by a build that was killed


def _clear_stale_lock(build_dir: Path) -> None:
    """torch's extension builder waits forever on the lock file of a build that was interrupted (Ctrl-C, a
    killed process); remove one old enough that no build can still hold it."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_S:
        warnings.warn(f"removing {lock}, left {age / 60:.0f} minutes ago by an interrupted build of the CPU kernel")
        lock.unlink(missing_ok=True)


@functools.cache
def extension() -> object | None:
    """The compiled kernel module, or None where it cannot be built (the torch reference is used then)."""
    if os.environ.get("A2ATS_CPU_KERNEL", "").lower() == "torch":
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        name = f"a2ats_cpu_{_machine_tag()}"
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
        _clear_stale_lock(root / name)
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
