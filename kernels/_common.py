"""Helpers shared by the Triton launchers (no nn / autograd here)."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import torch
import triton
from triton.runtime.errors import OutOfResources


def poison_enabled() -> bool:
    """FASTBRIDGE_POISON=1 fills every kernel output with NaN before the kernel writes it (tests)."""
    return os.environ.get("FASTBRIDGE_POISON", "0") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled() and t.numel():
        t.fill_(float("nan"))
    return t


def device_guard(device: torch.device):
    """The context a kernel launch on ``device`` runs under: Triton launches on the *current* CUDA device and
    its current stream, so tensors on another GPU (cuda:1 with device 0 current: HF device_map="auto",
    pipeline splits) need it made current, as the C++ extension's device guard does. Nothing on CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# fp32 under "highest": 3xTF32 dots, unless a launcher's configuration does not fit them (below).
_FP32_IEEE: contextvars.ContextVar[bool] = contextvars.ContextVar("fastbridge_fp32_ieee", default=False)
_TF32X3_UNFIT: set = set()


def launcher(fn):
    """Decorator for a launcher (tensors in, kernels launched, tensors out; inputs never written):
    - runs it under device_guard of its first tensor argument's device, so every kernel it launches (and the
      current stream Triton takes) belongs to the tensors' GPU;
    - fp32 with 3xTF32 dots (dot_precision under torch's "highest") splits each dot operand into two TF32
      tiles, so a configuration chosen for fp32 can need more shared memory / registers than the GPU has.
      When a launch raises Triton's OutOfResources for that reason, the launcher runs again with fp32 FMA
      dots ("ieee": the same accuracy class, slower), for this (launcher, device, dtype, head / feature dim)
      from then on, said once with a FastbridgeFallbackWarning. Any other OutOfResources propagates."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        key = (fn.__qualname__, str(first.device), first.dtype, first.shape[-1])
        with device_guard(first.device):  # looked up at each call (tests/test_gated_attention.py replaces it)
            if key not in _TF32X3_UNFIT:
                try:
                    return fn(*args, **kwargs)
                except OutOfResources as e:
                    if dot_precision(first.dtype) != "tf32x3":
                        raise
                    from fastbridge._backend import FastbridgeFallbackWarning

                    _TF32X3_UNFIT.add(key)
                    warnings.warn(f"fastbridge: {fn.__name__} with 3xTF32 fp32 dots ({e}); running it with fp32 "
                                  f"FMA dots instead for fp32 inputs of last dim {first.shape[-1]} on "
                                  f"{first.device} (same accuracy class, only speed differs). Shown once.",
                                  FastbridgeFallbackWarning, stacklevel=2)
            token = _FP32_IEEE.set(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _FP32_IEEE.reset(token)

    return run


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return num_sms(_cuda_index(device))
    return 4  # interpreter: a few programs are enough to exercise the split reduction


# Launch configurations are chosen per GPU architecture, as 10 * major + minor of the compute capability
# (80 A100, 86 RTX 30xx / A6000, 89 RTX 40xx / L4 / L40, 90 H100). The configuration functions take it
# (default H100_ARCH); every configuration they can pick for an arch in SMEM_PER_BLOCK compiles without
# spills and within its shared memory (python -m fastbridge.sm90_check --arch all).
H100_ARCH = 90
# Shared memory one block may opt in to, bytes (CUDA C++ Programming Guide, technical specifications).
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Up to this much shared memory per block, 4-byte (fp32) inputs get their own, smaller-footprint configurations
# (sm_86 / sm_89: 99 KB; their 2-byte configurations need up to ~96 KB, twice that in fp32).
SMALL_SMEM = 128 * 1024


@functools.lru_cache(maxsize=None)
def _capability_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def pre_hopper(arch: int) -> bool:
    """True for sm_80 .. sm_89 (the floor is fastbridge._backend's): Triton's dots there are mma.sync, whose
    operand tiles are held in registers (Hopper's wgmma reads them from shared memory), so several H100
    tiles spill and get their own configuration. Every arch >= 90 gets the H100 configurations."""
    return arch < H100_ARCH


def smem_per_block(arch: int) -> int:
    """SMEM_PER_BLOCK[arch]; for an arch not in it, the smallest known one of its kind (before / from Hopper)."""
    if arch in SMEM_PER_BLOCK:
        return SMEM_PER_BLOCK[arch]
    return min(v for a, v in SMEM_PER_BLOCK.items() if pre_hopper(a) == pre_hopper(arch))


def small_smem(arch: int, elem_size: int) -> bool:
    """True for inputs of more than 2 bytes (fp32) on an arch with at most SMALL_SMEM shared memory per block:
    the configuration functions then pick fewer pipeline stages / smaller tiles."""
    return elem_size > 2 and smem_per_block(arch) <= SMALL_SMEM


def device_arch(device: torch.device) -> int:
    """The arch the launchers pick configurations for: the CUDA device's compute capability (cached per
    device); H100_ARCH on CPU, so interpreter runs (TRITON_INTERPRET=1) exercise the H100 configurations."""
    if device.type == "cuda":
        return _capability_arch(_cuda_index(device))
    return H100_ARCH


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch would run an fp32 CUDA matmul in TF32 now: torch.backends.cuda.matmul.fp32_precision
    ("tf32" / "ieee"; it inherits torch.backends.fp32_precision), or where that is "none" the legacy
    torch.get_float32_matmul_precision() ("high" / "medium": TF32; "highest", the default: not)."""
    new_api = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if new_api in ("tf32", "ieee"):
        return new_api == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of the kernels' tl.dot: fp16 / bf16 inputs "ieee" (tensor cores, fp32 accumulation).
    fp32 inputs follow torch's matmul precision: "tf32" where torch would use TF32 ("high"), otherwise
    (the default "highest") "tf32x3" -- three TF32 products per dot with a split of each operand into a
    TF32 head and tail, fp32-level accuracy (relative error ~1e-6 against float64, like ieee FMA) on tensor
    cores, where "ieee" would run the dots as FMA on the CUDA cores ("ieee" inside a launcher whose
    configuration does not fit 3xTF32: see ``launcher``). The Triton interpreter computes every precision
    as an fp32 numpy matmul: the TF32 rounding is only visible on a GPU."""
    if dtype != torch.float32:
        return "ieee"
    if fp32_matmul_allows_tf32():
        return "tf32"
    return "ieee" if _FP32_IEEE.get() else "tf32x3"


def pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))
