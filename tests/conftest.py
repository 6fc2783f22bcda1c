"""Shared fixtures: a tiny random Llama with quick codebooks, and the real SmolLM2 with Austen text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM

import a2ats_hf  # noqa: F401  (registers "a2ats")
from a2ats_hf import cache_argument, calibrate

# The integration tests run on this device; the GPU check sets A2ATS_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("A2ATS_TEST_DEVICE", "cpu"))


class CharTokenizer:
    """Enough of a tokenizer for `calibrate`: one id per character."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [2 + ord(c) % 250 for c in text]}


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids [batch, length] on the test device."""
    return torch.randint(2, 256, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def generate(model, ids: torch.Tensor, cache, new: int = 6) -> torch.Tensor:
    """Greedy tokens of ``new`` steps after ``ids`` with ``cache``."""
    return model.generate(ids, **cache_argument(model, cache), max_new_tokens=new, do_sample=False, pad_token_id=0)


COMPILE = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernel, constants, pointers = eval(sys.argv[1])
fn = getattr(__import__(f"a2ats_hf.kernels.{module}", fromlist=[kernel]), kernel)
if "PDL" in fn.arg_names:
    constants.setdefault("PDL", True)
signature = {name: "constexpr" if name in constants else pointers.get(name, "*i32") if name.endswith("_ptr") else "i32"
             for name in fn.arg_names}
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
assert ".entry" in compiled.asm["ptx"]
ordered = re.findall(r"(?:atom|red)\\.[\\w.]*(?:acq_rel|acquire|release)[\\w.]*", compiled.asm["ptx"])
assert not ordered, f"ordered atomics (Triton's default; pass sem='relaxed'): {sorted(set(ordered))}"
assert not constants.get("PDL") or "griddepcontrol.wait" in compiled.asm["ptx"], "PDL without its wait"
"""


def compile_for_hopper(module: str, kernel: str, constants: dict, pointers: dict) -> None:
    """Compile Triton kernel ``kernel`` of ``a2ats_hf.kernels.<module>`` to PTX for an H100/H200 (sm_90), without a
    GPU: what the interpreter lets pass and the compiler does not (a loop-carried value changing type, a constexpr
    where a tensor is needed), and whether its atomics are relaxed (Triton's default, acq_rel, orders each atomic
    behind the one before: the split select's digit counts took ~16 us a launch so); a kernel taking ``PDL`` is
    compiled with it on (unless ``constants`` say otherwise) and waits first. ``pointers`` types the
    ``*_ptr`` arguments (default int32), other arguments are int32. In a process of its own: the interpreter's
    patches of Triton's language, once this one has run a kernel, break compiling."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, repr((module, kernel, constants, pointers))], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]


def record_selects(monkeypatch) -> list[tuple]:
    """Every far-token selection the decode steps make from now on, as ``step._select``'s arguments (layer,
    query, position ids, masks, scaling) and its result (indices, counts), in the steps' order."""
    from a2ats_hf import step

    seen, original = [], step._select
    monkeypatch.setattr(step, "_select", lambda *args: seen.append((*args, original(*args))) or seen[-1][-1])
    return seen


def tiny_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
    )
    return LlamaConfig(**{**values, **overrides})


def tiny_model(attn: str = "a2ats", **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval().to(DEVICE)
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="session")
def tiny():
    """(model, codebooks) for a tiny random Llama; the codebooks use 32 centroids (its char-level keys form few
    distinct clusters: more centroids would duplicate some, and ties between them break by rounding)."""
    model = tiny_model()
    text = " ".join(f"token{i % 97} word{i % 13}" for i in range(2000))
    books = calibrate(model, CharTokenizer(), [text], n_centroids=32, max_tokens=4000, chunk_size=1024,
                      uuid_tokens=1000, kmeans_iters=15, window=16, sink=4, progress=False)
    return model, books


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on the CPU, "a2ats" attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from a2ats_eval.assets import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="a2ats").eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def austen():
    from a2ats_eval.assets import austen_novels

    return austen_novels()
