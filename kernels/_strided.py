"""How every kernel takes a tensor: one argument, a ``Strided`` -- its data pointer and the strides of its leading
dims -- and the @triton.jit helpers that address, load and store tiles of it.

A kernel signature names each tensor once (``Q, K, V, OUT``), a launch passes ``strided(q)`` for it, and no
stride ever travels as a loose positional integer: a launch that swaps two tensors swaps their strides with them,
and a kernel cannot pair a pointer with another tensor's strides. Triton (>= 3.3; this project needs >= 3.6)
passes NamedTuples of tensors and integers as kernel arguments, specialises their integers as it does loose ones
(equal to 1 → constant, multiples of 16 → divisibility hints) and flattens them in the launcher: the compiled
kernels see the same scalars as before.

Layouts. Attention tensors are (batch, head, row, feature) with a unit feature stride; ``strided(t)`` carries
(batch, head, row) strides (``unit_last(t)`` first: a copy only when the last stride is not 1);
``strided(t, broadcast_batch=True)`` gives batch stride 0 (a prompt shared by the batch is read, never copied);
``head_view(T, b, h)`` is one head's own Strided, its base taken once ahead of a loop. Row-major matrices
(the adapter's flattened N x d activations) carry one row stride: ``strided_rows(t)``, addressed with
``row_ptrs`` / ``load_rows`` / ``store_rows``, or -- a kernel that sweeps one row tile's features in several
loops -- ``row_base`` taken once ahead of the loops and ``load_cols`` / ``store_cols`` per chunk.

The helpers take int64 batch / head indices and int32 row / column offsets: ``T.ptr + b·s_b + h·s_h`` is a
scalar (int64) base and the per-element offsets stay 32-bit, as the hand-written expressions were.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Strided(NamedTuple):
    """A tensor argument of a kernel: the tensor (its data pointer) and the strides of its leading dims, the last
    dim unit-stride (attention: (batch, head, row); row-major matrices: (row,))."""
    ptr: torch.Tensor
    strides: tuple


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last stride is 1, else a contiguous copy: what a launcher passes to strided()."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_unit_last(t: torch.Tensor, arg: str) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"fastbridge kernels: {arg} needs a unit last stride, got strides {tuple(t.stride())} "
                         f"for shape {tuple(t.shape)} (the launchers make such inputs contiguous first)")


def strided(t: torch.Tensor, broadcast_batch: bool = False) -> Strided:
    """A (batch, head, row, feature) tensor as a kernel argument: (batch, head, row) strides; batch stride 0 with
    ``broadcast_batch`` (a (1, ...) tensor read by every sample)."""
    if t.dim() != 4:
        raise ValueError(f"fastbridge kernels: strided() takes a (batch, head, row, feature) tensor, got shape "
                         f"{tuple(t.shape)}")
    _check_unit_last(t, "strided()")
    return Strided(t, (0 if broadcast_batch else t.stride(0), t.stride(1), t.stride(2)))


def strided_rows(t: torch.Tensor) -> Strided:
    """A row-major (rows, features) matrix as a kernel argument: its row stride."""
    if t.dim() != 2:
        raise ValueError(f"fastbridge kernels: strided_rows() takes a (rows, features) matrix, got shape "
                         f"{tuple(t.shape)}")
    _check_unit_last(t, "strided_rows()")
    return Strided(t, (t.stride(0),))


@triton.jit
def head_ptr(T, b, h):
    """Scalar pointer to T[b, h, 0, 0] (b, h int64)."""
    return T.ptr + b * T.strides[0] + h * T.strides[1]


@triton.jit
def head_view(T, b, h):
    """T[b, h] as a Strided of its own: pointer at T[b, h, 0, 0], same strides; its tiles are
    load_tile(T_h, 0, 0, ...). For tile loads in a branch inside a loop (gated cross-attention's dq segment
    loop): the head's base is computed once, ahead of the loop, where load_tile(T, b, h, ...) would have LLVM
    rebuild it inside with 64-bit multiplies (sm_80 dq at D = 64: 128 registers instead of 107)."""
    return Strided(head_ptr(T, b, h), T.strides)


@triton.jit
def tile_ptrs(T, b, h, offs_r, offs_d, PACK: tl.constexpr = False):
    """Pointers to T[b, h, offs_r, offs_d] (a BLOCK_R x BLOCK_D tile). PACK (pack-GQA decode tiles): h is per row,
    a vector like offs_r, and the head offset joins the row offsets."""
    if PACK:
        ptrs = T.ptr + b * T.strides[0] + (h * T.strides[1] + offs_r * T.strides[2])[:, None] + offs_d[None, :]
    else:
        ptrs = head_ptr(T, b, h) + offs_r[:, None] * T.strides[2] + offs_d[None, :]
    return ptrs


@triton.jit
def _tile_mask(mask_r, mask_d, ROW_MASK: tl.constexpr):
    if ROW_MASK:
        mask = mask_r[:, None] & mask_d[None, :]
    else:
        mask = mask_d[None, :]
    return mask


@triton.jit
def load_tile(T, b, h, offs_r, mask_r, offs_d, mask_d, ROW_MASK: tl.constexpr = True, PACK: tl.constexpr = False):
    """T[b, h, offs_r, offs_d], 0 outside (mask_r, mask_d). ROW_MASK=False: every row is known to be in bounds
    (whole key blocks inside the range: only the feature columns are masked)."""
    return tl.load(tile_ptrs(T, b, h, offs_r, offs_d, PACK), mask=_tile_mask(mask_r, mask_d, ROW_MASK), other=0.0)


@triton.jit
def store_tile(T, b, h, offs_r, mask_r, offs_d, mask_d, x, PACK: tl.constexpr = False):
    """T[b, h, offs_r, offs_d] = x in T's element type, where (mask_r, mask_d)."""
    tl.store(tile_ptrs(T, b, h, offs_r, offs_d, PACK), x.to(T.ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def row_ptrs(T, offs_m, offs_d):
    """Pointers to T[offs_m, offs_d] of a row-major matrix (offs_m int64: row offsets can pass 2**31)."""
    return T.ptr + offs_m[:, None] * T.strides[0] + offs_d[None, :]


@triton.jit
def load_rows(T, offs_m, mask_m, offs_d, mask_d):
    """T[offs_m, offs_d], 0 outside (mask_m, mask_d)."""
    return tl.load(row_ptrs(T, offs_m, offs_d), mask=mask_m[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def store_rows(T, offs_m, mask_m, offs_d, mask_d, x):
    """T[offs_m, offs_d] = x in T's element type, where (mask_m, mask_d)."""
    tl.store(row_ptrs(T, offs_m, offs_d), x.to(T.ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def row_base(T, offs_m):
    """Pointers to T[offs_m, 0] of a row-major matrix, a BLOCK_M x 1 column (offs_m int64): row_ptrs without the
    columns. A kernel that sweeps one row tile's features in several loops takes it once, ahead of them, and
    addresses each chunk with load_cols / store_cols. (Left inside the loops, Triton's loop-invariant code motion
    computes it just before each loop instead; ptxas then allocates registers differently: for the adapter's row
    kernels up to 20 more on sm_90, and a spill.)"""
    return T.ptr + offs_m[:, None] * T.strides[0]


@triton.jit
def load_cols(base, mask_m, offs_d, mask_d):
    """The columns offs_d of a row_base tile, 0 outside (mask_m, mask_d)."""
    return tl.load(base + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def store_cols(base, mask_m, offs_d, mask_d, x):
    """The columns offs_d of a row_base tile = x in its element type, where (mask_m, mask_d)."""
    tl.store(base + offs_d[None, :], x.to(base.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
