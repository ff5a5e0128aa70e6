"""Fused bottleneck adapter residual block: y = res + s * up(act(down(LN?(x)))).

Triton kernels and their launchers only (tensors in, tensors out; no autograd here -- see
fastbridge/ops/adapter_block.py). Rows are the flattened leading dims, N x d; r is the bottleneck.

Forward, one kernel, one program per tile of BLOCK_M rows, passes over d in BLOCK_D chunks:
  A (LN only) row mean / variance, chunk statistics merged with Chan's formula (one read of x);
  B z = LN(x) @ W_downᵀ + b_down, fp32 accumulation (tensor cores for fp16/bf16);
  C y = res + s * (act(z) @ W_upᵀ + b_up).
Saved for backward: z (N x r, x's dtype) and mean / rstd (N, fp32) -- O(N·r), never O(N·d).

Backward, two kernels:
  rows    per row tile: g = dy @ W_up, a = act(z) (stored, N x r, for the weights kernel), dz = s·g·act'(z),
          Σ_j a·g (for ds); then dh = dz @ W_down recomputed per chunk, LayerNorm backward, dx (+ dy when the
          residual is x).
  weights per (d tile, N split): dW_up = s·dyᵀa (a read, not recomputed per d tile), dW_down = dzᵀh (h
          recomputed from x), db_up, dγ, dβ, db_down, into fp32 partial buffers summed once (deterministic,
          no atomics).
ds = Σ dy·u = Σ_n a·g + colsum(dy)·b_up, so u is never materialised (and stays right when s = 0,
e.g. a zero-initialised tanh gate).

Addressing: x, residual, y, dy, dx are Strided row-major matrices (kernels/_strided.py: ``strided_rows``). The
row-tile kernels take each tile's row_base once, ahead of their loops over d chunks, and load / store the chunks
with load_cols / store_cols; the weights kernel, whose rows change per chunk, uses load_rows. The weights and the
(N, r) buffers the launchers allocate (z, act(z), dz) are plain contiguous pointers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launcher
from ._strided import load_cols, load_rows, row_base, store_cols, strided_rows
from ._common import (H100_ARCH, device_arch, dot_precision, empty, pow2_at_least, pre_hopper, sm_count,
                      small_smem)

ACT_IDS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 1:  # gelu (tanh approximation)
        return 0.5 * z * (1.0 + _tanh((z + 0.044715 * z * z * z) * _SQRT_2_OVER_PI))
    elif ACT == 2:  # relu
        return tl.maximum(z, 0.0)
    else:  # silu
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == 1:
        t = _tanh((z + 0.044715 * z * z * z) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (1.0 + 0.134145 * z * z) * _SQRT_2_OVER_PI
    elif ACT == 2:
        return tl.where(z > 0.0, 1.0, 0.0)
    else:
        sg = tl.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))


@triton.jit
def _scale_value(scale, S, HAS_S: tl.constexpr):
    s = scale
    if HAS_S:
        s = s * tl.load(S).to(tl.float32)
    return s


@triton.jit
def _layer_norm_chunk(x, mean, rstd, LNW, LNB, offs_d, mask_d, HAS_LNB: tl.constexpr):
    """h = (x - mean) * rstd * w + b for one (BLOCK_M, BLOCK_D) chunk; also returns x̂ and w."""
    xhat = (x - mean[:, None]) * rstd[:, None]
    w = tl.load(LNW + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    h = xhat * w[None, :]
    if HAS_LNB:
        h += tl.load(LNB + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    return h, xhat, w


@triton.jit
def _r_ptrs(T, offs_m64, offs_r, R):
    """Pointers to T[offs_m64, offs_r] of a contiguous (N, r) buffer: z, act(z), dz, which the launchers allocate.
    Plain pointers addressed by R rather than Strided: z, act(z) and dz share one row offset (with a stride each,
    the rows kernel at r = 128, d = 4096 took 20 more registers on sm_90)."""
    return T + offs_m64[:, None] * R + offs_r[None, :]


@triton.jit
def _row_tile(N, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's row offsets (int64, for addressing) and masks, and the bottleneck offsets."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    return offs_m, offs_m.to(tl.int64), offs_m < N, offs_r, offs_r < R


@triton.jit
def _adapter_fwd_kernel(
    X, RES, Y, WD, BD, WU, BU, LNW, LNB, Z, MEAN, RSTD, S,
    scale, eps, N, D, R,
    ACT: tl.constexpr, HAS_LN: tl.constexpr, HAS_LNB: tl.constexpr, HAS_BD: tl.constexpr,
    HAS_BU: tl.constexpr, HAS_RES: tl.constexpr, HAS_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):
    offs_m, offs_m64, mask_m, offs_r, mask_r = _row_tile(N, R, BLOCK_M, BLOCK_R)
    rows_x = row_base(X, offs_m64)
    dtype = X.ptr.dtype.element_ty

    # Pass A: LayerNorm statistics (Chan's parallel merge of per-chunk mean / M2).
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LN:
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            x = load_cols(rows_x, mask_m, offs_d, mask_d).to(tl.float32)
            cnt = tl.minimum(D - d0, BLOCK_D) * 1.0
            c_mean = tl.sum(x, axis=1) / cnt
            c_dev = tl.where(mask_d[None, :], x - c_mean[:, None], 0.0)
            c_m2 = tl.sum(c_dev * c_dev, axis=1)
            n_old = d0 * 1.0
            n_new = n_old + cnt
            delta = c_mean - mean
            mean += delta * (cnt / n_new)
            m2 += c_m2 + delta * delta * (n_old * cnt / n_new)
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(MEAN + offs_m, mean, mask=mask_m)
        tl.store(RSTD + offs_m, rstd, mask=mask_m)

    # Pass B: z = h @ W_downᵀ (+ b_down).   W_down is (R, D) row-major.
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = load_cols(rows_x, mask_m, offs_d, mask_d)
        if HAS_LN:
            h, _xhat, _w = _layer_norm_chunk(x.to(tl.float32), mean, rstd, LNW, LNB, offs_d, mask_d, HAS_LNB)
            h = h.to(dtype)
        else:
            h = x
        wd_t = tl.load(WD + offs_r[None, :] * D + offs_d[:, None], mask=mask_d[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(h, wd_t, acc, input_precision=DOT_PREC)
    if HAS_BD:
        acc += tl.load(BD + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    zmask = mask_m[:, None] & mask_r[None, :]
    tl.store(_r_ptrs(Z, offs_m64, offs_r, R), acc.to(Z.dtype.element_ty), mask=zmask)
    a = tl.where(mask_r[None, :], _act(acc, ACT), 0.0).to(dtype)

    # Pass C: y = res + s * (a @ W_upᵀ + b_up).   W_up is (D, R) row-major.
    s = _scale_value(scale, S, HAS_S)
    rows_y = row_base(Y, offs_m64)
    rows_res = row_base(RES, offs_m64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        wu_t = tl.load(WU + offs_d[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        u = tl.dot(a, wu_t, input_precision=DOT_PREC)
        if HAS_BU:
            u += tl.load(BU + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            res = load_cols(rows_res, mask_m, offs_d, mask_d)
        else:
            res = load_cols(rows_x, mask_m, offs_d, mask_d)
        y = res.to(tl.float32) + s * u
        store_cols(rows_y, mask_m, offs_d, mask_d, y)


@triton.jit
def _adapter_bwd_rows_kernel(
    DY, X, DX, WD, WU, LNW, Z, MEAN, RSTD, S, DZ, A, AG,
    scale, N, D, R,
    ACT: tl.constexpr, HAS_LN: tl.constexpr, HAS_RES: tl.constexpr, HAS_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):
    offs_m, offs_m64, mask_m, offs_r, mask_r = _row_tile(N, R, BLOCK_M, BLOCK_R)
    rows_dy = row_base(DY, offs_m64)
    rows_x = row_base(X, offs_m64)
    rows_dx = row_base(DX, offs_m64)
    dtype = X.ptr.dtype.element_ty

    # g = dy @ W_up   (W_up is (D, R)).
    g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        dy = load_cols(rows_dy, mask_m, offs_d, mask_d)
        wu = tl.load(WU + offs_d[:, None] * R + offs_r[None, :], mask=mask_d[:, None] & mask_r[None, :], other=0.0)
        g = tl.dot(dy.to(dtype), wu, g, input_precision=DOT_PREC)

    zmask = mask_m[:, None] & mask_r[None, :]
    z = tl.load(_r_ptrs(Z, offs_m64, offs_r, R), mask=zmask, other=0.0).to(tl.float32)
    a = tl.where(zmask, _act(z, ACT), 0.0)
    tl.store(AG + offs_m, tl.sum(a * g, axis=1), mask=mask_m)
    # act(z) for the weights kernel, in the dtype its dot takes (one N x r write instead of an erf / exp per
    # element in each of its D / BLOCK_D programs)
    tl.store(_r_ptrs(A, offs_m64, offs_r, R), a.to(A.dtype.element_ty), mask=zmask)
    s = _scale_value(scale, S, HAS_S)
    dz = tl.where(zmask, s * g * _act_grad(z, ACT), 0.0)
    tl.store(_r_ptrs(DZ, offs_m64, offs_r, R), dz.to(DZ.dtype.element_ty), mask=zmask)
    dz = dz.to(dtype)

    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LN:
        mean = tl.load(MEAN + offs_m, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + offs_m, mask=mask_m, other=0.0)
        # Row sums of dx̂ and dx̂·x̂ for the LayerNorm backward.
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            wd = tl.load(WD + offs_r[:, None] * D + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            dh = tl.dot(dz, wd, input_precision=DOT_PREC)
            x = load_cols(rows_x, mask_m, offs_d, mask_d).to(tl.float32)
            xhat = (x - mean[:, None]) * rstd[:, None]
            w = tl.load(LNW + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dxhat = dh * w[None, :]
            c1 += tl.sum(dxhat, axis=1)
            c2 += tl.sum(tl.where(mask_d[None, :], dxhat * xhat, 0.0), axis=1)
        c1 = c1 / D
        c2 = c2 / D

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        wd = tl.load(WD + offs_r[:, None] * D + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        dx = tl.dot(dz, wd, input_precision=DOT_PREC)
        if HAS_LN:
            x = load_cols(rows_x, mask_m, offs_d, mask_d).to(tl.float32)
            xhat = (x - mean[:, None]) * rstd[:, None]
            w = tl.load(LNW + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dx = (dx * w[None, :] - (c1[:, None] + xhat * c2[:, None])) * rstd[:, None]
        if not HAS_RES:  # the residual is x itself
            dx += load_cols(rows_dy, mask_m, offs_d, mask_d).to(tl.float32)
        store_cols(rows_dx, mask_m, offs_d, mask_d, dx)


@triton.jit
def _adapter_bwd_weights_kernel(
    DY, X, A, DZ, WD, LNW, LNB, MEAN, RSTD,
    DWU, DWD, DBU, DBD, DLNW, DLNB,
    N, D, R, rows_per_split,
    HAS_LN: tl.constexpr, HAS_LNB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)  # r is tiled by BLOCK_R (<= 128); LN grads are linear in dh, so slices add
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    dtype = X.ptr.dtype.element_ty
    part = pid_s * tl.num_programs(2) + pid_r  # row of the (splits * r-slices, D) LN partial buffers

    acc_wu = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)  # dW_up tile / s  (D, R)
    acc_wd = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # dW_down tile   (R, D)
    acc_bu = tl.zeros([BLOCK_D], dtype=tl.float32)            # colsum(dy)
    acc_bd = tl.zeros([BLOCK_R], dtype=tl.float32)            # colsum(dz)
    acc_lw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_lb = tl.zeros([BLOCK_D], dtype=tl.float32)
    lnw = tl.zeros([BLOCK_D], dtype=tl.float32)
    lnb = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_LN:
        lnw = tl.load(LNW + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_LNB:
            lnb = tl.load(LNB + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    n_lo = pid_s * rows_per_split
    n_hi = tl.minimum(n_lo + rows_per_split, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        offs_n64 = offs_n.to(tl.int64)
        mask = mask_n[:, None] & mask_d[None, :]
        zmask = mask_n[:, None] & mask_r[None, :]
        dy = load_rows(DY, offs_n64, mask_n, offs_d, mask_d)
        a = tl.load(_r_ptrs(A, offs_n64, offs_r, R), mask=zmask, other=0.0)  # act(z), rows kernel
        dz = tl.load(_r_ptrs(DZ, offs_n64, offs_r, R), mask=zmask, other=0.0)
        x = load_rows(X, offs_n64, mask_n, offs_d, mask_d)
        dy = dy.to(dtype)
        acc_wu = tl.dot(tl.trans(dy), a, acc_wu, input_precision=DOT_PREC)
        if pid_r == 0:
            acc_bu += tl.sum(dy.to(tl.float32), axis=0)
        if HAS_LN:
            mean = tl.load(MEAN + offs_n, mask=mask_n, other=0.0)
            rstd = tl.load(RSTD + offs_n, mask=mask_n, other=0.0)
            xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            h = tl.where(mask, xhat * lnw[None, :] + lnb[None, :], 0.0).to(dtype)
            # W_down tile re-read per chunk (L2-resident) rather than held: keeps r = 256 spill-free.
            wd = tl.load(WD + offs_r[:, None] * D + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            dh = tl.dot(dz, wd, input_precision=DOT_PREC)
            acc_lw += tl.sum(dh * xhat, axis=0)
            acc_lb += tl.sum(dh, axis=0)
        else:
            h = x
        acc_wd = tl.dot(tl.trans(dz), h, acc_wd, input_precision=DOT_PREC)
        if pid_d == 0:
            acc_bd += tl.sum(dz.to(tl.float32), axis=0)

    base_dr = pid_s.to(tl.int64) * D * R
    tl.store(DWU + base_dr + offs_d[:, None] * R + offs_r[None, :], acc_wu, mask=mask_d[:, None] & mask_r[None, :])
    tl.store(DWD + base_dr + offs_r[:, None] * D + offs_d[None, :], acc_wd, mask=mask_r[:, None] & mask_d[None, :])
    if pid_r == 0:
        tl.store(DBU + pid_s * D + offs_d, acc_bu, mask=mask_d)
    if HAS_LN:
        tl.store(DLNW + part * D + offs_d, acc_lw, mask=mask_d)
        tl.store(DLNB + part * D + offs_d, acc_lb, mask=mask_d)
    if pid_d == 0:
        tl.store(DBD + pid_s * R + offs_r, acc_bd, mask=mask_r)


# --------------------------------------------------------------------------------------------------
# Launch configuration, per GPU arch (10 * major + minor; kernels/_common.device_arch). Registers per thread
# scale with BLOCK_M·BLOCK_R (accumulators) and BLOCK_M·BLOCK_D (chunk tiles). Every configuration below
# compiles without spills and within the arch's shared memory for sm_80, sm_86, sm_89 and sm_90
# (python -m fastbridge.sm90_check --arch all; enforced by tests/test_sm90_compile.py). Not yet tuned on a GPU.
# --------------------------------------------------------------------------------------------------
def _row_config(block_r: int, d: int, arch: int = H100_ARCH, elem_size: int = 2, n_rows: int | None = None,
                sms: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for the row-tile kernels (forward, backward rows); elem_size: bytes per x
    element. With n_rows and sms: the row tile from N and the SM count (row_tile)."""
    block_m, block_d, warps = _row_config_base(block_r, d, arch, elem_size)
    if n_rows is not None and sms is not None:
        block_m = row_tile(block_m, n_rows, sms)
    return block_m, block_d, warps


# Row tiles: a 64-row tile launches N / 64 programs -- at N = 4096 that is 64 on the H100's 132 SMs, half of them
# idle in a memory-bound kernel. Halve the tile (once: 32 rows) when the 64-row grid covers under this fraction
# of the SMs and the 32-row one does better (benchmarks/notes/adapter_block.md, "Row tiles from N").
ROW_FILL = 0.9


def row_tile(block_m: int, n_rows: int, sms: int) -> int:
    """The row tile for N = n_rows rows on a GPU of ``sms`` SMs: ``block_m`` (the configuration's), or 32 where a
    64-row grid would fill under ROW_FILL of the SMs (the 32-row kernels compile without spills on every arch:
    sm90_check launches N = 2048)."""
    if block_m == 64 and triton.cdiv(n_rows, 64) < ROW_FILL * sms:
        return 32
    return block_m


def _row_config_base(block_r: int, d: int, arch: int, elem_size: int) -> tuple[int, int, int]:
    if block_r <= 64:
        # fp32 on 99 KB GPUs (sm_86 / sm_89): 64-column chunks (128 take 97 KB of the 99 at 2 stages, and the
        # backward spills more).
        return 64, min(64 if small_smem(arch, elem_size) else 128, pow2_at_least(d)), 8
    if block_r <= 128:
        return 64, min(64, pow2_at_least(d)), 8
    # 32-column chunks before Hopper: with 64, Triton 3.6's ptxas holds the LayerNorm backward at 128 registers
    # and spills (and fp32 needs more shared memory than sm_86 / sm_89 have).
    return 16, min(32 if pre_hopper(arch) else 64, pow2_at_least(d)), 8


def _num_stages(arch: int = H100_ARCH, elem_size: int = 2) -> int:
    """num_stages of all three adapter kernels: Triton's default 3; 2 for fp32 on 99 KB GPUs (sm_86 / sm_89),
    where 3 stages of 4-byte chunks need more shared memory than a block may have."""
    return 2 if small_smem(arch, elem_size) else 3


def _weights_config(block_r: int, has_ln: bool, arch: int = H100_ARCH) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_D, BLOCK_R tile, num_warps) for the weight-gradient kernel, for every element size (fp32
    on 99 KB GPUs: the same tiles, with 2 stages, _num_stages)."""
    if pre_hopper(arch):
        # mma.sync: r is tiled by 64 (32 with LayerNorm, whose extra dz·W_down dot and h / x̂ tiles also take
        # 16-row chunks); the H100 tiles spill for r > 64, and for r = 64 with LayerNorm.
        if has_ln:
            return 16, 64, min(block_r, 32), 8
        if block_r > 64:
            return (64, 32, 64, 8) if block_r <= 128 else (32, 32, 64, 8)
    if block_r <= 64:
        return 64, 64, block_r, 8
    if not has_ln:
        return (64, 32, block_r, 8) if block_r <= 128 else (32, 32, block_r, 8)
    return 64, 32, 128, 8


def weights_grid(N: int, D: int, R: int, has_ln: bool, sms: int, arch: int = H100_ARCH):
    """The weight-gradient kernel's launch (also benchmarks/floors.py's traffic model): its configuration
    (BLOCK_N, BLOCK_D, r tile, num_warps), grid (d tiles, N splits, r tiles) and rows per N split. N splits:
    about 2 programs per SM, each a whole number of BLOCK_N chunks."""
    block_n, block_d, r_tile, warps = _weights_config(pow2_at_least(R), has_ln, arch)
    n_rtiles = triton.cdiv(R, r_tile)
    n_dtiles = triton.cdiv(D, block_d)
    n_chunks = max(1, triton.cdiv(N, block_n))
    splits = max(1, min(n_chunks, triton.cdiv(2 * sms, n_dtiles * n_rtiles)))
    rows_per_split = triton.cdiv(n_chunks, splits) * block_n
    splits = max(1, triton.cdiv(N, rows_per_split))
    return (block_n, block_d, r_tile, warps), (n_dtiles, splits, n_rtiles), rows_per_split


def _contig(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


@launcher
def adapter_forward(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, activation, scale, s, residual):
    """x, residual: (N, d) with unit last stride; returns (y, z, mean, rstd)."""
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    w_down, w_up, b_down, b_up, ln_weight, ln_bias = _contig(w_down, w_up, b_down, b_up, ln_weight, ln_bias)
    N, D = x.shape
    R = w_down.shape[0]
    dev = x.device
    y = empty((N, D), x.dtype, dev)
    z = empty((N, R), x.dtype, dev)
    has_ln = ln_weight is not None
    mean = empty((N if has_ln else 0,), torch.float32, dev)
    rstd = empty((N if has_ln else 0,), torch.float32, dev)
    if N == 0:
        return y, z, mean, rstd
    block_r = pow2_at_least(R)
    arch, elem = device_arch(dev), x.element_size()
    block_m, block_d, warps = _row_config(block_r, D, arch, elem, N, sm_count(dev))
    dummy = x
    _adapter_fwd_kernel[(triton.cdiv(N, block_m),)](
        strided_rows(x), strided_rows(residual if residual is not None else x), strided_rows(y), w_down,
        b_down if b_down is not None else dummy, w_up, b_up if b_up is not None else dummy,
        ln_weight if has_ln else dummy, ln_bias if ln_bias is not None else dummy,
        z, mean if has_ln else dummy, rstd if has_ln else dummy, s if s is not None else dummy,
        float(scale), float(eps), N, D, R,
        ACT=ACT_IDS[activation], HAS_LN=has_ln, HAS_LNB=ln_bias is not None, HAS_BD=b_down is not None,
        HAS_BU=b_up is not None, HAS_RES=residual is not None, HAS_S=s is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r, DOT_PREC=dot_precision(x.dtype), num_warps=warps,
        num_stages=_num_stages(arch, elem),
    )
    return y, z, mean, rstd


@launcher
def adapter_backward(dy, x, w_down, w_up, b_up, ln_weight, ln_bias, activation, scale, s, z, mean, rstd,
                     has_residual):
    """Returns dx, dw_down, db_down, dw_up, db_up, dln_w, dln_b, ds_sum (= Σ dy·u, fp32 0-d)."""
    N, D = x.shape
    R = w_down.shape[0]
    dev = x.device
    assert dy.shape == x.shape and dy.stride(-1) == 1 and x.stride(-1) == 1
    w_down, w_up, ln_weight, ln_bias = _contig(w_down, w_up, ln_weight, ln_bias)
    has_ln = ln_weight is not None
    dummy = x
    block_r = pow2_at_least(R)
    arch, elem = device_arch(dev), x.element_size()
    stages = _num_stages(arch, elem)
    prec = dot_precision(x.dtype)
    act = ACT_IDS[activation]

    dx = empty((N, D), x.dtype, dev)
    dz = empty((N, R), x.dtype, dev)
    a = empty((N, R), x.dtype, dev)  # act(z), written by the rows kernel, read by the weights kernel
    ag = empty((N,), torch.float32, dev)
    if N > 0:
        block_m, block_d, warps = _row_config(block_r, D, arch, elem, N, sm_count(dev))
        _adapter_bwd_rows_kernel[(triton.cdiv(N, block_m),)](
            strided_rows(dy), strided_rows(x), strided_rows(dx), w_down, w_up, ln_weight if has_ln else dummy,
            z, mean if has_ln else dummy, rstd if has_ln else dummy, s if s is not None else dummy, dz, a, ag,
            float(scale), N, D, R,
            ACT=act, HAS_LN=has_ln, HAS_RES=has_residual, HAS_S=s is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r, DOT_PREC=prec, num_warps=warps,
            num_stages=stages,
        )

    (block_n, block_dw, r_tile, warps_w), (n_dtiles, splits, n_rtiles), rows_per_split = weights_grid(
        N, D, R, has_ln, sm_count(dev), arch)
    f32 = torch.float32
    p_wu = empty((splits, D, R), f32, dev)
    p_wd = empty((splits, R, D), f32, dev)
    p_bu = empty((splits, D), f32, dev)
    p_bd = empty((splits, R), f32, dev)
    p_lw = empty((splits * n_rtiles, D) if has_ln else (0,), f32, dev)
    p_lb = empty((splits * n_rtiles, D) if has_ln else (0,), f32, dev)
    _adapter_bwd_weights_kernel[(n_dtiles, splits, n_rtiles)](
        strided_rows(dy), strided_rows(x), a, dz, w_down,
        ln_weight if has_ln else dummy, ln_bias if ln_bias is not None else dummy,
        mean if has_ln else dummy, rstd if has_ln else dummy,
        p_wu, p_wd, p_bu, p_bd, p_lw if has_ln else dummy, p_lb if has_ln else dummy,
        N, D, R, rows_per_split,
        HAS_LN=has_ln, HAS_LNB=ln_bias is not None,
        BLOCK_N=block_n, BLOCK_D=block_dw, BLOCK_R=r_tile, DOT_PREC=prec, num_warps=warps_w,
        num_stages=stages,
    )
    s_eff = torch.full((), float(scale), dtype=f32, device=dev)
    if s is not None:
        s_eff = s_eff * s.to(f32)
    colsum_dy = p_bu.sum(0)
    dw_up = (p_wu.sum(0) * s_eff).to(w_up.dtype)
    db_up = (colsum_dy * s_eff).to(x.dtype)
    dw_down = p_wd.sum(0).to(w_down.dtype)
    db_down = p_bd.sum(0).to(x.dtype)
    dln_w = p_lw.sum(0).to(ln_weight.dtype) if has_ln else None
    dln_b = p_lb.sum(0).to(ln_bias.dtype) if ln_bias is not None else None
    ds_sum = ag.sum()
    if b_up is not None:
        ds_sum = ds_sum + (colsum_dy * b_up.to(f32)).sum()
    return dx, dw_down, db_down, dw_up, db_up, dln_w, dln_b, ds_sum
