"""Input validation shared by every fastbridge op: errors name the argument and what was expected."""
from __future__ import annotations

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


def as_rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) -> (N, d) with unit stride along d: a view where possible (rows may have any stride)."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()
