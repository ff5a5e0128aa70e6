"""Split-softmax zero-init gated attention (LLaMA-Adapter), fused forward and backward.

    out = softmax(q kᵀ·s + mask) v + g_h · softmax(q pkᵀ·s) pv

Triton kernels and launchers only (autograd, validation: fastbridge/ops/gated_attention.py).
Layouts: q (B, H, Lq, D); k, v (B, Hkv, Lk, D), query head h reads KV head h // (H / Hkv) (GQA/MQA,
never repeated); prefix pk, pv (Bp, Hkv, P, D) with Bp ∈ {1, B}: a shared prompt is read with batch
stride 0 (broadcast, never copied). Any strides with a unit last stride; each tensor reaches a kernel as one
Strided argument (pointer + (batch, head, row) strides, kernels/_strided.py) and every tile through load_tile /
store_tile.

Forward (one kernel, a program per (query tile, b·h)): one pass over the P prefix keys and one over
the main keys with two online-softmax states (exp2 domain); bottom-right causal mask (query i sees
j <= i + Lk - Lq), key padding mask; a row with no visible main key gets 0 (and lse = -inf). Saves
lse_main and lse_prefix (B, H, Lq) fp32. Decode (Lq within one query tile, a long cache, few B·H
programs): the main keys are split across programs (split kernel, unnormalised partials) and a
combine kernel merges them by log-sum-exp rescaling and adds the gated prefix branch.

Backward, FlashAttention-2 style recomputation from the saved statistics:
  pre    per (row chunk, b·h, prompt tile of <= 64 keys): o_p recomputed (P is small; over every
         prompt tile), o_m = out - g·o_p, Δm = rowsum(dO·o_m), Δp = g·rowsum(dO·o_p); partial
         dg = Σ rowsum(dO·o_p); partial d prefix_k / d prefix_v of the tile's prompt keys over the chunk's
         rows (summed over chunks, GQA groups and -- for a shared prompt -- the batch).
  dkdv   per (key tile, b·hkv): loops over the group's query heads and the query tiles that can see
         the tile; dk, dv accumulated in registers (no atomics).
  dq     per (query tile, b·h): main keys, then the prefix branch.
dQ mode (``FASTBRIDGE_GA_DQ``, read at each backward; see dq_mode): "separate" (default, deterministic) as
above -- 7 matmuls per visible (query, key) pair; "atomic" -- the dkdv kernel also computes dS k and adds it
in fp32 into a zeroed (B, H, Lq, D) buffer with atomics (FlashAttention-2's single pass: 5 matmuls per pair,
summation order not deterministic), and the dq kernel only adds the prefix part and casts.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

from . import _autotune
from ._common import launcher
from ._softmax import merge_split_partials, online_softmax_step, store_split_partial
from ._strided import load_tile, store_tile, strided, unit_last
from ._common import (H100_ARCH, device_arch, dot_precision, empty, pow2_at_least, pre_hopper, sm_count,
                      small_smem, smem_per_block)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _main_mask(offs_m, offs_n, b, Lq, Lk, KPM, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Visibility of main keys offs_n for queries offs_m (bounds, bottom-right causal, padding)."""
    vis = (offs_n < Lk)[None, :] & (offs_m >= 0)[:, None]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    if HAS_KPM:
        keep = tl.load(KPM + b.to(tl.int64) * Lk + offs_n, mask=offs_n < Lk, other=0)
        vis = vis & (keep != 0)[None, :]
    return vis


@triton.jit
def _causal_hi(start_m, Lq, Lk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last main key any query of the tile [start_m, start_m + BLOCK_M) can see."""
    if CAUSAL:
        return tl.maximum(tl.minimum(Lk, start_m + BLOCK_M + (Lk - Lq)), 0)
    return Lk


@triton.jit
def _prefix_pass(q, PK, PV, b64, hk64, P, offs_d, mask_d, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Prefix branch, every prefix key visible: returns (softmax(q pkᵀ·s) pv, m, l) in the exp2 domain."""
    m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_p = tl.zeros([BLOCK_M], tl.float32)
    acc_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        pk = load_tile(PK, b64, hk64, offs_p, mask_p, offs_d, mask_d)
        s = tl.dot(q, tl.trans(pk), input_precision=DOT_PREC) * qk_scale
        s = tl.where(mask_p[None, :], s, float("-inf"))
        m_new = tl.maximum(m_p, tl.max(s, 1))
        alpha = tl.exp2(m_p - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_p = l_p * alpha + tl.sum(p, 1)
        pv = load_tile(PV, b64, hk64, offs_p, mask_p, offs_d, mask_d)
        acc_p = acc_p * alpha[:, None] + tl.dot(p.to(pv.dtype), pv, input_precision=DOT_PREC)
        m_p = m_new
    return acc_p / l_p[:, None], m_p, l_p


@triton.jit
def _unmasked_hi(start_m, lo, hi, Lq, Lk, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr):
    """End of the key range [lo, .) that every query row of the tile sees in full (whole BLOCK_N
    blocks from lo, in bounds, below the causal diagonal, no padding mask): no masking needed there."""
    if HAS_KPM:
        return lo
    end = hi
    if CAUSAL:
        end = tl.minimum(end, start_m + (Lk - Lq) + 1)  # the tile's first row sees keys < this
    return tl.maximum(lo + (end - lo) // BLOCK_N * BLOCK_N, lo)


@triton.jit
def _main_pass(q, K, V, b64, hk64, lo, hi, acc, m_m, l_m, offs_m, offs_d, mask_d, b, Lq, Lk, KPM,
               qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online softmax over main keys [lo, hi), continuing (acc, m, l); l stays 0 where nothing is seen.
    MASKED=False is for ranges _unmasked_hi vouches for: no per-element masks at all."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi  # MASKED only (unused, and not computed, otherwise)
        k = load_tile(K, b64, hk64, offs_n, mask_n, offs_d, mask_d, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            vis = _main_mask(offs_m, offs_n, b, Lq, Lk, KPM, CAUSAL, HAS_KPM) & mask_n[None, :]
            s = tl.where(vis, s, float("-inf"))
        acc, m_m, l_m = online_softmax_step(s, acc, m_m, l_m, V, b64, hk64, offs_n, mask_n, offs_d, mask_d, MASKED,
                                            DOT_PREC)
    return acc, m_m, l_m


@triton.jit
def _main_attention(q, K, V, b64, hk64, start_m, lo, hi, offs_m, offs_d, mask_d, b, Lq, Lk, KPM, qk_scale,
                    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Main branch over keys [lo, hi): the unmasked blocks first, then the diagonal / ragged / padded ones."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_m = tl.zeros([BLOCK_M], tl.float32)
    mid = _unmasked_hi(start_m, lo, hi, Lq, Lk, CAUSAL, HAS_KPM, BLOCK_N)
    acc, m_m, l_m = _main_pass(q, K, V, b64, hk64, lo, mid, acc, m_m, l_m, offs_m, offs_d, mask_d, b, Lq, Lk, KPM,
                               qk_scale, False, CAUSAL, HAS_KPM, BLOCK_N, DOT_PREC)
    acc, m_m, l_m = _main_pass(q, K, V, b64, hk64, mid, hi, acc, m_m, l_m, offs_m, offs_d, mask_d, b, Lq, Lk, KPM,
                               qk_scale, True, CAUSAL, HAS_KPM, BLOCK_N, DOT_PREC)
    return acc, m_m, l_m


@triton.jit
def _fwd_epilogue(acc, m_m, l_m, o_p, m_p, l_p, G, OUT, LSE_M, LSE_P, b64, h64, offs_m, offs_d, mask_m,
                  mask_d, H, Lq, PACK: tl.constexpr):
    """out = o_m + g·o_p (o_m = 0 for rows with no visible key); both log-sum-exps (natural log). h64: the
    head (PACK: per row)."""
    has_keys = l_m > 0.0
    o_m = acc / tl.where(has_keys, l_m, 1.0)[:, None]
    if PACK:
        g = tl.load(G + h64, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    else:
        g = tl.load(G + h64).to(tl.float32)
    store_tile(OUT, b64, h64, offs_m, mask_m, offs_d, mask_d, o_m + g * o_p, PACK)
    row = (b64 * H + h64) * Lq + offs_m
    lse_m = tl.where(has_keys, (m_m + tl.log2(tl.where(has_keys, l_m, 1.0))) * _LN2, float("-inf"))
    tl.store(LSE_M + row, lse_m, mask=mask_m)
    tl.store(LSE_P + row, (m_p + tl.log2(l_p)) * _LN2, mask=mask_m)


@triton.jit
def _heavy_first(CAUSAL: tl.constexpr):
    """Query-tile index of this program along grid axis 0. Causal: the last tile (most visible keys) first, so
    the heaviest programs start in the first wave and the light ones fill the tail (FlashAttention-2's order)."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def _query_tile(pid_m, pid_bh, H, GROUP, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                PACK: tl.constexpr = False):
    """Batch / head / KV-head indices (int64) and the row / column offsets and masks of a query tile.
    PACK (decode, FlashAttention-2's pack-GQA): pid_bh is b·Hkv + KV head and the tile's rows are the GROUP
    query heads' Lq queries (row r: head hk·GROUP + r // Lq, query r % Lq); the head is then per row and
    offs_m holds each row's query index."""
    offs_d = tl.arange(0, BLOCK_D)
    if PACK:  # one return below: Triton compiles only the taken branch of a constexpr if, but checks all returns
        Hkv = H // GROUP
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        r = tl.arange(0, BLOCK_M)
        h64 = (hk * GROUP + r // Lq).to(tl.int64)
        start_m = 0
        offs_m = r % Lq
        mask_m = r < GROUP * Lq
    else:
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        h64 = h.to(tl.int64)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Lq
    return b, b.to(tl.int64), h64, hk.to(tl.int64), start_m, offs_m, offs_d, mask_m, offs_d < D


@triton.jit
def _gated_attn_fwd_kernel(
    Q, K, V, PK, PV, G, KPM, OUT, LSE_M, LSE_P,
    H, GROUP, Lq, Lk, P, D, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, PACK: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b, b64, h64, hk64, start_m, offs_m, offs_d, mask_m, mask_d = _query_tile(_heavy_first(CAUSAL), pid_bh, H, GROUP,
                                                                             Lq, D, BLOCK_M, BLOCK_D, PACK)
    q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d, PACK=PACK)
    hi = _causal_hi(start_m, Lq, Lk, BLOCK_M, CAUSAL)
    acc, m_m, l_m = _main_attention(q, K, V, b64, hk64, start_m, 0, hi, offs_m, offs_d, mask_d, b, Lq, Lk, KPM,
                                    qk_scale, CAUSAL, HAS_KPM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    # The prompt pass after the key loop: its BLOCK_M x D fp32 accumulator is not live across the loop.
    o_p, m_p, l_p = _prefix_pass(q, PK, PV, b64, hk64, P, offs_d, mask_d, qk_scale, BLOCK_M, BLOCK_P, BLOCK_D,
                                 DOT_PREC)
    _fwd_epilogue(acc, m_m, l_m, o_p, m_p, l_p, G, OUT, LSE_M, LSE_P, b64, h64, offs_m, offs_d, mask_m, mask_d, H, Lq,
                  PACK)


@triton.jit
def _gated_attn_fwd_split_kernel(
    Q, K, V, KPM, ACC_PART, ML_PART,
    H, GROUP, Lq, Lk, D, keys_per_split, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    PACK: tl.constexpr,
):
    """Decode (Lq <= BLOCK_M; PACK: GROUP·Lq <= BLOCK_M): the main keys split across programs; unnormalised
    partials out, per program row."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, b64, h64, hk64, _, offs_m, offs_d, mask_m, mask_d = _query_tile(0, pid_bh, H, GROUP, Lq, D, BLOCK_M, BLOCK_D,
                                                                       PACK)
    q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d, PACK=PACK)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, _causal_hi(0, Lq, Lk, BLOCK_M, CAUSAL))
    acc, m_m, l_m = _main_attention(q, K, V, b64, hk64, 0, lo, hi, offs_m, offs_d, mask_d, b, Lq, Lk, KPM, qk_scale,
                                    CAUSAL, HAS_KPM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    store_split_partial(ACC_PART, ML_PART, acc, m_m, l_m, BLOCK_M, BLOCK_D)


@triton.jit
def _gated_attn_fwd_combine_kernel(
    Q, PK, PV, G, ACC_PART, ML_PART, OUT, LSE_M, LSE_P,
    H, GROUP, Lq, P, D, n_splits, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    PACK: tl.constexpr,
):
    """Merge the split partials (log-sum-exp rescaling), add the gated prefix branch, write out."""
    pid_bh = tl.program_id(0)
    b, b64, h64, hk64, _, offs_m, offs_d, mask_m, mask_d = _query_tile(0, pid_bh, H, GROUP, Lq, D, BLOCK_M, BLOCK_D,
                                                                       PACK)
    q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d, PACK=PACK)
    o_p, m_p, l_p = _prefix_pass(q, PK, PV, b64, hk64, P, offs_d, mask_d, qk_scale, BLOCK_M, BLOCK_P, BLOCK_D,
                                 DOT_PREC)
    acc, m_m, l_m = merge_split_partials(ACC_PART, ML_PART, n_splits, BLOCK_M, BLOCK_D)
    _fwd_epilogue(acc, m_m, l_m, o_p, m_p, l_p, G, OUT, LSE_M, LSE_P, b64, h64, offs_m, offs_d, mask_m,
                  mask_d, H, Lq, PACK)


@triton.jit
def _prefix_probs(q, PK, b64, hk64, offs_p, offs_d, mask_p, mask_d, lse_p, qk_scale, DOT_PREC: tl.constexpr):
    """P_p = softmax(q pkᵀ·s) recomputed from its log-sum-exp; also returns the prefix-key tile."""
    pk = load_tile(PK, b64, hk64, offs_p, mask_p, offs_d, mask_d)
    s = tl.dot(q, tl.trans(pk), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(s - (lse_p * _LOG2E)[:, None])
    return tl.where(mask_p[None, :], p, 0.0), pk


@triton.jit
def _gated_attn_bwd_pre_kernel(
    Q, PK, PV, G, OUT, DO, LSE_P, DELTA_M, DELTA_P, DG_PART, DPK_PART, DPV_PART,
    H, Lq, P, D, rows_per_prog, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, GROUP: tl.constexpr,
):
    # Program (row chunk, b·h, prompt tile): the Δ's and dg need o_p over the whole prompt (every prompt
    # tile: recomputed here when P > BLOCK_P), the prompt-key / value gradients only this
    # program's prompt tile. Δ's and dg are written by the programs of prompt tile 0.
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_p = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_d = offs_d < D
    mask_p = offs_p < P
    dtype = Q.ptr.dtype.element_ty
    g = tl.load(G + h).to(tl.float32)
    pv = load_tile(PV, b64, hk64, offs_p, mask_p, offs_d, mask_d)

    dpk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dpv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dg = tl.zeros([BLOCK_M], tl.float32)
    row_lo = pid_c * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, Lq)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_hi
        q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d)
        row = pid_bh.to(tl.int64) * Lq + offs_m
        lse_p = tl.load(LSE_P + row, mask=mask_m, other=0.0)
        if P <= BLOCK_P:  # one prompt tile: this program's
            p, pk = _prefix_probs(q, PK, b64, hk64, offs_p, offs_d, mask_p, mask_d, lse_p, qk_scale, DOT_PREC)
            p = tl.where(mask_m[:, None], p, 0.0)
            o_p = tl.dot(p.to(dtype), pv, input_precision=DOT_PREC)
        else:  # o_p over every prompt tile (rows outside the chunk have dO = 0: they add nothing below)
            o_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for p0 in range(0, P, BLOCK_P):
                offs_t = p0 + tl.arange(0, BLOCK_P)
                mask_t = offs_t < P
                p_t, _ = _prefix_probs(q, PK, b64, hk64, offs_t, offs_d, mask_t, mask_d, lse_p, qk_scale, DOT_PREC)
                pv_t = load_tile(PV, b64, hk64, offs_t, mask_t, offs_d, mask_d)
                o_p += tl.dot(p_t.to(dtype), pv_t, input_precision=DOT_PREC)
            p, pk = _prefix_probs(q, PK, b64, hk64, offs_p, offs_d, mask_p, mask_d, lse_p, qk_scale, DOT_PREC)
            p = tl.where(mask_m[:, None], p, 0.0)
        do = load_tile(DO, b64, h64, offs_m, mask_m, offs_d, mask_d).to(tl.float32)
        out = load_tile(OUT, b64, h64, offs_m, mask_m, offs_d, mask_d).to(tl.float32)
        dgp = tl.sum(do * o_p, 1)                      # d out / d g, per row
        delta_m = tl.sum(do * (out - g * o_p), 1)
        mask_first = mask_m & (pid_p + tl.zeros([BLOCK_M], tl.int32) == 0)  # prompt tile 0 writes the Δ's
        tl.store(DELTA_M + row, delta_m, mask=mask_first)
        tl.store(DELTA_P + row, g * dgp, mask=mask_first)
        dg += dgp
        # Prefix key / value gradients for these rows: dS_p = g·P_p ∘ (dO pvᵀ - rowsum(dO·o_p)).
        # g is applied in fp32 after each dot, so dO pvᵀ and rowsum(dO·o_p) see the same dO values.
        do_lp = do.to(dtype)
        dpv += tl.dot(tl.trans(p.to(dtype)), do_lp, input_precision=DOT_PREC) * g
        dp = tl.dot(do_lp, tl.trans(pv), input_precision=DOT_PREC)
        ds = p * (dp - dgp[:, None]) * g
        dpk += tl.dot(tl.trans(ds.to(dtype)), q, input_precision=DOT_PREC)
    part = pid_c.to(tl.int64) * tl.num_programs(1) + pid_bh
    if pid_p == 0:
        tl.store(DG_PART + part, tl.sum(dg, 0))
    base = part * P * D
    pmask = mask_p[:, None] & mask_d[None, :]
    tl.store(DPK_PART + base + offs_p[:, None] * D + offs_d[None, :], dpk * (qk_scale * _LN2), mask=pmask)
    tl.store(DPV_PART + base + offs_p[:, None] * D + offs_d[None, :], dpv, mask=pmask)


@triton.jit
def _gated_attn_bwd_dkdv_kernel(
    Q, K, V, DO, KPM, LSE_M, DELTA_M, DK, DV, DQ_ACC,
    H, Hkv, Lq, Lk, D, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    # ATOMIC_DQ: also dQ's main part, dS k, added in fp32 into DQ_ACC (B, H, Lq, D), contiguous and zeroed
    # (FlashAttention-2's single pass: 5 matmuls per visible pair instead of dkdv's 4 + dq's 3).
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < Lk
    mask_d = offs_d < D
    dtype = Q.ptr.dtype.element_ty
    k = load_tile(K, b64, hk64, offs_n, mask_n, offs_d, mask_d)
    v = load_tile(V, b64, hk64, offs_n, mask_n, offs_d, mask_d)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Key-major (Triton's fused-attention tutorial): Sᵀ = k qᵀ, dPᵀ = v dOᵀ, dv += Pᵀ dO, dk += dSᵀ q. Every
    # dot has the key tile as its M dimension, so BLOCK_N >= 64 gives Hopper wgmma for all of them (the
    # query-major form, S = q kᵀ with 32-row query tiles, compiled half of them to mma.sync).
    keep_n = mask_n  # the key tile's padding mask is loop-invariant: loaded once
    if HAS_KPM:
        keep_n = keep_n & (tl.load(KPM + b64 * Lk + offs_n, mask=mask_n, other=0) != 0)
    # First query that can see this key tile (bottom-right causal), rounded down to a tile.
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
    for g_i in range(GROUP):
        h64 = hk64 * GROUP + g_i
        bh = b64 * H + h64
        for m0 in range(lo, Lq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Lq
            q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d)
            do = load_tile(DO, b64, h64, offs_m, mask_m, offs_d, mask_d)
            lse = tl.load(LSE_M + bh * Lq + offs_m, mask=mask_m, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows without keys: P = 0
            delta = tl.load(DELTA_M + bh * Lq + offs_m, mask=mask_m, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            p_t = tl.exp2(s_t - (lse * _LOG2E)[None, :])
            vis_t = keep_n[:, None] & mask_m[None, :]
            if CAUSAL:
                vis_t = vis_t & (offs_n[:, None] <= offs_m[None, :] + (Lk - Lq))
            p_t = tl.where(vis_t, p_t, 0.0)
            dv += tl.dot(p_t.to(dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
            if ATOMIC_DQ:  # before dk's dot: with dk after it, Triton 3.6's ptxas (12.8) spills at D = 64
                dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PREC)
                tl.atomic_add(DQ_ACC + (bh * Lq + offs_m[:, None]) * D + offs_d[None, :], dq,
                              mask=mask_m[:, None] & mask_d[None, :], sem="relaxed")
            dk += tl.dot(ds_t, q, input_precision=DOT_PREC)
    store_tile(DK, b64, hk64, offs_n, mask_n, offs_d, mask_d, dk * (qk_scale * _LN2))
    store_tile(DV, b64, hk64, offs_n, mask_n, offs_d, mask_d, dv)


@triton.jit
def _gated_attn_bwd_dq_kernel(
    Q, K, V, PK, PV, G, DO, KPM, LSE_M, LSE_P, DELTA_M, DELTA_P, DQ, DQ_ACC,
    H, GROUP, Lq, Lk, P, D, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, MAIN_FROM_ACC: tl.constexpr,
):
    # MAIN_FROM_ACC: the main keys' part of dQ was accumulated by the dkdv kernel (ATOMIC_DQ); add the
    # prefix part, scale, cast.
    pid_bh = tl.program_id(1)
    b, b64, h64, hk64, start_m, offs_m, offs_d, mask_m, mask_d = _query_tile(_heavy_first(CAUSAL), pid_bh, H, GROUP,
                                                                             Lq, D, BLOCK_M, BLOCK_D)
    dtype = Q.ptr.dtype.element_ty
    q = load_tile(Q, b64, h64, offs_m, mask_m, offs_d, mask_d)
    do = load_tile(DO, b64, h64, offs_m, mask_m, offs_d, mask_d)
    row = pid_bh.to(tl.int64) * Lq + offs_m

    if MAIN_FROM_ACC:
        dq = tl.load(DQ_ACC + row[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    else:
        lse = tl.load(LSE_M + row, mask=mask_m, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA_M + row, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = _causal_hi(start_m, Lq, Lk, BLOCK_M, CAUSAL)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Lk
            k = load_tile(K, b64, hk64, offs_n, mask_n, offs_d, mask_d)
            v = load_tile(V, b64, hk64, offs_n, mask_n, offs_d, mask_d)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            p = tl.exp2(s - (lse * _LOG2E)[:, None])
            p = tl.where(_main_mask(offs_m, offs_n, b, Lq, Lk, KPM, CAUSAL, HAS_KPM), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(dtype), k, input_precision=DOT_PREC)

    # Prefix branch: dS_p = P_p ∘ (g·dO pvᵀ - Δp).
    g = tl.load(G + h64).to(tl.float32)
    lse_p = tl.load(LSE_P + row, mask=mask_m, other=0.0)
    delta_p = tl.load(DELTA_P + row, mask=mask_m, other=0.0)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        pp, pk = _prefix_probs(q, PK, b64, hk64, offs_p, offs_d, mask_p, mask_d, lse_p, qk_scale, DOT_PREC)
        pv = load_tile(PV, b64, hk64, offs_p, mask_p, offs_d, mask_d)
        dpp = tl.dot(do, tl.trans(pv), input_precision=DOT_PREC) * g
        dsp = pp * (dpp - delta_p[:, None])
        dq += tl.dot(dsp.to(dtype), pk, input_precision=DOT_PREC)
    store_tile(DQ, b64, h64, offs_m, mask_m, offs_d, mask_d, dq * (qk_scale * _LN2))


# --------------------------------------------------------------------------------------------------
# Launchers. Configurations per GPU arch (10 * major + minor; kernels/_common.device_arch): the H100's
# for sm_90 and later, own ones where those spill on sm_80 / sm_86 / sm_89. All compile without spills
# and within the arch's shared memory (python -m fastbridge.sm90_check --arch all).
# --------------------------------------------------------------------------------------------------
def _kpm_arg(kpm, dummy):
    return (kpm.contiguous().view(torch.uint8), True) if kpm is not None else (dummy, False)


def fwd_config(D: int, Lq: int, arch: int = H100_ARCH, elem_size: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward kernel; elem_size: bytes per q element."""
    block_m = 128 if Lq > 64 and D <= 128 else 64
    if Lq <= 16:
        block_m = 16
    block_n = 64 if D <= 128 else 32
    if block_m == 16 and D <= 16:  # 32 keys: with 64 the split kernel spills (Triton 3.6, sm_80) and the packed
        block_n = 32               # decode forward (sm_90: 16 B of stack)
    # A 16-row (decode) tile takes 4 warps at any D: with 8 at D = 256, Triton 3.6's ptxas stops at 128
    # registers and spills. A 64-row tile takes 8 at D >= 128: with 4 it spills at D = 128 (sm_90).
    warps = 8 if block_m == 128 or (D >= 128 and block_m > 16) else 4
    stages = 2
    if pre_hopper(arch):  # mma.sync; the H100 tiles below spill there
        if block_m > 16 and D >= 64:  # half the rows, 8 warps
            block_m, warps = block_m // 2, 8
    if small_smem(arch, elem_size) and block_m > 16:  # fp32 on 99 KB: 32 keys at D = 128, 1 stage above
        if D > 128:
            stages = 1
        elif D > 64:
            block_n = 32
    return block_m, block_n, warps, stages


def combine_warps(block_m: int, D: int) -> int:
    """num_warps of the decode combine kernel (no key loop): 8 for a 128-row tile or D >= 128 (every arch and
    element size: it spills or overflows nowhere; with 4 at D = 128 the packed-GQA combine has 24 B of stack on
    sm_90)."""
    return 8 if block_m == 128 or D >= 128 else 4


def bwd_config(D: int, arch: int = H100_ARCH, elem_size: int = 2) -> dict[str, tuple[int, int, int, int]]:
    """Per backward kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_N unused by "pre"; elem_size:
    bytes per q element."""
    if D <= 64:
        c = (64, 64, 4, 2)
        # key-major dkdv at D = 64: with 4 warps its launched specialisation spills (255 registers, 8 B stack)
        cfg = {"pre": c, "dkdv": (64, 64, 8, 2) if D > 32 else c, "dq": c}
    elif D <= 128:
        cfg = {"pre": (32, 0, 8, 1), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 8, 2)}
    else:
        c = (32, 32, 8, 1)
        cfg = {"pre": c, "dkdv": c, "dq": c}
    if pre_hopper(arch):  # mma.sync: the entries that spill there get fewer rows / keys, stages or warps
        # dq: 8 warps (with 4 the launched specialisation spills 8 B: sm_80 at D = 64, sm_89 at D = 128); D = 256
        # dkdv: 16 rows (the atomic variant's launched specialisation spills 8 B with 32 on sm_80 and sm_89)
        if D <= 64:
            cfg.update(pre=(32, 0, 4, 2), dkdv=(64, 32, 8, 2), dq=(32, 64, 8, 2))
        elif D <= 128:
            cfg.update(dkdv=(32, 64, 8, 1), dq=(32, 64, 8, 2))
        else:
            cfg.update(dq=(16, 32, 8, 1), dkdv=(16, 32, 8, 1))
        # fp32: tiles twice the bytes. D = 256's dkdv (TF32 dots; and pre with Triton 3.6) needs more than
        # sm_80's 163 KB, and on 99 KB GPUs (sm_86 / sm_89) D = 128's dkdv and dq too.
        if elem_size > 2 and D > 128:
            cfg.update(pre=(16, 32, 8, 1), dkdv=(16, 16 if small_smem(arch, elem_size) else 32, 8, 1))
        elif small_smem(arch, elem_size) and D > 64:  # dkdv: 16 rows for the atomic variant under Triton 3.6
            cfg.update(dkdv=(16, 32, 8, 1), dq=(32, 64, 4, 1))
    return cfg


def shared_memory_gap(arch: int, elem_size: int, D: int, dot_prec: str, backward: bool,
                      triton_version: str = triton.__version__) -> str | None:
    """Why no launch configuration fits this arch's shared memory, or None. One case is known (sm90_check
    --dtype fp32-tf32 under Triton 3.6): fp32 with TF32 dots at D > 128 on a 99 KB GPU, where Triton before
    3.9 gives the backward's pre / atomic-dQ kernels 114688 B even at their smallest tiles (3.9: 64 KB).
    3xTF32 ("tf32x3", fp32 under torch's "highest") stages the same fp32 operand tiles: assumed the same
    (not compiled under Triton 3.6 here)."""
    major_minor = tuple(int(x) for x in triton_version.split(".")[:2] if x.isdigit())
    if (backward and elem_size > 2 and dot_prec in ("tf32", "tf32x3") and D > 128 and small_smem(arch, elem_size)
            and major_minor < (3, 9)):
        return (f"with Triton {triton_version} the fp32 (TF32) backward at head dim {D} needs 114688 B of shared "
                f"memory per block, sm_{arch} allows {smem_per_block(arch)} (Triton >= 3.9 fits)")
    return None


def decode_splits(programs: int, Lq: int, Lk: int, block_m: int, block_n: int, device) -> int:
    """Key splits for the forward: > 1 only when one query tile covers Lq (decode) and B·H programs
    alone would leave most of the GPU idle; each split keeps >= 4 key blocks."""
    if Lq > block_m or Lk <= 4 * block_n:
        return 1
    want = triton.cdiv(2 * sm_count(device), programs)
    return max(1, min(want, Lk // (4 * block_n)))


DQ_MODES = ("separate", "atomic")
DQ_ENV = "FASTBRIDGE_GA_DQ"
_warned_deterministic = False


def dq_mode() -> str:
    """The backward's dQ path: FASTBRIDGE_GA_DQ ("separate", the default, or "atomic"). "atomic" is not
    deterministic, so under torch.use_deterministic_algorithms(True) the separate path runs instead
    (same gradients up to rounding; only speed differs) -- said once with a warning."""
    global _warned_deterministic
    mode = os.environ.get(DQ_ENV, "separate").strip().lower() or "separate"
    if mode not in DQ_MODES:
        raise ValueError(f"{DQ_ENV}: expected one of {', '.join(DQ_MODES)}, got {mode!r}")
    if mode == "atomic" and torch.are_deterministic_algorithms_enabled():
        if not _warned_deterministic:
            _warned_deterministic = True
            warnings.warn(f"fastbridge: {DQ_ENV}=atomic accumulates dQ with atomics (not deterministic); "
                          "deterministic algorithms are on, so gated_attention's backward uses the separate dQ "
                          "kernel (same results, only speed differs)", stacklevel=3)
        return "separate"
    return mode


# Autotune (kernels/_autotune.py): besides each default, at most three alternatives per (kernel, Hopper or not,
# head-dim tile), for 2-byte elements at the common head dims 64 and 128; every one compiles spill-free and
# within shared memory (python -m fastbridge.sm90_check compiles each one under _autotune.forcing).
TUNE_ALTERNATIVES = {
    ("fwd", True, 64): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    ("fwd", True, 128): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    ("dkdv", True, 64): [(64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 3)],
    ("dkdv", True, 128): [(32, 64, 8, 3), (32, 128, 8, 2), (16, 64, 4, 2)],
    ("dq", True, 64): [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2)],
    ("dq", True, 128): [(64, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2)],
}


def tune_candidates(kernel: str, D: int, arch: int = H100_ARCH, elem_size: int = 2, rows: int | None = None) -> list:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of a tuned kernel ("fwd", "dkdv", "dq"), at most
    _autotune.MAX_CANDIDATES: the per-arch table's entry (kernels/_autotune.table_pick) or else the built-in
    default first -- what runs without FASTBRIDGE_AUTOTUNE -- then the default and TUNE_ALTERNATIVES. 2-byte
    inputs only; the forward for training / prefill tiles only (rows > 64: decode keeps its default)."""
    default = fwd_config(D, rows, arch, elem_size) if kernel == "fwd" else bwd_config(D, arch, elem_size)[kernel]
    if elem_size > 2 or (kernel == "fwd" and rows <= 64):
        return [default]
    first = _autotune.table_pick(kernel, arch, pow2_at_least(D), default)
    alts = TUNE_ALTERNATIVES.get((kernel, not pre_hopper(arch), pow2_at_least(D)), [])
    return list(dict.fromkeys([first, default, *alts]))[:_autotune.MAX_CANDIDATES]


PACK_MAX_LQ = 16  # pack-GQA is for decode / speculative steps: at most this many queries per head


def pack_gqa(Lq: int, group: int, D: int, arch: int = H100_ARCH, elem_size: int = 2) -> bool:
    """Forward: put the GQA group's query heads into one query tile (FlashAttention-2's pack-GQA) when Lq is a
    decode step and group·Lq rows fit the tile fwd_config picks for that many rows: one program per KV head
    reads K / V once for the whole group (not group times), and with group·Lq >= 64 rows the tile becomes
    wgmma-sized on Hopper."""
    if group <= 1 or Lq > PACK_MAX_LQ:
        return False
    return group * Lq <= fwd_config(D, group * Lq, arch, elem_size)[0]


def _prefix_block(P: int) -> int:
    return pow2_at_least(min(P, 64))


@launcher
def gated_attention_forward(q, k, v, pk, pv, g, causal, scale, kpm):
    B, H, Lq, D = q.shape
    Hkv, Lk, P = k.shape[1], k.shape[2], pk.shape[2]
    q, k, v, pk, pv = (unit_last(t) for t in (q, k, v, pk, pv))
    out = empty((B, H, Lq, D), q.dtype, q.device)
    lse_m = empty((B, H, Lq), torch.float32, q.device)
    lse_p = empty((B, H, Lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse_m, lse_p
    g = g.float().contiguous()
    kpm_t, has_kpm = _kpm_arg(kpm, q)
    arch = device_arch(q.device)
    group = H // Hkv
    pack = pack_gqa(Lq, group, D, arch, q.element_size())
    rows = Lq * group if pack else Lq  # rows of a program's query tile(s)
    block_m, block_n, warps, stages = fwd_config(D, rows, arch, q.element_size())
    heads = Hkv if pack else H  # programs per sample along grid axis 1
    shared = pk.shape[0] == 1 and B > 1
    block_d, block_p = pow2_at_least(D), _prefix_block(P)
    qk_scale = scale * math.log2(math.e)
    prec = dot_precision(q.dtype)
    Q, K, V, PK, PV, OUT = strided(q), strided(k), strided(v), strided(pk, shared), strided(pv, shared), strided(out)
    splits = decode_splits(B * heads, rows, Lk, block_m, block_n, q.device)
    if splits == 1:
        def launch(cfg):
            bm, bn, w, st = cfg
            _gated_attn_fwd_kernel[(triton.cdiv(rows, bm), B * heads)](
                Q, K, V, PK, PV, g, kpm_t, OUT, lse_m, lse_p,
                H, H // Hkv, Lq, Lk, P, D, qk_scale,
                CAUSAL=causal, HAS_KPM=has_kpm, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=block_p,
                BLOCK_D=block_d, DOT_PREC=prec, PACK=pack, num_warps=w, num_stages=st,
            )

        cands = tune_candidates("fwd", D, arch, q.element_size(), rows)
        launch(_autotune.select("fwd", arch, q.dtype, block_d, cands, launch, q.device, Lq=_autotune.shape_bucket(rows),
                                Lk=_autotune.shape_bucket(Lk), causal=int(causal), kpm=int(has_kpm)))
        return out, lse_m, lse_p
    # Decode: split the keys so that B·H·splits programs fill the GPU (flash-decoding).
    keys_per_split = triton.cdiv(triton.cdiv(Lk, splits), block_n) * block_n
    splits = triton.cdiv(Lk, keys_per_split)
    acc_part = empty((splits, B * heads, block_m, block_d), torch.float32, q.device)
    ml_part = empty((splits, B * heads, 2, block_m), torch.float32, q.device)
    _gated_attn_fwd_split_kernel[(splits, B * heads)](
        Q, K, V, kpm_t, acc_part, ml_part,
        H, H // Hkv, Lq, Lk, D, keys_per_split, qk_scale,
        CAUSAL=causal, HAS_KPM=has_kpm, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PREC=prec,
        PACK=pack, num_warps=warps, num_stages=stages,
    )
    _gated_attn_fwd_combine_kernel[(B * heads,)](
        Q, PK, PV, g, acc_part, ml_part, OUT, lse_m, lse_p,
        H, H // Hkv, Lq, P, D, splits, qk_scale,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_D=block_d, DOT_PREC=prec, PACK=pack,
        num_warps=combine_warps(block_m, D), num_stages=1,
    )
    return out, lse_m, lse_p


@launcher
def gated_attention_backward(dout, q, k, v, pk, pv, g, out, lse_m, lse_p, causal, scale, kpm):
    B, H, Lq, D = q.shape
    Hkv, Lk, P = k.shape[1], k.shape[2], pk.shape[2]
    Bp = pk.shape[0]
    dev = q.device
    q, k, v, pk, pv, out, dout = (unit_last(t) for t in (q, k, v, pk, pv, out, dout))
    g32 = g.float().contiguous()
    group = H // Hkv
    dq = empty(q.shape, q.dtype, dev)
    dk = empty(k.shape, k.dtype, dev)
    dv = empty(v.shape, v.dtype, dev)
    if B * H * Lq == 0:  # fresh contiguous zeros, as the op's fake promises (zeros_like would keep strides)
        zeros = [torch.zeros(t.shape, dtype=t.dtype, device=dev) for t in (k, v, pk, pv, g)]
        return (dq, *zeros)
    kpm_t, has_kpm = _kpm_arg(kpm, q)
    shared = Bp == 1 and B > 1
    qk_scale = scale * math.log2(math.e)
    prec = dot_precision(q.dtype)
    arch = device_arch(dev)
    cfg = bwd_config(D, arch, q.element_size())
    block_d = pow2_at_least(D)
    block_p = _prefix_block(P)
    Q, K, V, PK, PV = strided(q), strided(k), strided(v), strided(pk, shared), strided(pv, shared)
    OUT, DOUT, DQ, DK, DV = strided(out), strided(dout), strided(dq), strided(dk), strided(dv)

    # pre: Δ's, dg and d prefix partials. Row chunks sized for ~4 programs per SM overall.
    delta_m = empty((B, H, Lq), torch.float32, dev)
    delta_p = empty((B, H, Lq), torch.float32, dev)
    block_m, _, warps, stages = cfg["pre"]
    n_tiles = triton.cdiv(Lq, block_m)
    chunks = max(1, min(n_tiles, triton.cdiv(4 * sm_count(dev), B * H)))
    rows_per_prog = triton.cdiv(n_tiles, chunks) * block_m
    chunks = triton.cdiv(Lq, rows_per_prog)
    dg_part = empty((chunks, B, H), torch.float32, dev)
    dpk_part = empty((chunks, B, H, P, D), torch.float32, dev)
    dpv_part = empty((chunks, B, H, P, D), torch.float32, dev)
    n_ptiles = triton.cdiv(P, block_p)
    _gated_attn_bwd_pre_kernel[(chunks, B * H, n_ptiles)](
        Q, PK, PV, g32, OUT, DOUT, lse_p, delta_m, delta_p, dg_part, dpk_part, dpv_part,
        H, Lq, P, D, rows_per_prog, qk_scale,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_D=block_d, DOT_PREC=prec, GROUP=group, num_warps=warps,
        num_stages=stages,
    )

    atomic = dq_mode() == "atomic" and Lk > 0
    # fp32 main-part dQ accumulator (atomic mode); zeroed: every visible pair adds into it.
    dq_acc = torch.zeros((B, H, Lq, D), dtype=torch.float32, device=dev) if atomic else dq
    # Tuned (FASTBRIDGE_AUTOTUNE=1, kernels/_autotune.py) in the separate-dQ mode only: its launches are
    # idempotent; the atomic mode accumulates into dq_acc and runs the defaults.
    tune_key = dict(Lq=_autotune.shape_bucket(Lq), Lk=_autotune.shape_bucket(Lk), causal=int(causal),
                    kpm=int(has_kpm))

    def tuned(name, launch):
        if atomic:
            return cfg[name]
        return _autotune.select(name, arch, q.dtype, block_d, tune_candidates(name, D, arch, q.element_size()),
                                launch, dev, **tune_key)

    if Lk > 0:
        def launch_dkdv(c):
            bm, bn, w, st = c
            _gated_attn_bwd_dkdv_kernel[(triton.cdiv(Lk, bn), B * Hkv)](
                Q, K, V, DOUT, kpm_t, lse_m, delta_m, DK, DV, dq_acc,
                H, Hkv, Lq, Lk, D, qk_scale,
                GROUP=group, CAUSAL=causal, HAS_KPM=has_kpm, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                DOT_PREC=prec, ATOMIC_DQ=atomic, num_warps=w, num_stages=st,
            )

        launch_dkdv(tuned("dkdv", launch_dkdv))

    def launch_dq(c):
        bm, bn, w, st = c
        _gated_attn_bwd_dq_kernel[(triton.cdiv(Lq, bm), B * H)](
            Q, K, V, PK, PV, g32, DOUT, kpm_t, lse_m, lse_p, delta_m, delta_p, DQ, dq_acc,
            H, group, Lq, Lk, P, D, qk_scale,
            CAUSAL=causal, HAS_KPM=has_kpm, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=block_p, BLOCK_D=block_d,
            DOT_PREC=prec, MAIN_FROM_ACC=atomic, num_warps=w, num_stages=st,
        )

    launch_dq(tuned("dq", launch_dq))

    # Reduce the prefix partials: over chunks, the GQA group's query heads and (shared prompt) the batch.
    def reduce_prefix(part):
        t = part.sum(0).view(B, Hkv, group, P, D).sum(2)
        return t.sum(0, keepdim=True) if Bp == 1 else t

    dpk = reduce_prefix(dpk_part).to(pk.dtype)
    dpv = reduce_prefix(dpv_part).to(pv.dtype)
    dg = dg_part.sum((0, 1)).to(g.dtype)
    return dq, dk, dv, dpk, dpv, dg
