"""fastbridge.ops.gated_attention: LLaMA-Adapter's split-softmax zero-init gated attention (API.md).

    out = softmax(q kᵀ·s + mask) v + g · softmax(q prefix_kᵀ·s) prefix_v      (two separate softmaxes)

The fused path is two torch.library custom ops (forward returns the two log-sum-exps it saves;
backward recomputes probabilities from them, FlashAttention-2 style):
  fastbridge::gated_attention      (q, k, v, pk, pv, g, causal, scale, kpm?) -> (out, lse_main, lse_prefix)
  fastbridge::gated_attention_bwd  -> (dq, dk, dv, dpk, dpv, dg)
``g`` is the per-head gate value (tanh(gate) or gate, expanded to (H,), fp32), built here with
ordinary autograd ops, so the op returns dL/dg and autograd carries it through tanh.
The "reference" backend calls fastbridge.reference.gated_attention with ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as ref
from . import _autocast
from . import _validate as V

OP = "gated_attention"
MAX_HEAD_DIM = 256


def _kernel_unavailable(q: Tensor, grads: tuple = ()) -> Optional[str]:
    """Why the Triton kernels cannot serve this call (None: they can); ``grads``: the differentiable inputs
    (a backward follows when grad mode is on and one of them requires grad)."""
    reason = _backend.triton_unavailable_reason(q.device)
    if reason is None and q.dtype == torch.float64:
        reason = "the Triton kernel computes in fp32/fp16/bf16, not float64"
    if reason is None and q.shape[-1] > MAX_HEAD_DIM:
        reason = f"the fused kernel supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if reason is None and q.device.type == "cuda":
        from ..kernels import _common as KC
        from ..kernels import gated_attention as K

        backward = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, *grads))
        reason = K.shared_memory_gap(KC.device_arch(q.device), q.element_size(), q.shape[-1],
                                     KC.dot_precision(q.dtype), backward)
    return reason


# ---------------------------------------------------------------------------------------- forward op
@torch.library.custom_op("fastbridge::gated_attention", mutates_args=())
def _gated_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, g: Tensor, causal: bool, scale: float,
    key_padding_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.gated_attention import gated_attention_forward

    return gated_attention_forward(q, k, v, prefix_k, prefix_v, g, causal, scale, key_padding_mask)


@_gated_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, g, causal, scale, key_padding_mask):
    B, H, Lq, _ = q.shape
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse, torch.empty_like(lse)


# --------------------------------------------------------------------------------------- backward op
@torch.library.custom_op("fastbridge::gated_attention_bwd", mutates_args=())
def _gated_attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, g: Tensor, out: Tensor,
    lse_main: Tensor, lse_prefix: Tensor, causal: bool, scale: float, key_padding_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.gated_attention import gated_attention_backward

    return gated_attention_backward(dout, q, k, v, prefix_k, prefix_v, g, out, lse_main, lse_prefix, causal, scale,
                                    key_padding_mask)


@_gated_attention_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, g, out, lse_main, lse_prefix, causal, scale, key_padding_mask):
    # The kernels write fresh contiguous gradients (Lq = 0 included).
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v, g))


_gated_attention_bwd_op.register_autograd(V.no_double_backward(OP))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, g, causal, scale, kpm = inputs
    out, lse_m, lse_p = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, g, out, lse_m, lse_p, kpm)
    ctx.cfg = (causal, scale)
    ctx.mark_non_differentiable(lse_m, lse_p)


def _backward(ctx, dout, _dlse_m, _dlse_p):
    q, k, v, prefix_k, prefix_v, g, out, lse_m, lse_p, kpm = ctx.saved_tensors
    causal, scale = ctx.cfg
    dq, dk, dv, dpk, dpv, dg = _gated_attention_bwd_op(dout, q, k, v, prefix_k, prefix_v, g, out, lse_m, lse_p,
                                                       causal, scale, kpm)
    return dq, dk, dv, dpk, dpv, dg, None, None, None


_gated_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ public API
def _validate(q, k, v, prefix_k, prefix_v, gate, causal, scale, gate_fn, key_padding_mask):
    B, H, Lq, D, Hkv, Lk = V.attention_qkv(OP, q, k, v)
    V.tensor(OP, "prefix_k", prefix_k, ndim=4)
    Bp, P = prefix_k.shape[0], prefix_k.shape[2]
    if Bp not in (1, B) or tuple(prefix_k.shape[1::2]) != (Hkv, D) or P < 1:
        V.fail(OP, "prefix_k", f"of shape (1 or B, Hkv, P, D) = (1 or {B}, {Hkv}, P >= 1, {D})",
               f"shape {tuple(prefix_k.shape)}")
    V.tensor(OP, "prefix_v", prefix_v)
    V.shape(OP, "prefix_v", prefix_v, tuple(prefix_k.shape), f"prefix_k's shape {tuple(prefix_k.shape)}")
    V.same_device_dtype(OP, "q", q, {"prefix_k": prefix_k, "prefix_v": prefix_v})
    V.tensor(OP, "gate", gate)
    V.scalar_param(OP, "gate", gate, allowed=((), (1,), (H,)))
    V.same_device_dtype(OP, "q", q, {"gate": gate}, dtype=False)
    V.choice(OP, "gate_fn", gate_fn, ("tanh", "identity"))
    if not isinstance(causal, bool):
        V.fail(OP, "causal", "a bool", repr(causal))
    if scale is not None:
        scale = V.real_number(OP, "scale", scale, "None or a positive float (finite)", positive=True)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            V.fail(OP, "key_padding_mask", "a bool tensor (True = attend)",
                   getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__))
        V.shape(OP, "key_padding_mask", key_padding_mask, (B, Lk), f"(B, Lk) = ({B}, {Lk})")
        V.same_device_dtype(OP, "q", q, {"key_padding_mask": key_padding_mask}, dtype=False)
    return H, D, scale


def gated_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Tensor, *,
                    causal: bool = True, scale: Optional[float] = None, gate_fn: str = "tanh",
                    key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Split-softmax zero-init gated attention (LLaMA-Adapter), fused (API.md).

    q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H % Hkv == 0; prefix_k / prefix_v (1 or B, Hkv, P, D):
    a prompt shared by the batch (broadcast by stride, never copied) or one per sample; gate (), (1,)
    or (H,), g = tanh(gate) ("tanh") or gate ("identity"). Causal masking is bottom-right aligned
    (query i sees keys j <= i + Lk - Lq) so KV-cache decoding is right; prefix keys are always visible.
    key_padding_mask: bool (B, Lk), True = attend; a query with no visible main key (Lk = 0 included)
    gets 0 from the main branch. Any prompt length P >= 1. Returns (B, H, Lq, D) in q's dtype.
    Differentiable in q, k, v, prefix_k, prefix_v, gate (second order: the reference backend only; the
    fused backward raises NotImplementedError when differentiated).
    """
    amp = _autocast.autocast_dtype(q) if isinstance(q, Tensor) else None
    if amp is not None:  # mixed precision: run in the dtype eager PyTorch would use (fastbridge/ops/_autocast.py)
        q, k, v, prefix_k, prefix_v = _autocast.cast(amp, q, k, v, prefix_k, prefix_v)
    H, D, scale = _validate(q, k, v, prefix_k, prefix_v, gate, causal, scale, gate_fn, key_padding_mask)
    s = D ** -0.5 if scale is None else scale
    if _backend.select(OP, q.device, _kernel_unavailable(q, (k, v, prefix_k, prefix_v, gate))) == "reference":
        return ref.gated_attention(q, k, v, prefix_k, prefix_v, gate, causal=causal, scale=s, gate_fn=gate_fn,
                                   key_padding_mask=key_padding_mask)
    g = ref.gate_values(gate, gate_fn, H, torch.float32)
    out, _, _ = _gated_attention_op(q, k, v, prefix_k, prefix_v, g, causal, s, key_padding_mask)
    return out
