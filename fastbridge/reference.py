"""Eager, float-accurate PyTorch references of every fastbridge op (API.md).

The single reference shared by the tests (run in float64), the benchmarks and the CPU fallback.
Half-precision inputs are computed in float32 and the result cast back to the input dtype; float64
stays float64. Every function is differentiable through ordinary autograd. Inputs are assumed
valid: fastbridge.ops validates before calling here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "apply_activation", "adapter_block", "gated_attention", "qformer_cross_attention",
           "compute_dtype", "gate_values"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "relu":
        return F.relu(z)
    if name == "silu":
        return F.silu(z)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def adapter_block(x, w_down, b_down, w_up, b_up, *, ln_weight=None, ln_bias=None, eps=1e-5,
                  activation="gelu", scale=1.0, gate=None, residual=None):
    """y = residual + s * up(act(down(LN?(x)))), s = scale * tanh(gate)?; residual defaults to x."""
    cdt = compute_dtype(x.dtype)
    h = x.to(cdt)
    if ln_weight is not None:
        h = F.layer_norm(h, (x.shape[-1],), ln_weight.to(cdt), _as(ln_bias, cdt), eps)
    z = F.linear(h, w_down.to(cdt), _as(b_down, cdt))
    u = F.linear(apply_activation(z, activation), w_up.to(cdt), _as(b_up, cdt))
    s = scale.to(cdt) if isinstance(scale, torch.Tensor) else scale
    if gate is not None:
        s = s * torch.tanh(gate.to(cdt)).reshape(())
    res = x if residual is None else residual
    return (res.to(cdt) + s * u).to(x.dtype)


def gate_values(gate: torch.Tensor, gate_fn: str, H: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-head gate multiplier g (H,): tanh(gate) or gate itself, broadcast from () / (1,)."""
    g = gate.to(dtype)
    if gate_fn == "tanh":
        g = torch.tanh(g)
    elif gate_fn != "identity":
        raise ValueError(f"gate_fn: expected 'tanh' or 'identity', got {gate_fn!r}")
    return g.reshape(-1).expand(H) if g.numel() == 1 else g.reshape(H)


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim where rows with no visible (finite) score are exactly 0 (never NaN); an
    empty last dim (no keys at all) included."""
    if scores.shape[-1] == 0:
        return scores.clone()
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    p = torch.exp(scores - torch.where(empty, torch.zeros_like(row_max), row_max))
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(empty, torch.ones_like(denom), denom)


def _attention_inputs(q, k, v, scale):
    """The attention references' common start: the compute dtype, the scale (default D**-0.5), and q, k, v in
    that dtype with each KV head repeated for its GQA group of query heads."""
    cdt = compute_dtype(q.dtype)
    rep = q.shape[1] // k.shape[1]
    s = q.shape[-1] ** -0.5 if scale is None else scale
    kc, vc = (t.to(cdt).repeat_interleave(rep, dim=1) for t in (k, v))
    return cdt, s, q.to(cdt), kc, vc


def gated_attention(q, k, v, prefix_k, prefix_v, gate, *, causal=True, scale=None, gate_fn="tanh",
                    key_padding_mask=None):
    """out = softmax(q kᵀ·s + mask) v + g · softmax(q prefix_kᵀ·s) prefix_v  (two separate softmaxes).

    q (B,H,Lq,D); k, v (B,Hkv,Lk,D); prefix_k/v (1 or B, Hkv, P, D); gate (), (1,) or (H,).
    Causal masking is bottom-right aligned (query i sees keys j <= i + Lk - Lq); prefix keys are always
    visible. A query with no visible main key (Lk = 0 included) gets 0 from the main branch.
    """
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    cdt, s, qc, kc, vc = _attention_inputs(q, k, v, scale)
    pk, pv = (t.to(cdt).expand(B, -1, -1, -1).repeat_interleave(H // k.shape[1], dim=1) for t in (prefix_k, prefix_v))

    visible = None
    if causal:
        i = torch.arange(Lq, device=q.device).view(Lq, 1)
        j = torch.arange(Lk, device=q.device).view(1, Lk)
        visible = (j <= i + (Lk - Lq)).view(1, 1, Lq, Lk)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(B, 1, 1, Lk)
        visible = kpm if visible is None else visible & kpm
    main = _masked_softmax(qc @ kc.transpose(-1, -2) * s, visible) @ vc
    pref = torch.softmax(qc @ pk.transpose(-1, -2) * s, dim=-1) @ pv
    out = main + gate_values(gate, gate_fn, H, cdt).reshape(1, H, 1, 1) * pref
    return out.to(q.dtype)


def qformer_cross_attention(q, k, v, *, attn_mask=None, scale=None, dropout_p=0.0, generator=None):
    """softmax(q kᵀ·s + mask) v with inverted dropout on the probabilities (training).

    q (B or 1, H, Lq, D); k, v (B, H, Lk, D). attn_mask: None, bool (B, Lk) key mask (True = attend)
    or an additive float mask broadcastable to (B, H, Lq, Lk). Rows with no visible key give 0.
    The reference's dropout draws from torch's RNG (``generator``), not the kernel's Philox stream.
    """
    B = k.shape[0]
    D = q.shape[-1]
    cdt = compute_dtype(q.dtype)
    s = D ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if qc.shape[0] != B:
        qc = qc.expand(B, -1, -1, -1)
    scores = qc @ kc.transpose(-1, -2) * s
    visible = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = attn_mask.view(B, 1, 1, -1)
            # masked keys influence nothing: NaN / inf in their k or v rows must not reach any row (0 * NaN)
            hidden = ~attn_mask.view(B, 1, -1, 1)
            kc, vc = kc.masked_fill(hidden, 0.0), vc.masked_fill(hidden, 0.0)
            scores = qc @ kc.transpose(-1, -2) * s
        else:
            scores = scores + attn_mask.to(cdt)
    p = _masked_softmax(scores, visible)
    if dropout_p > 0.0:
        keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32) >= dropout_p
        p = p * keep.to(cdt) / (1.0 - dropout_p)
    out = p @ vc
    return out.to(q.dtype)



def gated_cross_attention(q, k, v, visibility=None, *, segment_len=None, gate=None, gate_fn="tanh", scale=None):
    """Flamingo-style gated cross-attention: out = g · softmax(q kᵀ·s over the visible keys) v.

    q (B,H,Lq,D); k, v (B,Hkv,Lk,D), H % Hkv == 0. The Lk keys are S segments of ``segment_len`` keys
    (an image, a tile); visibility: bool (B, Lq, S), True = query i sees segment s, or None (every key
    visible). A query that sees no key gets exactly 0. gate: None, (), (1,) or (H,): g = tanh(gate) or
    gate itself per head (1 without a gate). Builds the dense Lq x Lk mask: this is the reference.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cdt, s, qc, kc, vc = _attention_inputs(q, k, v, scale)
    visible = None
    if visibility is not None:
        seg = Lk // max(visibility.shape[-1], 1) if segment_len is None else segment_len
        visible = visibility.repeat_interleave(seg, dim=-1).view(B, 1, Lq, Lk)
    if Lk == 0:  # nothing to see: 0, with q, k, v kept in the graph (zero gradients)
        out = qc[..., :1] * 0.0 * (kc.sum() + vc.sum()) + qc.new_zeros((B, H, Lq, D))
    else:
        out = _masked_softmax(qc @ kc.transpose(-1, -2) * s, visible) @ vc
    if gate is not None:
        out = out * gate_values(gate, gate_fn, H, cdt).reshape(1, H, 1, 1)
    return out.to(q.dtype)


__all__ += ["gated_cross_attention"]
