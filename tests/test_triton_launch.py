"""Programmatic dependent launch: off where it cannot apply, and every kernel taking it compiles with its wait."""

import pytest
import torch

from a2ats_hf.kernels import triton_launch

from conftest import compile_for_hopper


def test_off_without_a_hopper_gpu(monkeypatch):
    """The CPU (and the interpreter, which runs a kernel's programs in turn) launches plainly, PDL on or off."""
    monkeypatch.setattr(triton_launch, "PDL", True)
    assert triton_launch.pdl(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_launch.pdl(torch.device("cuda", 0)) == {"PDL": False}
    monkeypatch.setattr(triton_launch, "PDL", False)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_launch.pdl(torch.device("cuda", 0)) == {"PDL": False}


@pytest.mark.parametrize("module,kernel,constants,pointers", [
    ("triton_codes", "_lut_kernel",
     {"HKV": 8, "G": 1, "D": 128, "D_PAD": 128, "ROT": 128, "BLOCK_R": 16, "BLOCK_M": 64, "PRECISION": "tf32x3",
      "MOVE": False, "S_PAD": 2, "N_ON_DEVICE": False, "SUMMED": 1},
     {"q_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "c_ptr": "*fp32", "out_ptr": "*fp32"}),
    ("triton_attention", "_attention_lse_kernel",
     {"HKV": 8, "G": 4, "G_PAD": 16, "D": 128, "D_PAD": 128, "BLOCK_L": 32, "FAR": True},
     {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "valid_ptr": "*i1", "fk_ptr": "*bf16",
      "fv_ptr": "*bf16", "out_ptr": "*fp32", "lse_ptr": "*fp32"}),
], ids=["lut", "attention"])
def test_kernels_compile_with_pdl(module, kernel, constants, pointers):
    """The kernels outside the top-K's module that take PDL compile with it for sm_90 (the top-K's own compile
    tests take it on too)."""
    compile_for_hopper(module, kernel, constants, pointers)
