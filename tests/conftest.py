"""Shared test configuration: devices, dtypes and the one table of tolerances.

Kernels are compared with the float64 reference evaluated on the *same* (already rounded) inputs,
so the error measured is the kernel's own. Pass when max|actual - expected| <= TOL·max|expected| +
ATOL (ATOL only matters for quantities that are exactly 0 in exact arithmetic, e.g. d prefix_k with
a single prompt token, where only accumulation noise over the summed rows remains; test inputs
are O(1)).
"""
from __future__ import annotations

import os

import pytest
import torch

# Every kernel output is filled with NaN before the kernel writes it: an element a kernel forgets
# to write fails the comparison instead of passing on stale memory.
os.environ.setdefault("FASTBRIDGE_POISON", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

# Relative (to max |expected|) tolerances, by dtype: fp32 accumulation everywhere; half types pay for
# rounding the inputs of each matmul (h, act(z), dz) to the input dtype, as eager PyTorch does too.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "non-finite values (poisoned output never written?)"
    scale = e.abs().max().item() if e.numel() else 0.0
    return (a - e).abs().max().item() / max(scale, 1e-12) if e.numel() else 0.0


def assert_close(actual, expected, dtype, what: str) -> None:
    err = rel_err(actual, expected)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    ok = err * max(scale, 1e-12) <= TOL[dtype] * scale + ATOL[dtype]
    assert ok, (f"{what}: relative error {err:.3e} (max |expected| {scale:.2e}) > tolerance {TOL[dtype]:.0e} "
                f"+ {ATOL[dtype]:.0e} absolute, for {dtype}")


def kernel_devices() -> list:
    """Devices where the Triton kernels run: CPU under the interpreter, CUDA when present."""
    devs = []
    if INTERPRET:
        devs.append("cpu")
    if HAS_CUDA and not INTERPRET:
        devs.append("cuda")
    return devs


def kernel_dtypes(device: str) -> list:
    # The Triton 3.9 interpreter computes bf16 tl.dot wrongly: bf16 is tested on CUDA only.
    return [torch.float32, torch.float16] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def kernel_cases():
    """(device, dtype) pairs for kernel tests; empty -> the tests are skipped with a reason."""
    return [pytest.param(dev, dt, id=f"{dev}-{str(dt).split('.')[-1]}") for dev in kernel_devices()
            for dt in kernel_dtypes(dev)]


needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="runs the Triton kernels on CPU: needs TRITON_INTERPRET=1 (set before Python starts)")

needs_kernels = pytest.mark.skipif(
    not kernel_devices(), reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (set before Python starts)")
