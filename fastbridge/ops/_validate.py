"""Input validation shared by every fastbridge op: errors name the argument and what was expected."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt_shape(shape) -> str:
    return str(tuple(int(s) for s in shape))


def fail(op: str, arg: str, expected: str, got: str) -> None:
    raise ValueError(f"fastbridge.ops.{op}: argument '{arg}' must be {expected}, got {got}")


def tensor(op: str, arg: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(op, arg, "a torch.Tensor", type(t).__name__)
    if t.dtype not in FLOAT_DTYPES:
        fail(op, arg, "a floating tensor (float16, bfloat16, float32 or float64)", f"dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        fail(op, arg, f"a {ndim}-d tensor", f"shape {_fmt_shape(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        fail(op, arg, f"a tensor with at least {min_ndim} dims", f"shape {_fmt_shape(t.shape)}")
    return t


def shape(op: str, arg: str, t: torch.Tensor, expected: Sequence[int | None], meaning: str) -> None:
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        fail(op, arg, f"of shape {meaning}", f"shape {_fmt_shape(t.shape)}")


def same_device_dtype(op: str, ref_arg: str, ref: torch.Tensor, named: dict, *, dtype: bool = True) -> None:
    for arg, t in named.items():
        if t is None:
            continue
        if t.device != ref.device:
            fail(op, arg, f"on {ref_arg}'s device {ref.device}", f"device {t.device}")
        if dtype and t.dtype != ref.dtype:
            fail(op, arg, f"of {ref_arg}'s dtype {ref.dtype} (cast it, e.g. {arg}.to({ref_arg}.dtype))",
                 f"dtype {t.dtype}")


def scalar_param(op: str, arg: str, t: torch.Tensor, allowed=((), (1,))) -> None:
    if tuple(t.shape) not in allowed:
        fail(op, arg, "of shape " + " or ".join(_fmt_shape(a) for a in allowed), f"shape {_fmt_shape(t.shape)}")


def choice(op: str, arg: str, value, options: Sequence) -> None:
    if value not in options:
        fail(op, arg, f"one of {tuple(options)}", repr(value))


def real_number(op: str, arg: str, value, expected: str, *, positive: bool = False) -> float:
    """A finite real number (int, float, NumPy scalar; not a bool), > 0 if ``positive``, as a Python float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)  # NumPy's bool_ is no numbers.Real
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > 0 or not positive)
    if not ok:
        fail(op, arg, expected, repr(value))
    return value


def attention_qkv(op: str, q, k, v) -> tuple[int, int, int, int, int, int]:
    """q (B, H, Lq, D) with D >= 1; k, v (B, Hkv, Lk, D), Hkv dividing H (GQA / MQA); same device and dtype.
    Returns (B, H, Lq, D, Hkv, Lk)."""
    tensor(op, "q", q, ndim=4)
    B, H, Lq, D = q.shape
    if D == 0:
        fail(op, "q", "of shape (B, H, Lq, D) with a head dim D >= 1", f"shape {_fmt_shape(q.shape)}")
    tensor(op, "k", k, ndim=4)
    Hkv, Lk = k.shape[1], k.shape[2]
    shape(op, "k", k, (B, None, None, D), f"(B, Hkv, Lk, D) = ({B}, Hkv, Lk, {D})")
    if Hkv == 0 or H % Hkv != 0:
        fail(op, "k", f"a head count Hkv dividing q's {H} heads (GQA/MQA)", f"Hkv = {Hkv}")
    tensor(op, "v", v)
    shape(op, "v", v, (B, Hkv, Lk, D), f"k's shape ({B}, {Hkv}, {Lk}, {D})")
    same_device_dtype(op, "q", q, {"k": k, "v": v})
    return B, H, Lq, D, Hkv, Lk


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim: itself; a view re-strided to 1 where that dim has size 1 or
    ``t`` has no element (the stride is never used, and .contiguous() keeps such odd strides); otherwise a
    contiguous copy."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.squeeze(-1).unsqueeze(-1)
    if t.numel() == 0:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1))
    return t.contiguous()


def as_rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) -> (N, d) with unit stride along d: a view where possible (rows may have any stride)."""
    return unit_last(t.reshape(-1, d))


def no_double_backward(op: str):
    """register_autograd's backward for an op's backward custom op: differentiating fastbridge's fused backward
    (torch.autograd.grad(..., create_graph=True) followed by another grad) raises in fastbridge's words."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"second-order gradients are not supported by fastbridge.ops.{op}; its fused backward is not "
            f"differentiable. Use fastbridge.use_backend('reference') (plain PyTorch autograd) for double "
            f"backward (gradient penalties, Hessian-vector products, MAML).")

    return backward
