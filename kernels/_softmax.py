"""The online softmax the attention kernels share (gated_attention, gated cross-attention), in the exp2 domain
(logits already scaled by log2(e)·scale): the key loops' step -- one key block folded into the running
(acc, m, l), FlashAttention-2 style -- and split-key decode's partials, written by the split programs and merged
by log-sum-exp rescaling in the combine programs (flash-decoding)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._strided import load_tile


@triton.jit
def online_softmax_step(s, acc, m_i, l_i, V, b, h, offs_n, mask_n, offs_d, mask_d, MASKED: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    """Fold the key block offs_n (logits s, BLOCK_M x BLOCK_N, -inf where a key is not seen) into (acc, m, l); its
    values V[b, h, offs_n] are read after the probabilities (ROW_MASK = MASKED, as load_tile). A row that has
    seen no key yet keeps m = -inf, l = 0, acc = 0 (its exponentials are taken against 0, not -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_tile(V, b, h, offs_n, mask_n, offs_d, mask_d, MASKED)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


# Split-key decode (flash-decoding): each of n_splits programs per (b, head) writes its unnormalised partial
# (acc, m, l) for the tile's BLOCK_M rows; a combine program merges them. Buffers, fp32, contiguous, allocated by
# the launcher: ACC_PART (n_splits, programs, BLOCK_M, BLOCK_D), ML_PART (n_splits, programs, 2, BLOCK_M);
# partial index = split · programs + program.
@triton.jit
def store_split_partial(ACC_PART, ML_PART, acc, m_i, l_i, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This split program's partial (grid axis 0: the split, axis 1: the (b, head) program)."""
    part = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)  # tile rows (not query indices: a pack-GQA tile repeats those per head)
    tl.store(ACC_PART + (part * BLOCK_M + rows[:, None]) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], acc)
    tl.store(ML_PART + (part * 2) * BLOCK_M + rows, m_i)
    tl.store(ML_PART + (part * 2 + 1) * BLOCK_M + rows, l_i)


@triton.jit
def merge_split_partials(ACC_PART, ML_PART, n_splits, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(acc, m, l) of every split of this combine program's (b, head) (grid axis 0), merged by log-sum-exp
    rescaling; rows no split saw keep m = -inf, l = 0, acc = 0."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s_i in range(0, n_splits):
        part = pid + s_i * tl.num_programs(0)
        m_s = tl.load(ML_PART + (part * 2) * BLOCK_M + rows)
        l_s = tl.load(ML_PART + (part * 2 + 1) * BLOCK_M + rows)
        acc_s = tl.load(ACC_PART + (part * BLOCK_M + rows[:, None]) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_old = tl.exp2(m_i - m_safe)
        a_new = tl.exp2(m_s - m_safe)
        l_i = l_i * a_old + l_s * a_new
        acc = acc * a_old[:, None] + acc_s * a_new[:, None]
        m_i = m_new
    return acc, m_i, l_i
