"""fastbridge.ops.gated_cross_attention: Flamingo-style gated cross-attention (Llama 3.2 Vision, IDEFICS).

    out = g_h · softmax(q kᵀ·s over the keys query i may see) v            (0 for a row that sees nothing)

Text queries q (B, H, Lq, D) over vision keys / values (B, Hkv, Lk, D) (GQA, never repeated). The keys
are S equal segments of ``segment_len`` tokens (an image tile of mllama: 1601 tokens; an IDEFICS image:
its perceiver latents) and the visibility is given in that structured form, bool (B, Lq, S), never as a
dense Lq x Lk mask: the kernel skips the segments no query of a tile can see.

The fused path is two torch.library custom ops (forward returns the log-sum-exp it saves; backward
recomputes the probabilities from it, FlashAttention-2 style):
  fastbridge::gated_cross_attention      (q, k, v, visibility?, segment_len, g?, scale) -> (out, lse)
  fastbridge::gated_cross_attention_bwd  -> (dq, dk, dv, dg)
``g`` is the per-head gate value (tanh(gate) or gate, expanded to (H,), fp32) built here with ordinary
autograd ops, so the op returns dL/dg and autograd carries it through tanh; without a gate the op gets
None and returns an empty dg. The "reference" backend calls fastbridge.reference.gated_cross_attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as ref
from . import _autocast
from . import _validate as V

OP = "gated_cross_attention"


# The same kernel limits as gated_attention: its launch configurations, so its head dims and shared-memory gap.
from .gated_attention import MAX_HEAD_DIM, _kernel_unavailable  # noqa: E402,F401


# ---------------------------------------------------------------------------------------- forward op
@torch.library.custom_op("fastbridge::gated_cross_attention", mutates_args=())
def _gated_cross_attention_op(
    q: Tensor, k: Tensor, v: Tensor, visibility: Optional[Tensor], segment_len: int, g: Optional[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    from ..kernels.gated_cross_attention import gated_cross_attention_forward

    return gated_cross_attention_forward(q, k, v, visibility, segment_len, g, scale)


@_gated_cross_attention_op.register_fake
def _(q, k, v, visibility, segment_len, g, scale):
    B, H, Lq, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B, H, Lq), dtype=torch.float32))


# --------------------------------------------------------------------------------------- backward op
@torch.library.custom_op("fastbridge::gated_cross_attention_bwd", mutates_args=())
def _gated_cross_attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, visibility: Optional[Tensor], segment_len: int,
    g: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.gated_cross_attention import gated_cross_attention_backward

    return gated_cross_attention_backward(dout, q, k, v, visibility, segment_len, g, out, lse, scale)


@_gated_cross_attention_bwd_op.register_fake
def _(dout, q, k, v, visibility, segment_len, g, out, lse, scale):
    # The kernels write fresh contiguous gradients; dg is (H,) fp32 with a gate, (0,) without.
    dg = q.new_empty((0,), dtype=torch.float32) if g is None else g.new_empty(g.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dg


def _setup_context(ctx, inputs, output):
    q, k, v, visibility, segment_len, g, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, visibility, g, out, lse)
    ctx.cfg = (segment_len, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, visibility, g, out, lse = ctx.saved_tensors
    segment_len, scale = ctx.cfg
    dq, dk, dv, dg = _gated_cross_attention_bwd_op(dout, q, k, v, visibility, segment_len, g, out, lse, scale)
    return dq, dk, dv, None, None, (None if g is None else dg), None


_gated_cross_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ public API
def _validate(q, k, v, visibility, segment_len, gate, gate_fn, scale) -> tuple[int, int, int]:
    """Checks every argument; returns (H, D, segment_len, scale) with segment_len resolved (Lk without visibility)
    and scale a float or None."""
    B, H, Lq, D, Hkv, Lk = V.attention_qkv(OP, q, k, v)
    if visibility is None:
        seg = Lk  # one segment, every key visible; segment_len is ignored
    else:
        if not isinstance(visibility, Tensor) or visibility.dtype != torch.bool:
            V.fail(OP, "visibility", "None or a bool tensor (True = query i sees segment s)",
                   getattr(visibility, "dtype", type(visibility).__name__))
        if visibility.dim() != 3 or tuple(visibility.shape[:2]) != (B, Lq):
            V.fail(OP, "visibility", f"of shape (B, Lq, S) = ({B}, {Lq}, S)", f"shape {tuple(visibility.shape)}")
        V.same_device_dtype(OP, "q", q, {"visibility": visibility}, dtype=False)
        S = visibility.shape[2]
        if segment_len is None:
            if S == 0 or Lk % S != 0:
                V.fail(OP, "segment_len", f"given: k's {Lk} keys do not split into visibility's S = {S} "
                       "equal segments", "None")
            seg = Lk // S
        else:
            if not isinstance(segment_len, int) or isinstance(segment_len, bool) or segment_len < 1:
                V.fail(OP, "segment_len", "None or a positive int (keys per segment)", repr(segment_len))
            if S * segment_len != Lk:
                V.fail(OP, "segment_len", f"such that S * segment_len == Lk (S = {S} segments in visibility, "
                       f"Lk = {Lk} keys in k)", repr(segment_len))
            seg = segment_len
    V.choice(OP, "gate_fn", gate_fn, ("tanh", "identity"))
    if gate is not None:
        V.tensor(OP, "gate", gate)
        V.scalar_param(OP, "gate", gate, allowed=((), (1,), (H,)))
        V.same_device_dtype(OP, "q", q, {"gate": gate}, dtype=False)
    if scale is not None:
        scale = V.real_number(OP, "scale", scale, "None or a positive float (finite)", positive=True)
    return H, D, seg, scale


def gated_cross_attention(q: Tensor, k: Tensor, v: Tensor, visibility: Optional[Tensor] = None, *,
                          segment_len: Optional[int] = None, gate: Optional[Tensor] = None, gate_fn: str = "tanh",
                          scale: Optional[float] = None) -> Tensor:
    """Flamingo-style gated cross-attention, fused (API.md).

    q (B, H, Lq, D) text queries; k, v (B, Hkv, Lk, D) vision keys / values, H % Hkv == 0 (GQA / MQA, K/V
    never repeated). The Lk keys are S equal segments of ``segment_len`` keys (S * segment_len == Lk;
    inferred as Lk / S when None); visibility: bool (B, Lq, S), True = query i may see segment s, or None
    (every key visible; segment_len ignored). out = softmax over the visible keys of (q kᵀ·scale) v per query
    row; a row that sees no key gives exactly 0 (zero gradient). gate: None, (), (1,) or (H,): out is
    multiplied per head by g = tanh(gate) ("tanh") or gate ("identity"). scale defaults to D**-0.5.
    Returns (B, H, Lq, D) in q's dtype; differentiable in q, k, v and gate.
    """
    amp = _autocast.autocast_dtype(q) if isinstance(q, Tensor) else None
    if amp is not None:  # mixed precision: run in the dtype eager PyTorch would use (fastbridge/ops/_autocast.py)
        q, k, v = _autocast.cast(amp, q, k, v)
    H, D, seg, scale = _validate(q, k, v, visibility, segment_len, gate, gate_fn, scale)
    s = D ** -0.5 if scale is None else scale
    if _backend.select(OP, q.device, _kernel_unavailable(q, (k, v, gate))) == "reference":
        return ref.gated_cross_attention(q, k, v, visibility, segment_len=seg, gate=gate, gate_fn=gate_fn,
                                         scale=s)
    g = None if gate is None else ref.gate_values(gate, gate_fn, H, torch.float32)
    out, _ = _gated_cross_attention_op(q, k, v, visibility, seg, g, s)
    return out
