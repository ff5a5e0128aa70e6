"""Flamingo-style gated cross-attention (Llama 3.2 Vision, IDEFICS), fused forward and backward.

    out = g_h · softmax(q kᵀ·s over the keys row i may see) v          (0 for a row that sees nothing)

Triton kernels and launchers only (autograd, validation: fastbridge/ops/gated_cross_attention.py).
Layouts: q (B, H, Lq, D); k, v (B, Hkv, Lk, D), query head h reads KV head h // (H / Hkv) (GQA/MQA, never
repeated); any strides with a unit last stride (a kernel takes each as one Strided argument and addresses its tiles
with load_tile / store_tile: kernels/_strided.py). The Lk keys are S segments of SEG keys (an image tile, an
image's perceiver latents); VIS (B, Lq, S) uint8 says which segments each query row sees (HAS_VIS=False:
one segment, every key visible). No dense Lq x Lk mask exists anywhere.

Skipping. The launcher reduces VIS to a per-query-tile table STATE (B, n_tiles, S) int8 for the kernel's
BLOCK_M: 0 = no row of the tile sees segment s, 1 = some rows do, 2 = every row does (rows past Lq count as
seeing). Every kernel walks the keys segment by segment and skips a (tile, segment) pair in state 0, so the
work grows with the visible (tile, segment) pairs, not with Lq x Lk. Key blocks start at each segment's
first key (a segment's last block may be partial: SEG = 1601 = 25·64 + 1 costs 26 blocks of 64 instead of
25.02); inside a segment every key has the same visibility, so the mask is a per-row vector plus the
segment's end. A state-2 segment's whole blocks run without any mask (the forward's unmasked pass).

Forward (a program per (query tile, b·h)): online softmax (exp2 domain) over the visible segments; writes
out = g·o and lse (B, H, Lq) fp32 (natural log, -inf for a row that sees nothing). Decode (Lq within one
query tile, many key blocks, few B·H programs: generate with cached cross-attention K/V): the (segment, key
block) pairs are split across programs (split kernel, unnormalised partials) and a combine kernel merges them
by log-sum-exp rescaling, gates and writes out and lse (flash-decoding, as gated_attention's decode path).
Backward, FlashAttention-2 style recomputation from lse:
  pre   per (row tile, b·h): Δ = rowsum(dout · out) (= rowsum(dO_inner · o) with dO_inner = g·dout).
  dkdv  per (segment block of keys, b·hkv): loops over the group's query heads and the query tiles whose
        state for the segment is not 0; dk, dv accumulated in registers (no atomics). dv = Σ g·Pᵀ dout.
  dq    per (query tile, b·h): the visible segments' keys; with a gate also dg's partial
        Σ_rows Σ_keys P ∘ (dout vᵀ) (= Σ dout · o, exact at g = 0, where out = 0 says nothing about o).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import gated_attention as _GA
from ._common import device_arch, dot_precision, empty, launcher, pow2_at_least, pre_hopper, sm_count, small_smem
from ._softmax import merge_split_partials, online_softmax_step, store_split_partial
from ._strided import head_view, load_tile, store_tile, strided, unit_last

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_visibility(VIS, row0, offs_m, mask_m, s, S, HAS_VIS: tl.constexpr):
    """(BLOCK_M,) bool: the tile's rows (row0 = b·Lq, int64) that see segment s (rows past Lq: False)."""
    if HAS_VIS:
        return (tl.load(VIS + (row0 + offs_m) * S + s, mask=mask_m, other=0) != 0) & mask_m
    return mask_m


@triton.jit
def _segment_state(STATE, b64, tile, n_tiles, s, S, HAS_VIS: tl.constexpr):
    """0: no row of the query tile sees segment s; 1: some rows; 2: every row (HAS_VIS=False: always 2)."""
    if HAS_VIS:
        return tl.load(STATE + (b64 * n_tiles + tile) * S + s).to(tl.int32)
    return 2


@triton.jit
def _fwd_pass(q, K, V, b64, hk64, lo, hi, acc, m_i, l_i, vis_base, S, offs_m, mask_m, offs_d, mask_d, qk_scale,
              MASKED: tl.constexpr, HAS_VIS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over keys [lo, hi) of one segment, continuing (acc, m, l). MASKED=False: every row
    sees the segment and the range is whole blocks (no per-element mask at all)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi  # MASKED only (unused, and not computed, otherwise)
        k = load_tile(K, b64, hk64, offs_n, mask_n, offs_d, mask_d, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            row_vis = mask_m
            if HAS_VIS:  # vis_base: VIS + b·Lq·S + segment; every key of the segment shares it
                row_vis = (tl.load(vis_base + offs_m * S, mask=mask_m, other=0) != 0) & mask_m
            s = tl.where(row_vis[:, None] & mask_n[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, acc, m_i, l_i, V, b64, hk64, offs_n, mask_n, offs_d, mask_d, MASKED,
                                            DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _query_tile(pid_m, pid_bh, H, GROUP, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Batch / head / KV-head indices (int64) and the row / column offsets and masks of a query tile."""
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64), offs_m, offs_d, offs_m < Lq, offs_d < D


@triton.jit
def _gca_fwd_kernel(
    Q, K, V, VIS, STATE, G, OUT, LSE,
    H, GROUP, Lq, D, S, SEG, n_tiles, qk_scale,
    HAS_VIS: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64, h64, hk64, offs_m, offs_d, mask_m, mask_d = _query_tile(pid_m, pid_bh, H, GROUP, Lq, D, BLOCK_M, BLOCK_D)
    q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for s in range(0, S):
        # A segment no row of the tile sees gets an empty key range (lo == hi): skipped, no branch.
        lo = s * SEG
        hi = lo + SEG
        mid = lo + SEG // BLOCK_N * BLOCK_N  # whole blocks: unmasked when every row sees the segment
        if HAS_VIS:
            state = _segment_state(STATE, b64, pid_m, n_tiles, s, S, HAS_VIS)
            hi = tl.where(state > 0, hi, lo)
            mid = tl.where(state == 2, mid, lo)
        vis_base = VIS + b64 * Lq * S + s
        acc, m_i, l_i = _fwd_pass(q, K, V, b64, hk64, lo, mid, acc, m_i, l_i, vis_base, S, offs_m, mask_m, offs_d,
                                  mask_d, qk_scale, False, HAS_VIS, BLOCK_N, DOT_PREC)
        acc, m_i, l_i = _fwd_pass(q, K, V, b64, hk64, mid, hi, acc, m_i, l_i, vis_base, S, offs_m, mask_m, offs_d,
                                  mask_d, qk_scale, True, HAS_VIS, BLOCK_N, DOT_PREC)
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if HAS_GATE:
        o = o * tl.load(G + h64).to(tl.float32)
    store_tile(OUT, b64, h64, offs_m, mask_m, offs_d, mask_d, o)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=mask_m)


@triton.jit
def _gca_fwd_split_kernel(
    Q, K, V, VIS, STATE, ACC_PART, ML_PART,
    H, GROUP, Lq, D, S, SEG, blocks_per_seg, blocks_per_split,
    qk_scale,
    HAS_VIS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Decode (Lq <= BLOCK_M, one query tile): the (segment, key block) pairs split across programs; each writes
    its unnormalised partial (acc, m, l) (flash-decoding). Unseen segments' blocks get an empty key range."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64, h64, hk64, offs_m, offs_d, mask_m, mask_d = _query_tile(0, pid_bh, H, GROUP, Lq, D, BLOCK_M, BLOCK_D)
    q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, S * blocks_per_seg)
    for i in range(first, last):
        s = i // blocks_per_seg
        lo = s * SEG + (i % blocks_per_seg) * BLOCK_N
        hi = tl.minimum(lo + BLOCK_N, s * SEG + SEG)
        if HAS_VIS:
            hi = tl.where(_segment_state(STATE, b64, 0, 1, s, S, HAS_VIS) > 0, hi, lo)
        acc, m_i, l_i = _fwd_pass(q, K, V, b64, hk64, lo, hi, acc, m_i, l_i, VIS + b64 * Lq * S + s, S, offs_m,
                                  mask_m, offs_d, mask_d, qk_scale, True, HAS_VIS, BLOCK_N, DOT_PREC)
    store_split_partial(ACC_PART, ML_PART, acc, m_i, l_i, BLOCK_M, BLOCK_D)


@triton.jit
def _gca_fwd_combine_kernel(
    G, ACC_PART, ML_PART, OUT, LSE, H, Lq, D, n_splits,
    HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Merge the split partials (log-sum-exp rescaling), gate, write out and lse (DOT_PREC: uniform signature)."""
    pid_bh = tl.program_id(0)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    acc, m_i, l_i = merge_split_partials(ACC_PART, ML_PART, n_splits, BLOCK_M, BLOCK_D)
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if HAS_GATE:
        o = o * tl.load(G + h64).to(tl.float32)
    store_tile(OUT, b64, h64, offs_m, mask_m, offs_d, offs_d < D, o)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=mask_m)


@triton.jit
def _gca_bwd_pre_kernel(
    OUT, DO, DELTA, H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Δ = rowsum(dout · out) in fp32 (no dot: DOT_PREC only keeps the launch signature uniform)."""
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    o = load_tile(OUT, b64, h64, offs_m, mask_m, offs_d, mask_d)
    do = load_tile(DO, b64, h64, offs_m, mask_m, offs_d, mask_d)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mask_m)


@triton.jit
def _gca_bwd_dkdv_kernel(
    Q, K, V, DO, VIS, STATE, G, LSE, DELTA, DK, DV,
    H, Hkv, Lq, D, S, SEG, blocks_per_seg, n_tiles, qk_scale,
    GROUP: tl.constexpr, HAS_VIS: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b64 = (pid_bk // Hkv).to(tl.int64)
    hk64 = (pid_bk % Hkv).to(tl.int64)
    s = pid_n // blocks_per_seg
    in_seg = (pid_n % blocks_per_seg) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = s * SEG + in_seg
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = in_seg < SEG
    mask_d = offs_d < D
    dtype = Q.ptr.dtype.element_ty
    k = load_tile(K, b64, hk64, offs_n, mask_n, offs_d, mask_d)
    v = load_tile(V, b64, hk64, offs_n, mask_n, offs_d, mask_d)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g_i in range(GROUP):
        h64 = hk64 * GROUP + g_i
        bh = b64 * H + h64
        g = 1.0
        if HAS_GATE:
            g = tl.load(G + h64).to(tl.float32)
        for t in range(0, n_tiles):
            if _segment_state(STATE, b64, t, n_tiles, s, S, HAS_VIS) > 0:
                offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_m = offs_m < Lq
                q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d)
                do = load_tile(DO, b64, h64, offs_m, mask_m, offs_d, mask_d)
                lse = tl.load(LSE + bh * Lq + offs_m, mask=mask_m, other=float("inf"))
                lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows without keys: P = 0
                delta = tl.load(DELTA + bh * Lq + offs_m, mask=mask_m, other=0.0)
                row_vis = _row_visibility(VIS, b64 * Lq, offs_m, mask_m, s, S, HAS_VIS)
                sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
                p = tl.exp2(sc - (lse * _LOG2E)[:, None])
                p = tl.where(row_vis[:, None] & mask_n[None, :], p, 0.0)
                if HAS_GATE:  # dv = Σ g·Pᵀ dout: g applied in fp32 after the dot
                    dv += tl.dot(tl.trans(p.to(dtype)), do, input_precision=DOT_PREC) * g
                else:
                    dv += tl.dot(tl.trans(p.to(dtype)), do, input_precision=DOT_PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                ds = (p * (dp * g - delta[:, None])).to(dtype)
                dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)
    store_tile(DK, b64, hk64, offs_n, mask_n, offs_d, mask_d, dk * (qk_scale * _LN2))
    store_tile(DV, b64, hk64, offs_n, mask_n, offs_d, mask_d, dv)


@triton.jit
def _gca_bwd_dq_kernel(
    Q, K, V, DO, VIS, STATE, G, LSE, DELTA, DQ, DG_PART,
    H, GROUP, Lq, D, S, SEG, n_tiles, qk_scale,
    HAS_VIS: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64, h64, hk64, offs_m, offs_d, mask_m, mask_d = _query_tile(pid_m, pid_bh, H, GROUP, Lq, D, BLOCK_M, BLOCK_D)
    dtype = Q.ptr.dtype.element_ty
    q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d)
    do = load_tile(DO, b64, h64, offs_m, mask_m, offs_d, mask_d)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    lse = tl.load(LSE + row, mask=mask_m, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
    g = 1.0
    if HAS_GATE:
        g = tl.load(G + h64).to(tl.float32)
    K_h, V_h = head_view(K, b64, hk64), head_view(V, b64, hk64)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dg = tl.zeros([BLOCK_M], tl.float32)
    for s in range(0, S):
        if _segment_state(STATE, b64, pid_m, n_tiles, s, S, HAS_VIS) > 0:
            row_vis = _row_visibility(VIS, b64 * Lq, offs_m, mask_m, s, S, HAS_VIS)
            hi = s * SEG + SEG
            for n0 in range(s * SEG, hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < hi
                k = load_tile(K_h, 0, 0, offs_n, mask_n, offs_d, mask_d)
                v = load_tile(V_h, 0, 0, offs_n, mask_n, offs_d, mask_d)
                sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
                p = tl.exp2(sc - (lse * _LOG2E)[:, None])
                p = tl.where(row_vis[:, None] & mask_n[None, :], p, 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                if HAS_GATE:
                    dg += tl.sum(p * dp, 1)
                ds = p * (dp * g - delta[:, None])
                dq += tl.dot(ds.to(dtype), k, input_precision=DOT_PREC)
    store_tile(DQ, b64, h64, offs_m, mask_m, offs_d, mask_d, dq * (qk_scale * _LN2))
    if HAS_GATE:
        tl.store(DG_PART + pid_m.to(tl.int64) * tl.num_programs(1) + pid_bh, tl.sum(dg, 0))


# --------------------------------------------------------------------------------------------------
# Launchers. The tile configurations are gated_attention's (fwd_config / bwd_config): the same loop bodies
# less the prefix branch; python -m fastbridge.sm90_check compiles them for this kernel too.
# --------------------------------------------------------------------------------------------------
def fwd_config(D: int, Lq: int, arch: int, elem_size: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): gated_attention's forward tiles (kernels/gated_attention.py:
    fwd_config), except where this kernel's segment loop makes ptxas spill (2-byte inputs; python -m
    fastbridge.sm90_check --arch all, with Triton 3.9 and with 3.6, the GPU image's): the decode tile at D > 32 on
    every arch, and a few entries before Hopper. Those get the neighbour that compiles without a stack frame.
    fp32 keeps gated_attention's (spills allowed)."""
    block_m, block_n, warps, stages = _GA.fwd_config(D, Lq, arch, elem_size)
    if block_m == 16 and elem_size == 2:  # decode tile, every arch
        # The decode forward / split kernels sit on ptxas's edges here: gated_attention's (64 keys, 4 warps, 2
        # stages) leaves an 8-16 B stack with Triton 3.6 (D = 64: sm_89 / sm_90) or 3.9 (D = 128: sm_90, tipped
        # by one debug-line label more in the PTX). The entries below compile without stack on sm_80 / 89 / 90
        # with both (the candidates' grid: benchmarks/notes/gated_cross_attention.md, decode).
        if D > 128:
            block_n = 16
        elif D > 64:  # 32 keys, 8 warps, 1 stage
            block_n, warps, stages = 32, 8, 1
        elif D > 32:  # 1 stage
            stages = 1
    elif pre_hopper(arch) and elem_size == 2:
        if arch < 86 and 16 < D <= 32:  # sm_80
            block_n = 32
        elif small_smem(arch, 4) and D > 128:  # sm_86 / sm_89 (99 KB): 4 warps on the 32-row tile
            warps = 4
    return block_m, block_n, warps, stages


def bwd_config(D: int, arch: int, elem_size: int = 2) -> dict[str, tuple[int, int, int, int]]:
    """Per backward kernel (pre, dkdv, dq): gated_attention's backward tiles (its bwd_config), except the
    entries that spill here before Hopper (2-byte inputs), as fwd_config."""
    cfg = dict(_GA.bwd_config(D, arch, elem_size))
    if pre_hopper(arch) and elem_size == 2 and D <= 16:
        cfg["dkdv"] = (32, 32, 4, 2)
    if pre_hopper(arch) and elem_size == 2 and 64 < D <= 128:  # gated_attention's 8-warp dq leaves a 32 B stack here
        cfg["dq"] = (32, 64, 4, 2)
    return cfg


def key_block(block_n: int, seg: int) -> int:
    """Keys per block: the configuration's, shrunk to the segment (at least 16, tl.dot's minimum) so that a
    short segment (a few perceiver latents) does not pay for a whole 64-key block."""
    return min(block_n, pow2_at_least(seg))


@triton.jit
def _tile_state_kernel(VIS, STATE, Lq, S, n_tiles, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """STATE[b, t, s] = any + (any & all) over the rows of query tile t of VIS[b, :, s] (rows past Lq: seeing)."""
    t = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = offs_m < Lq
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        mask_s = cols < S
        v = tl.load(VIS + (b64 * Lq + offs_m[:, None]) * S + cols[None, :], mask=in_rows[:, None] & mask_s[None, :],
                    other=0) != 0
        any_ = tl.max(v.to(tl.int32), 0)
        all_ = tl.min((v | (offs_m >= Lq)[:, None]).to(tl.int32), 0)
        tl.store(STATE + (b64 * n_tiles + t) * S + cols, (any_ + (any_ & all_)).to(tl.int8), mask=mask_s)


def tile_state_reference(vis: torch.Tensor, block_m: int) -> torch.Tensor:
    """What _tile_state_kernel computes, in torch (tests)."""
    B, Lq, S = vis.shape
    n_tiles = triton.cdiv(Lq, block_m)
    pad = n_tiles * block_m - Lq
    any_ = F.pad(vis, (0, 0, 0, pad), value=False).view(B, n_tiles, block_m, S).any(2)
    all_ = F.pad(vis, (0, 0, 0, pad), value=True).view(B, n_tiles, block_m, S).all(2)
    return any_.to(torch.int8) + (any_ & all_).to(torch.int8)


def tile_state(vis: torch.Tensor | None, block_m: int, vis_u8: torch.Tensor | None = None
               ) -> tuple[torch.Tensor | None, int]:
    """STATE (B, n_tiles, S) int8 for query tiles of block_m rows: 0 = no row sees the segment, 1 = some do,
    2 = all do (rows past Lq count as seeing). One small kernel, O(B·Lq·S) bytes read, never Lq x Lk.
    Call under the tensors' device guard (the launchers': kernels/_common.launcher); vis_u8: vis already as
    contiguous uint8."""
    if vis is None:
        return None, 0
    B, Lq, S = vis.shape
    n_tiles = triton.cdiv(Lq, block_m)
    state = torch.empty((B, n_tiles, S), dtype=torch.int8, device=vis.device)  # every entry written
    if state.numel():
        u8 = vis_u8 if vis_u8 is not None else vis.contiguous().view(torch.uint8)
        _tile_state_kernel[(n_tiles, B)](u8, state, Lq, S, n_tiles, BLOCK_M=block_m,
                                         BLOCK_S=min(pow2_at_least(S, 1), 32), DOT_PREC="ieee", num_warps=4)
    return state, n_tiles


def _vis_arg(vis, dummy):
    return (vis.contiguous().view(torch.uint8), True) if vis is not None else (dummy, False)


def _segments(vis, Lk: int, seg: int) -> tuple[int, int]:
    """(S, SEG): without visibility one segment of Lk keys."""
    return (vis.shape[2], seg) if vis is not None else (1, Lk)


def decode_splits(programs: int, Lq: int, n_blocks: int, block_m: int, device) -> int:
    """Key-block splits of the forward: > 1 only when one query tile covers Lq (decode: generate with cached
    cross-attention K/V) and B·H programs alone would leave most of the GPU idle; each split keeps >= 4 of the
    n_blocks (segment, key block) pairs."""
    if Lq > block_m or n_blocks <= 4:
        return 1
    want = triton.cdiv(2 * sm_count(device), programs)
    return max(1, min(want, n_blocks // 4))


@launcher  # device guard; fp32 3xTF32 configurations that do not fit fall back to FMA dots (kernels/_common.py)
def gated_cross_attention_forward(q, k, v, vis, seg, g, scale):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v = (unit_last(t) for t in (q, k, v))
    out = empty((B, H, Lq, D), q.dtype, q.device)
    lse = empty((B, H, Lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    S, SEG = _segments(vis, Lk, seg)
    block_m, block_n, warps, stages = fwd_config(D, Lq, device_arch(q.device), q.element_size())
    block_n = key_block(block_n, SEG)
    vis_t, has_vis = _vis_arg(vis, q)
    g_t = g.float().contiguous() if g is not None else q
    block_d, prec, qk_scale = pow2_at_least(D), dot_precision(q.dtype), scale * math.log2(math.e)
    blocks_per_seg = triton.cdiv(SEG, block_n)
    splits = decode_splits(B * H, Lq, S * blocks_per_seg, block_m, q.device)
    Q, K, V, OUT = strided(q), strided(k), strided(v), strided(out)
    state, n_tiles = tile_state(vis, block_m, vis_t if has_vis else None)
    state_t = state if state is not None else q
    if splits == 1:
        _gca_fwd_kernel[(triton.cdiv(Lq, block_m), B * H)](
            Q, K, V, vis_t, state_t, g_t, OUT, lse,
            H, H // Hkv, Lq, D, S, SEG, n_tiles, qk_scale,
            HAS_VIS=has_vis, HAS_GATE=g is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, DOT_PREC=prec, num_warps=warps, num_stages=stages,
        )
        return out, lse
    # Decode: the key blocks split across programs so that B·H·splits programs fill the GPU.
    blocks_per_split = triton.cdiv(S * blocks_per_seg, splits)
    splits = triton.cdiv(S * blocks_per_seg, blocks_per_split)
    acc_part = empty((splits, B * H, block_m, block_d), torch.float32, q.device)
    ml_part = empty((splits, B * H, 2, block_m), torch.float32, q.device)
    _gca_fwd_split_kernel[(splits, B * H)](
        Q, K, V, vis_t, state_t, acc_part, ml_part,
        H, H // Hkv, Lq, D, S, SEG, blocks_per_seg, blocks_per_split, qk_scale,
        HAS_VIS=has_vis, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    _gca_fwd_combine_kernel[(B * H,)](
        g_t, acc_part, ml_part, OUT, lse, H, Lq, D, splits,
        HAS_GATE=g is not None, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec,
        num_warps=4, num_stages=1,
    )
    return out, lse


@launcher
def gated_cross_attention_backward(dout, q, k, v, vis, seg, g, out, lse, scale):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dev = q.device
    q, k, v, out, dout = (unit_last(t) for t in (q, k, v, out, dout))
    group = H // Hkv
    dq = empty(q.shape, q.dtype, dev)
    dk = empty(k.shape, k.dtype, dev)
    dv = empty(v.shape, v.dtype, dev)
    dg_empty = torch.zeros((0,), dtype=torch.float32, device=dev)
    if B * H * Lq == 0 or Lk == 0:
        return (q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape),
                dg_empty if g is None else torch.zeros_like(g))
    S, SEG = _segments(vis, Lk, seg)
    qk_scale = scale * math.log2(math.e)
    prec = dot_precision(q.dtype)
    cfg = bwd_config(D, device_arch(dev), q.element_size())
    block_d = pow2_at_least(D)
    vis_t, has_vis = _vis_arg(vis, q)
    has_gate = g is not None
    g_t = g.float().contiguous() if has_gate else q

    Q, K, V, OUT, DOUT = strided(q), strided(k), strided(v), strided(out), strided(dout)
    DQ, DK, DV = strided(dq), strided(dk), strided(dv)

    delta = empty((B, H, Lq), torch.float32, dev)
    block_m, _, warps, stages = cfg["pre"]
    _gca_bwd_pre_kernel[(triton.cdiv(Lq, block_m), B * H)](
        OUT, DOUT, delta, H, Lq, D,
        BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, num_warps=warps, num_stages=1,
    )

    block_m, block_n, warps, stages = cfg["dkdv"]
    block_n = key_block(block_n, SEG)
    state, n_tiles = tile_state(vis, block_m, vis_t if has_vis else None)
    blocks_per_seg = triton.cdiv(SEG, block_n)
    _gca_bwd_dkdv_kernel[(S * blocks_per_seg, B * Hkv)](
        Q, K, V, DOUT, vis_t, state if state is not None else q, g_t, lse, delta, DK, DV,
        H, Hkv, Lq, D, S, SEG, blocks_per_seg, n_tiles if has_vis else triton.cdiv(Lq, block_m), qk_scale,
        GROUP=group, HAS_VIS=has_vis, HAS_GATE=has_gate, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC=prec, num_warps=warps, num_stages=stages,
    )

    block_m, block_n, warps, stages = cfg["dq"]
    block_n = key_block(block_n, SEG)
    state, n_tiles = tile_state(vis, block_m, vis_t if has_vis else None)
    q_tiles = triton.cdiv(Lq, block_m)
    dg_part = empty((q_tiles, B * H), torch.float32, dev) if has_gate else dg_empty
    _gca_bwd_dq_kernel[(q_tiles, B * H)](
        Q, K, V, DOUT, vis_t, state if state is not None else q, g_t, lse, delta, DQ, dg_part,
        H, group, Lq, D, S, SEG, n_tiles, qk_scale,
        HAS_VIS=has_vis, HAS_GATE=has_gate, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC=prec, num_warps=warps, num_stages=stages,
    )
    dg = dg_part.view(q_tiles, B, H).sum((0, 1)).to(g.dtype) if has_gate else dg_empty
    return dq, dk, dv, dg
