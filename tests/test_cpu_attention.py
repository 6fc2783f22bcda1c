"""The C++ CPU sparse attention against the torch reference: float32, bfloat16 and float16 stores, awkward sizes,
selections spanning several blocks and several of the kernel's 256-row chunks, empty selections, and both the
register-tiled loops (groups of 1, 2, 4, 8 with a head dimension divisible by 8) and the generic ones."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf.kernels import cpu_attention, reference
from a2ats_hf.store import KVStore


def test_kernel_builds():
    """The compiled kernel is what runs here (no silent fallback to the reference)."""
    assert cpu_attention.extension() is not None


def test_fallback_can_be_forced(monkeypatch):
    monkeypatch.setenv("A2ATS_CPU_KERNEL", "torch")
    assert cpu_attention.extension.__wrapped__() is None


def test_a_failed_native_build_falls_back_to_a_portable_one(monkeypatch):
    """Where the build for this CPU fails (a compiler without intrinsics the CPU offers), the kernel is built again
    without its AVX-512 paths, with a warning, before the torch reference is considered; where that fails too, the
    reference runs, with a warning."""
    built = []

    def build(name, flags):
        built.append((name, flags))
        if "-DA2ATS_PORTABLE" not in flags or fail_portable:
            raise RuntimeError("error: unknown type name '__m512bh'")
        return "portable module"

    monkeypatch.setattr(cpu_attention, "_build", build)
    fail_portable = False
    with pytest.warns(UserWarning, match="using one without its AVX-512 paths"):
        assert cpu_attention.extension.__wrapped__() == "portable module"
    assert built[1][0] == built[0][0] + "_portable"
    fail_portable = True
    with pytest.warns(UserWarning, match="slower torch reference"):
        assert cpu_attention.extension.__wrapped__() is None


@pytest.mark.slow
def test_the_portable_build_gives_the_same_results():
    """The kernel built without its AVX-512 paths (``A2ATS_PORTABLE``) attends as the native build does."""
    portable = cpu_attention._build(f"a2ats_cpu_{cpu_attention._machine_tag()}_portable",
                                    ["-march=native", "-DA2ATS_PORTABLE"])
    g = torch.Generator().manual_seed(3)
    b, hkv, group, n, d = 2, 2, 4, 700, 128
    store = KVStore(b, hkv, d, torch.bfloat16, block_size=300)
    store.append(*torch.randn(2, b, hkv, n, d, generator=g).bfloat16())
    indices = torch.stack([torch.randperm(n, generator=g)[:200].sort().values for _ in range(b * hkv)])
    indices, counts = indices.view(b, hkv, 200).int(), torch.full((b, hkv), 200, dtype=torch.int32)
    query = torch.randn(b, hkv * group, d, generator=g).bfloat16().float()
    native = cpu_attention.sparse_attention(query, store, indices, counts, d**-0.5)
    out, lse = cpu_attention.output_buffers(query)
    none = torch.empty(0, dtype=store.dtype)  # no copies
    portable.sparse_attention(query, store.blocks, indices, counts, d**-0.5, out, lse, none)
    torch.testing.assert_close(out, native[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, native[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bf16_query", [False, True], ids=["float32-query", "bfloat16-query"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b, hq, hkv, n, d, block",
    [(2, 9, 3, 1301, 64, 500), (1, 4, 1, 700, 24, 4096), (3, 8, 8, 90, 128, 7), (1, 16, 2, 600, 64, 128),
     (2, 4, 2, 77, 40, 33), (1, 8, 2, 300, 20, 64), (2, 8, 2, 900, 128, 300)],
    ids=["group3", "group4-d24", "group1", "group8", "group2-d40", "group4-d20-untiled", "group4-d128"],
)
def test_matches_reference(dtype, b, hq, hkv, n, d, block, bf16_query):
    """A query that bfloat16 holds exactly (a bfloat16 model's) over a bfloat16 store with a head dimension divisible
    by 32 takes, where the CPU has AVX512-BF16, the dot-product instructions' path."""
    g = torch.Generator().manual_seed(n)
    store = KVStore(b, hkv, d, dtype, block_size=block)
    for part in torch.randn(b, hkv, n, 2 * d, generator=g).split([n // 3, n - n // 3], dim=2):  # two appends
        store.append(part[..., :d].to(dtype), part[..., d:].to(dtype))
    chosen = torch.rand(b, hkv, n, generator=g) < torch.rand(b, hkv, 1, generator=g)
    chosen[0, -1] = False  # a head that retrieves nothing
    counts = chosen.sum(-1)
    indices = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., : int(counts.max())]
    query = torch.randn(b, hq, d, generator=g)
    query = query.bfloat16().float() if bf16_query else query
    out, lse = cpu_attention.sparse_attention(query, store, indices, counts, d**-0.5)
    ref_out, ref_lse = reference.sparse_attention(query, store, indices, counts, d**-0.5)
    empty = counts.repeat_interleave(hq // hkv, dim=1) == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernel", ["C++", "torch"])
def test_writes_into_given_outputs(kernel, monkeypatch):
    """Given output tensors (the pinned hand-off buffers of a GPU step), the kernel, or the reference without a
    compiler, writes the result into them and returns them."""
    if kernel == "torch":
        monkeypatch.setattr(cpu_attention, "extension", lambda: None)
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, n, d = 2, 6, 2, 50, 16
    store = KVStore(b, hkv, d, torch.float32, block_size=16)
    store.append(torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g))
    indices = torch.randperm(n, generator=g)[:9].sort().values.int().expand(b, hkv, 9).contiguous()
    counts = torch.tensor([[9, 4], [0, 9]], dtype=torch.int32)
    query = torch.randn(b, hq, d, generator=g)
    given = (torch.full((b, hq, d), 7.0), torch.full((b, hq), 7.0))
    out, lse = cpu_attention.sparse_attention(query, store, indices, counts, 0.25, given)
    assert out is given[0] and lse is given[1]
    ref_out, ref_lse = reference.sparse_attention(query, store, indices, counts, 0.25)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("kernel", ["C++", "torch"])
@pytest.mark.parametrize("copied", [1, 37, 300])
def test_copies_the_first_rows_it_reads(kernel, copied, monkeypatch):
    """Given ``copies``, the first F valid rows of each selection (key and value, in the store's dtype) land in it,
    across blocks and the kernel's 256-row chunks; entries past a selection's count keep what they held; the
    attention is unchanged."""
    if kernel == "torch":
        monkeypatch.setattr(cpu_attention, "extension", lambda: None)
    g = torch.Generator().manual_seed(copied)
    b, hq, hkv, n, d, k = 2, 6, 3, 900, 24, 400
    store = KVStore(b, hkv, d, torch.bfloat16, block_size=128)
    store.append(torch.randn(b, hkv, n, d, generator=g).bfloat16(), torch.randn(b, hkv, n, d, generator=g).bfloat16())
    indices = torch.rand(b, hkv, n, generator=g).argsort(-1)[..., :k].sort(-1).values.int()
    counts = torch.randint(0, k + 1, (b, hkv), generator=g, dtype=torch.int32)
    counts[0, 0], counts[1, 2] = 0, k
    query = torch.randn(b, hq, d, generator=g)
    copies = torch.full((b, hkv, copied, 2, d), 7.0, dtype=torch.bfloat16)
    out, lse = cpu_attention.sparse_attention(query, store, indices, counts, 0.2, copies=copies)
    ref_out, ref_lse = reference.sparse_attention(query, store, indices, counts, 0.2)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    keys, values = store.gather(indices[..., :copied])
    valid = (torch.arange(copied) < counts[..., None])[..., None]
    for got, want in ((copies[..., 0, :], keys), (copies[..., 1, :], values)):
        assert torch.equal(torch.where(valid, got, 7.0), torch.where(valid, want, 7.0))
        assert (got[~valid.expand_as(got)] == 7.0).all()


@pytest.mark.slow
def test_matches_reference_on_smollm2(smollm2, austen):
    """Real queries and offloaded K/V from SmolLM2 decoding Persuasion at topk=0.05: every layer's call agrees."""
    from a2ats_eval.assets import demo_codebooks
    from a2ats_hf import A2ATSCache, cache_argument, kernels

    model, tokenizer = smollm2
    books = demo_codebooks(model, tokenizer, austen)
    ids = tokenizer(austen["Persuasion"][60000:66000], return_tensors="pt")["input_ids"]
    checked = []

    def spy(query, store, indices, counts, scaling, out=None, copies=None):
        result = cpu_attention.sparse_attention(query, store, indices, counts, scaling, out, copies)
        ref_out, ref_lse = reference.sparse_attention(query, store, indices, counts, scaling)
        torch.testing.assert_close(result[0], ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result[1], ref_lse, atol=1e-5, rtol=1e-5)
        checked.append(int(counts.sum()))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sparse_attention", spy)
        model.generate(ids, **cache_argument(model, A2ATSCache(books, topk=0.05)), max_new_tokens=3, do_sample=False)
    assert len(checked) == 2 * model.config.num_hidden_layers and min(checked) > 0


# The build lock. torch's builder waits forever on the lock file of a build that was killed; the next process waits
# for it a bounded time (A2ATS_BUILD_LOCK_TIMEOUT), then removes it and builds. Each scenario runs in processes of
# its own over one temporary TORCH_EXTENSIONS_DIR: a real build killed mid-compile, then the same directory (built by
# the process that recovered) under a live lock holder, a killed one, and an hour-old lock.

CHILD = """
import sys, time
from a2ats_hf.kernels import cpu_attention
print("imported", flush=True)
sys.stdin.readline()  # go
started = time.perf_counter()
ext = cpu_attention.extension()
print("built" if ext is not None and hasattr(ext, "sparse_attention") else "no kernel", flush=True)
print(f"{time.perf_counter() - started:.2f}", flush=True)
"""


class Child:
    """A process loading the kernel from ``root``: imports, then calls ``extension()`` once ``go()`` is called."""

    def __init__(self, root, tmp_path, timeout=None, **popen):
        import os
        import subprocess
        import sys

        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "PYTHONWARNINGS": "always"}
        env.pop("A2ATS_CPU_KERNEL", None)
        env.pop("A2ATS_BUILD_LOCK_TIMEOUT", None)
        if timeout is not None:
            env["A2ATS_BUILD_LOCK_TIMEOUT"] = str(timeout)
        self.stderr_path = tmp_path / f"stderr-{id(self)}.txt"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                text=True, **popen,
            )
        assert self.process.stdout.readline() == "imported\n", self.stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def go(self):
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self, timeout=300) -> tuple[str, float]:
        """("built" or "no kernel", seconds ``extension()`` took)."""
        out, _ = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, self.stderr
        status, seconds = out.split()
        return status, float(seconds)


def wait_for(condition, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed_build(tmp_path_factory):
    """A real build killed mid-compile (its lock left behind), then the next process's load: (extensions root, the
    lock's path, the next process's result and stderr)."""
    import os
    import signal

    root = tmp_path_factory.mktemp("torch_extensions")
    logs = tmp_path_factory.mktemp("logs")
    builder = Child(root, logs, start_new_session=True)  # its own process group: ninja and the compiler die with it
    builder.go()
    wait_for(lambda: any(root.glob("*/lock")) or builder.process.poll() is not None, 300, "the build to start")
    (lock,) = root.glob("*/lock")
    wait_for(lambda: any(root.glob("*/build.ninja")), 30, "ninja to start")
    os.killpg(builder.process.pid, signal.SIGKILL)
    builder.process.wait()
    assert lock.exists() and not any(root.glob("*/*.so")), "the build was not caught mid-compile"
    following = Child(root, logs, timeout=10)  # the lock is a few seconds old by now: waited on for the rest
    following.go()
    return root, lock, following.result(), following.stderr


def test_a_killed_build_does_not_hang_the_next(killed_build):
    """The process after a killed build waits at most A2ATS_BUILD_LOCK_TIMEOUT for the lock, says it removed a lock
    left by an interrupted build, builds, and has the kernel."""
    _, lock, (status, seconds), stderr = killed_build
    assert status == "built"
    assert "interrupted build" in stderr and str(lock) in stderr
    assert "building the CPU attention kernel" in stderr
    assert not lock.exists()


def test_a_live_build_is_waited_for(killed_build, tmp_path):
    """A lock that its holder releases is waited on (with one message naming it) and not removed; a library already
    built is not announced as a build."""
    from torch.utils.file_baton import FileBaton

    root, lock, _, _ = killed_build
    child = Child(root, tmp_path, timeout=120)
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    child.go()
    wait_for(lambda: "waiting for another process's build" in child.stderr, 60, "the waiting message")
    assert str(lock) in child.stderr and child.process.poll() is None
    baton.release()
    status, seconds = child.result()
    assert status == "built" and seconds < 60
    assert child.stderr.count("waiting for another") == 1
    assert "interrupted build" not in child.stderr and "building the CPU attention kernel" not in child.stderr


def test_a_killed_holder_is_given_up_on_after_the_timeout(killed_build, tmp_path):
    """A process holding torch's build lock is SIGKILLed: the next load waits the timeout, removes the lock with a
    warning, and returns."""
    import subprocess
    import sys

    root, lock, _, _ = killed_build
    child = Child(root, tmp_path, timeout=3)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom torch.utils.file_baton import FileBaton\n"
         "assert FileBaton(sys.argv[1]).try_acquire()\nprint('held', flush=True)\ntime.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait()
    assert lock.exists()
    child.go()
    status, seconds = child.result()
    assert status == "built" and 2 < seconds < 60
    assert "waiting for another process's build" in child.stderr and "interrupted build" in child.stderr
    assert not lock.exists()


def test_an_ancient_lock_goes_at_once(killed_build, tmp_path):
    """A lock an hour old is removed without waiting, under the default timeout."""
    import os
    import time

    root, lock, _, _ = killed_build
    child = Child(root, tmp_path)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    child.go()
    status, seconds = child.result()
    assert status == "built" and seconds < 30
    assert "interrupted build" in child.stderr and "waiting for another" not in child.stderr
