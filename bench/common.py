"""What the benchmarks share: the Llama-3.1-8B architecture with random weights and codebooks (speed does not depend
on the values), a word tokenizer and endless random text for calibrating it, GPU and wall timers, and the
environment record every results file carries."""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import re
import subprocess
import time
from pathlib import Path

import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoModelForCausalLM, LlamaConfig

from a2ats_hf import Codebooks
from a2ats_hf.codebooks import fingerprint

RESULTS = Path(__file__).parent / "results"
LLAMA31_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, max_position_embeddings=131072 + 64, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def build(gpus: list[int], dtype: torch.dtype = torch.bfloat16) -> AutoModelForCausalLM:
    """Random-weight model on ``gpus`` (one: all of it there; two: accelerate's balanced map over both)."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LLAMA31_8B, dtype=dtype)
    if len(gpus) == 1:
        device_map = {"": gpus[0]}
    else:
        layers = ["LlamaDecoderLayer"]
        memory = get_balanced_memory(model, max_memory={g: "120GiB" for g in gpus}, no_split_module_classes=layers,
                                     dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=layers, dtype=dtype)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        device = next(d for prefix, d in sorted(device_map.items(), key=lambda kv: -len(kv[0]))
                      if name == prefix or name.startswith(prefix + ".") or prefix == "")
        value = torch.empty(param.shape, dtype=dtype, device=device)
        value.fill_(1.0) if param.dim() == 1 else value.normal_(0.0, 0.02)  # norms at 1, matrices small
        set_module_tensor_to_device(model, name, device, value=value)
    return dispatch_model(model, device_map).eval()


def group_correlation_argument(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--group-correlation RHO`` (:func:`correlate_groups`), one definition for all of them."""
    parser.add_argument("--group-correlation", type=float, default=0.0, metavar="RHO",
                        help="a KV group's query heads correlate by RHO (random weights: 0), as a trained model's "
                             "heads overlap in what they pick (bench.common.correlate_groups; 0.9 holds SmolLM2's "
                             "re-ranking candidates a KV head)")


@torch.no_grad()
def correlate_groups(model, rho: float) -> None:
    """Each layer's query projection rows of a KV group's heads mixed with one shared random draw:
    sqrt(rho) * shared + sqrt(1 - rho) * own, so the group's queries correlate by ``rho`` at the same norm. A
    trained model's heads of a group attend alike (their top tokens overlap); random weights make them independent,
    which inflates whatever grows with the union of the group's picks (re-ranking's candidates under the
    per-query-head rule). 0 leaves the model as it is."""
    if not 0 <= rho < 1:
        raise ValueError(f"group correlation must be in [0, 1), got {rho}")
    if rho == 0:
        return
    config = model.config
    group, d = config.num_attention_heads // config.num_key_value_heads, config.head_dim
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        weight = layer.self_attn.q_proj.weight  # [Hq * D, hidden]
        heads = weight.view(config.num_key_value_heads, group, d, -1)
        shared = torch.empty(heads.shape[0], 1, *heads.shape[2:]).normal_(0.0, 0.02, generator=g)
        heads.mul_(math.sqrt(1 - rho)).add_(math.sqrt(rho) * shared.to(heads))


def random_codebooks(seed: int = 0, centroids: int = 4096, config=LLAMA31_8B) -> Codebooks:
    """Codebooks for ``config`` with random centroids and no whitening (speed does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    layers, hkv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    return Codebooks(torch.eye(d).expand(layers, hkv, d, d).clone(),
                     torch.randn(layers, hkv, centroids, d, generator=g) * 0.3, fingerprint(config))


class WordTokenizer:
    """Enough of a tokenizer for a random-weight model: one id per word."""

    eos_token_id = 2

    def __init__(self, vocab_size: int = LLAMA31_8B.vocab_size):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + hash(w) % (self.vocab_size - 3) for w in text.split()]}


def texts(seed: int = 0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(50000)]
    while True:
        yield " ".join(rng.choice(words) for _ in range(4096))


def cuda_time(fn, reps: int = 20) -> float:
    """Mean seconds per call on the GPU (after a warm-up call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def wall_time(fn, reps: int = 5, before=None) -> float:
    """Median wall seconds per call (after a warm-up call), syncing the GPU if one is used; ``before``, if given,
    runs untimed before each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gpu_profile(step, device: torch.device, steps: int = 8, top: int | None = 12) -> dict:
    """The GPU's share of a step's wall time (kernel time summed, over ``steps`` synced steps), the ``top`` kernels
    that take it (None: all), by name (ms and launches per step, and a launch's shortest and longest: a kernel
    launched for several jobs, as the select's digit rounds, shows their spread), and where the GPU idles: the gaps
    before each kernel (from the latest end of those before it), summed by the name of the kernel after the gap,
    the ``top`` of them; printed and returned."""
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    each, spans = {}, []  # each kernel's launches' device us; (start, end, name) of every launch
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            each.setdefault(event.name, []).append(event.device_time_total)
            spans.append((event.time_range.start, event.time_range.end, event.name))
    kernels = {name: sum(times) / 1e3 / steps for name, times in each.items()}
    calls = {name: len(times) // steps for name, times in each.items()}
    launches = len(spans) // steps
    idle = {name: us / 1e3 / steps for name, us in idle_before(spans).items()}
    busy = sum(kernels.values())
    rows = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    gaps = sorted(idle.items(), key=lambda kv: -kv[1])[:top]
    print(f"  GPU busy {busy:.2f} ms of a {1e3 * wall / steps:.2f} ms step ({100 * busy / (1e3 * wall / steps):.0f}%), "
          f"{launches} kernels a step; idle {sum(idle.values()):.2f} ms between them")
    for name, ms in rows:
        low, high = min(each[name]), max(each[name])
        print(f"  {ms:7.3f} ms  {calls[name]:5d}x  {low:6.1f}-{high:6.1f} us  {name[:100]}")
    print("  idle before:")
    for name, ms in gaps:
        print(f"  {ms:7.3f} ms  {calls[name]:5d}x  {name[:100]}")
    return {"busy_ms": round(busy, 3), "step_ms": round(1e3 * wall / steps, 3), "kernels_per_step": launches,
            "kernels_ms": [[name[:200], round(ms, 4), calls[name]] for name, ms in rows],
            "kernels_us_range": [[name[:200], round(min(each[name]), 1), round(max(each[name]), 1)]
                                 for name, _ in rows],
            "idle_ms": round(sum(idle.values()), 3),
            "idle_before_ms": [[name[:200], round(ms, 4), calls[name]] for name, ms in gaps]}


def idle_before(spans: list) -> dict:
    """The GPU's idle time before each kernel, from the latest end of the kernels started before it (an end past
    the next start, as under PDL, leaves no gap), summed by the name of the kernel after the gap; ``spans`` are
    (start, end, name) in any order, in the unit returned."""
    idle, reach = {}, None
    for begin, end, name in sorted(spans):
        if reach is not None:
            idle[name] = idle.get(name, 0.0) + max(0.0, begin - reach)
        reach = end if reach is None else max(reach, end)
    return idle


def step_timeline(step, device: torch.device, steps: int = 4, top: int = 8) -> dict:
    """Where a synced step's wall time goes (``steps`` of them, each alone: synced before and after): the host's
    time before the GPU's first kernel (``head``), the GPU's span from it to its last kernel's end (its busy time
    and the idle gaps inside), and the host's time after it to the sync's return (``tail``), in ms a step; and the
    ``top`` host calls (runtime calls and operators, by name) by their time in the head and in the tail, where the
    GPU idles. Back-to-back steps (:func:`gpu_profile`) hide both ends under the previous step's kernels."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sync(device)
            with record_function("synced step"):
                step()
                sync(device)
    events = prof.events()
    on_host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    result = split_steps_in_time(  # (the profiler mirrors the step's range on the GPU: not a kernel)
        marks=[(e.time_range.start, e.time_range.end) for e in on_host if e.name == "synced step"],
        kernels=[(e.time_range.start, e.time_range.end) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "synced step"],
        host=[(e.name, e.time_range.start, e.time_range.end) for e in on_host if e.name != "synced step"], top=top)
    print(f"  synced step {result['wall']:.2f} ms: host before the GPU {result['head']:.2f}, GPU span "
          f"{result['gpu_span']:.2f} (busy {result['busy']:.2f}, idle {result['idle_in_span']:.2f}), host after "
          f"{result['tail']:.2f}")
    for key in ("head_calls", "tail_calls"):
        print(f"  {key.split('_')[0]}: " + "; ".join(f"{name[:60]} {ms:.3f}" for name, ms in result[key]))
    return result


def split_steps_in_time(marks: list, kernels: list, host: list, top: int = 8) -> dict:
    """:func:`step_timeline`'s arithmetic, in ms a step from intervals in us: each step's (start, end) in ``marks``,
    the GPU's kernels' (start, end), the host calls' (name, start, end). A step without kernels counts for nothing
    (it has no head or tail); busy is the union of a step's kernel intervals (PDL may overlap them)."""
    kernels = sorted(kernels)
    parts = {"wall": 0.0, "head": 0.0, "gpu_span": 0.0, "busy": 0.0, "tail": 0.0}
    in_head: dict = {}
    in_tail: dict = {}
    launched = [(start, end, spans) for start, end in sorted(marks)
                if (spans := [(a, b) for a, b in kernels if start <= a < end])]
    for start, end, spans in launched:
        first, last = spans[0][0], max(b for _, b in spans)
        busy, reach = 0.0, first
        for a, b in spans:
            busy += max(0.0, b - max(a, reach))
            reach = max(reach, b)
        for key, value in (("wall", end - start), ("head", first - start), ("gpu_span", last - first),
                           ("busy", busy), ("tail", end - last)):
            parts[key] += value / 1e3 / len(launched)
        for name, a, b in host:
            for window, (lo, hi) in ((in_head, (start, first)), (in_tail, (last, end))):
                overlap = min(b, hi) - max(a, lo)
                if overlap > 0:
                    window[name] = window.get(name, 0.0) + overlap / 1e3 / len(launched)
    result = {key: round(value, 3) for key, value in parts.items()}
    result["idle_in_span"] = round(parts["gpu_span"] - parts["busy"], 3)
    for key, window in (("head_calls", in_head), ("tail_calls", in_tail)):
        result[key] = [[name[:120], round(ms, 3)] for name, ms in sorted(window.items(), key=lambda kv: -kv[1])[:top]]
    return result


def hits_since(cache, counted: tuple[int, int]) -> float:
    """The share of the selected rows an A2ATSCache's row caches found since they had ``counted`` (found, sought:
    ``cache.row_cache_counts()`` then)."""
    found, sought = (now - then for now, then in zip(cache.row_cache_counts(), counted))
    return found / max(sought, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Give back what a finished run held: GPU blocks and the pinned host blocks torch caches."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch._C._host_emptyCache()


def commit(tree: Path = Path(__file__).parent) -> str | None:
    """The short commit of ``tree`` (the benchmarks' own): A2ATS_COMMIT where the tree was copied without its
    history (a lent GPU), else git's, with "-dirty" where tracked files differ from it (the result is then of no
    commit exactly, as a copy whose history stops at an older commit); None where neither says."""
    if os.environ.get("A2ATS_COMMIT"):
        return os.environ["A2ATS_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=tree).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return (head + "-dirty" * bool(git("status", "--porcelain", "--untracked-files=no"))) if head else None
    except OSError:
        return None


def gpu_name() -> str | None:
    """The first CUDA device's name, None without one."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> dict:
    """What a result was measured with: the commit, library and CUDA versions, GPU, CPU, cores and memory (every
    results file carries it as its top-level ``environment``)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    memory = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
              if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names else None)
    return {"commit": commit(), "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "gpu": gpu_name(), "cpu": cpu,
            "cpu_cores": os.cpu_count(), "memory_gib": memory and round(memory, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine(gpu: str | None = None) -> str:
    """A results file's machine part: the GPU's name in lower-case words ("nvidia-h100-80gb-hbm3"), or "cpu"."""
    gpu = gpu or gpu_name()
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "cpu"


def results_path(benchmark: str, gpu: str | None = None) -> Path:
    """Where a new run of ``benchmark`` goes by default: bench/results/<benchmark>/<date>-<commit>-<machine>.json,
    one file per invocation (a second invocation on the same day and commit gets -2, -3, ...)."""
    folder = RESULTS / benchmark
    stem = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{commit() or 'unknown'}-{machine(gpu)}"
    path, n = folder / f"{stem}.json", 2
    while path.exists():
        path, n = folder / f"{stem}-{n}.json", n + 1
    folder.mkdir(parents=True, exist_ok=True)
    return path
