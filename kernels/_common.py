"""Helpers shared by the Triton launchers (no nn / autograd here)."""
from __future__ import annotations

import functools
import os

import torch
import triton


def poison_enabled() -> bool:
    """FASTBRIDGE_POISON=1 fills every kernel output with NaN before the kernel writes it (tests)."""
    return os.environ.get("FASTBRIDGE_POISON", "0") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled() and t.numel():
        t.fill_(float("nan"))
    return t


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few programs are enough to exercise the split reduction


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul precision setting (TF32 only where torch would use it)."""
    if dtype != torch.float32:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))
