"""The online-softmax step the attention kernels' key loops share (gated_attention's main pass, gated cross-
attention's segment passes): one key block folded into the running (acc, m, l), FlashAttention-2 style, in the
exp2 domain (logits already scaled by log2(e)·scale)."""
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
