"""CPU sparse attention over the offloaded store: a C++ kernel built on first use, with the torch reference
as fallback.

The kernel (``csrc/sparse_attention.cpp``) gathers the selected rows (a token's key and value side by side) straight
from the store's blocks and attends them in parallel over (row, KV head, chunk) tasks on torch's thread pool. It is
compiled once per machine by ``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed; ninja is a
dependency), for the CPU it runs on, or without its AVX-512 paths where that build fails. Without a compiler the
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


BUILD_LOCK_TIMEOUT_S = 300.0  # a build takes about a minute; a lock this old was left by a build that was killed


def _lock_timeout() -> float:
    value = os.environ.get("A2ATS_BUILD_LOCK_TIMEOUT", "")
    try:
        return float(value) if value.strip() else BUILD_LOCK_TIMEOUT_S
    except ValueError:
        warnings.warn(f"A2ATS_BUILD_LOCK_TIMEOUT must be a number of seconds, got {value!r}; using "
                      f"{BUILD_LOCK_TIMEOUT_S:g}")
        return BUILD_LOCK_TIMEOUT_S


def _await_build_lock(lock: Path, timeout: float, poll_s: float = 0.2) -> None:
    """Wait for another process's build of the kernel to release ``lock``, torch's build lock, then return.

    torch's builder waits forever on that lock, so a build that was killed (SIGKILL, ``timeout``, a cancelled CI
    job) would hang every later process at its first decode step. A lock older than ``timeout`` seconds (the lock
    file is created when a build starts and never touched again) was left by such a build: it is removed, with a
    warning, and the build proceeds. A lock already that old goes at once; a younger one is waited on until it is."""
    started = time.time()
    announced = False
    while True:
        try:
            stat = lock.stat()
        except OSError:
            return  # released (or never there)
        now = time.time()
        # the deadline counts from the lock's creation, but never more than ``timeout`` from now (clock skew)
        deadline = min(stat.st_mtime, started) + timeout
        if now >= deadline:
            break
        if not announced:
            print(f"a2ats: waiting for another process's build of the CPU attention kernel to finish (lock file "
                  f"{lock}; it is taken as abandoned at {timeout:g} s old, see A2ATS_BUILD_LOCK_TIMEOUT)...",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(min(poll_s, max(deadline - now, 0.0)))
    try:
        current = lock.stat()
        if (current.st_ino, current.st_mtime_ns) != (stat.st_ino, stat.st_mtime_ns):
            return  # a new build took the lock meanwhile: torch waits on that one
        lock.unlink()
    except FileNotFoundError:
        return
    warnings.warn(f"removed {lock}, a build lock of the CPU kernel left by an interrupted build: it was still there "
                  f"after {max(now - stat.st_mtime, 0.0):.0f} s (A2ATS_BUILD_LOCK_TIMEOUT={timeout:g} s)")


def _build_directory(name: str) -> Path | None:
    """Where torch builds extension ``name`` (and keeps its ``lock``): ``$TORCH_EXTENSIONS_DIR/<name>`` or
    ``<default root>/py311_cpu/<name>`` and the like; None where this torch has no such function."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except (ImportError, TypeError):
        return None


def _needs_build(build_dir: Path | None, name: str) -> bool:
    """Whether ``load`` will compile: no library built yet, or one older than the source."""
    if build_dir is None:
        return False
    from torch.utils.cpp_extension import LIB_EXT

    try:
        return (build_dir / f"{name}{LIB_EXT}").stat().st_mtime < SOURCE.stat().st_mtime
    except OSError:
        return True


def _build(name: str, flags: list[str]) -> object:
    """Compile (or load the cached build of) the kernel as extension ``name`` with ``flags``, after any stale build
    lock is cleared."""
    from torch.utils.cpp_extension import load

    build_dir = _build_directory(name)
    if build_dir is not None:
        _await_build_lock(build_dir / "lock", _lock_timeout())
    if _needs_build(build_dir, name):
        print("a2ats: building the CPU attention kernel (once per machine, about a minute)...", file=sys.stderr)
    return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def extension() -> object | None:
    """The compiled kernel module, or None where it cannot be built (the torch reference is used then). Built for
    this CPU (-march=native); where that fails (a compiler without the AVX-512 intrinsics the CPU offers), built
    again without the optional vector paths (``A2ATS_PORTABLE``) before giving up."""
    if os.environ.get("A2ATS_CPU_KERNEL", "").lower() == "torch":
        return None
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    name = f"a2ats_cpu_{_machine_tag()}"
    try:
        return _build(name, native)
    except Exception as error:  # no compiler, no ninja, unsupported platform, intrinsics this compiler lacks
        first = error
    try:
        module = _build(f"{name}_portable", [*native, "-DA2ATS_PORTABLE"])
        warnings.warn(f"A2ATS CPU kernel: the build for this CPU failed ({first!s:.300}); using one without its "
                      "AVX-512 paths.")
        return module
    except Exception as error:
        warnings.warn(f"A2ATS CPU kernel could not be built ({error!s:.300}); using the slower torch reference.")
        return None


def output_buffers(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty float32 CPU tensors for the attention of ``query`` [B, Hq, D]: its output [B, Hq, D] and lse [B, Hq]."""
    return torch.empty(query.shape, dtype=torch.float32), torch.empty(query.shape[:2], dtype=torch.float32)


def sparse_attention(
    query: torch.Tensor, store, indices: torch.Tensor, counts: torch.Tensor, scaling: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None, copies: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`a2ats_hf.kernels.reference.sparse_attention`: query [B, Hq, D], indices [B, Hkv, K]
    (first ``counts`` [B, Hkv] valid, ascending) into a :class:`~a2ats_hf.store.KVStore`; returns out [B, Hq, D]
    and lse [B, Hq], float32 on the CPU, written into ``out`` (two contiguous float32 CPU tensors of those shapes,
    e.g. pinned hand-off buffers) where given. Where ``copies`` [B, Hkv, F, 2, D] (the store's dtype) is given, the
    first F valid rows of each selection, key and value, are copied into it as they are read (the row cache's fill:
    one read of them, not two); its entries past ``counts`` are left as they were."""
    store.wait()  # decode tokens still staged reach their blocks
    ext = extension()
    if ext is None or store.length == 0:
        result = reference.sparse_attention(query, store, indices, counts, scaling)
        if copies is not None and store.length:
            copied = copies.shape[2]
            keys, values = store.gather(indices[..., :copied].clamp(0, store.length - 1))
            valid = (torch.arange(copied) < counts[..., None].cpu())[..., None, None]
            copies.copy_(torch.where(valid, torch.stack([keys, values], dim=3), copies))
        return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))
    query = query.detach().to("cpu", torch.float32).contiguous()
    indices = indices.to("cpu", torch.int32).contiguous()
    counts = counts.to("cpu", torch.int32).contiguous()
    return tuple(ext.sparse_attention(query, store.blocks, indices, counts, float(scaling),
                                      *(out or output_buffers(query)),
                                      torch.empty(0, dtype=store.dtype) if copies is None else copies))
