"""fastbridge.ops.adapter_block: y = residual + s · up(act(down(LN?(x)))), fused (API.md).

Two torch.library custom ops carry the fused kernels, so dispatch modes, profilers and torch.compile
see them by name and FakeTensors get shapes without running a kernel:
  fastbridge::adapter_block      (x2d, …, scale: float, s: Tensor?, residual2d?) -> (y, z, mean, rstd)
  fastbridge::adapter_block_bwd  its backward
``s`` is the 0-d tensor part of the multiplier (a tensor scale times tanh(gate)), built here with
ordinary autograd ops, so the op only returns Σ dy·u as its gradient.
The "reference" backend calls fastbridge.reference.adapter_block with ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as ref
from . import _autocast
from . import _validate as V

OP = "adapter_block"


def _kernel_unavailable(x: Tensor, d: int, r: int) -> Optional[str]:
    reason = _backend.triton_unavailable_reason(x.device)
    if reason is None and x.dtype == torch.float64:
        reason = "the Triton kernel computes in fp32/fp16/bf16, not float64"
    if reason is None and r > 256:
        reason = f"the fused kernel supports a bottleneck r <= 256, got r={r}"
    return reason


# ---------------------------------------------------------------------------------------- forward op
@torch.library.custom_op("fastbridge::adapter_block", mutates_args=())
def _adapter_block_op(
    x: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
    ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float, activation: str, scale: float,
    s: Optional[Tensor], residual: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.adapter_block import adapter_forward

    x, residual = V.unit_last(x), None if residual is None else V.unit_last(residual)  # the kernels' row layout
    return adapter_forward(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, activation, scale, s, residual)


@_adapter_block_op.register_fake
def _(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, activation, scale, s, residual):
    n, r = x.shape[0], w_down.shape[0]
    n_stats = n if ln_weight is not None else 0
    # As the kernels allocate: fresh contiguous outputs, whatever the inputs' strides.
    return (x.new_empty(x.shape), x.new_empty((n, r)), x.new_empty((n_stats,), dtype=torch.float32),
            x.new_empty((n_stats,), dtype=torch.float32))


# --------------------------------------------------------------------------------------- backward op
@torch.library.custom_op("fastbridge::adapter_block_bwd", mutates_args=())
def _adapter_block_bwd_op(
    dy: Tensor, x: Tensor, w_down: Tensor, w_up: Tensor, b_up: Optional[Tensor], ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor], activation: str, scale: float, s: Optional[Tensor], z: Tensor, mean: Tensor,
    rstd: Tensor, has_residual: bool,
) -> list[Tensor]:
    """[dx, dw_down, db_down, dw_up, db_up, dln_w, dln_b, ds]; grads of absent inputs are 0-size."""
    from ..kernels.adapter_block import adapter_backward

    dy, x = V.unit_last(dy), V.unit_last(x)  # the kernels' row layout
    grads = list(adapter_backward(dy, x, w_down, w_up, b_up, ln_weight, ln_bias, activation, scale, s, z, mean,
                                  rstd, has_residual))
    grads[-1] = grads[-1] * scale  # d/ds of (scale·s)·Σ dy·u
    return [g if g is not None else x.new_empty(0) for g in grads]


@_adapter_block_bwd_op.register_fake
def _(dy, x, w_down, w_up, b_up, ln_weight, ln_bias, activation, scale, s, z, mean, rstd, has_residual):
    r = w_down.shape[0]

    def like(t):  # fresh contiguous gradients, as the kernels write them
        return x.new_empty(0) if t is None else t.new_empty(t.shape)

    return [like(x), like(w_down), x.new_empty((r,)), like(w_up),
            x.new_empty(w_up.shape[:1]), like(ln_weight), like(ln_bias),
            x.new_empty((), dtype=torch.float32)]


_adapter_block_bwd_op.register_autograd(V.no_double_backward(OP))


# --------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, activation, scale, s, residual = inputs
    _, z, mean, rstd = output
    ctx.save_for_backward(x, w_down, w_up, b_up, ln_weight, ln_bias, s, z, mean, rstd)
    ctx.cfg = (activation, scale, residual is not None, b_down is not None)
    ctx.mark_non_differentiable(z, mean, rstd)


def _backward(ctx, dy, _dz, _dmean, _drstd):
    x, w_down, w_up, b_up, ln_weight, ln_bias, s, z, mean, rstd = ctx.saved_tensors
    activation, scale, has_residual, has_b_down = ctx.cfg
    dx, dwd, dbd, dwu, dbu, dlw, dlb, ds = _adapter_block_bwd_op(
        dy, x, w_down, w_up, b_up, ln_weight, ln_bias, activation, scale, s, z, mean, rstd,
        has_residual)

    def opt(grad, t):
        return grad.to(t.dtype).reshape(t.shape) if t is not None else None

    return (dx, dwd, dbd if has_b_down else None, dwu, dbu if b_up is not None else None, opt(dlw, ln_weight),
            opt(dlb, ln_bias), None, None, None, opt(ds, s), dy if has_residual else None)


_adapter_block_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ public API
def _validate(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, activation, scale, gate, residual):
    V.tensor(OP, "x", x, min_ndim=1)
    d = x.shape[-1]
    if d == 0:
        V.fail(OP, "x", "of shape (..., d) with d >= 1", f"shape {tuple(x.shape)}")
    V.tensor(OP, "w_down", w_down, ndim=2)
    r = w_down.shape[0]
    if r == 0:
        V.fail(OP, "w_down", "of shape (r, d) with a bottleneck r >= 1", f"shape {tuple(w_down.shape)}")
    V.shape(OP, "w_down", w_down, (r, d), f"(r, d) = (r, {d}) (nn.Linear(d, r).weight)")
    V.tensor(OP, "w_up", w_up)
    V.shape(OP, "w_up", w_up, (d, r), f"(d, r) = ({d}, {r}) (nn.Linear(r, d).weight)")
    if b_down is not None:
        V.tensor(OP, "b_down", b_down)
        V.shape(OP, "b_down", b_down, (r,), f"(r,) = ({r},)")
    if b_up is not None:
        V.tensor(OP, "b_up", b_up)
        V.shape(OP, "b_up", b_up, (d,), f"(d,) = ({d},)")
    if ln_bias is not None and ln_weight is None:
        V.fail(OP, "ln_bias", "None when ln_weight is None (LayerNorm is enabled by ln_weight)", "a tensor")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            V.tensor(OP, name, t)
            V.shape(OP, name, t, (d,), f"(d,) = ({d},)")
    if residual is not None:
        V.tensor(OP, "residual", residual)
        if residual.shape != x.shape:
            V.fail(OP, "residual", f"of x's shape {tuple(x.shape)}", f"shape {tuple(residual.shape)}")
    V.same_device_dtype(OP, "x", x, {"w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up,
                                     "residual": residual})
    V.same_device_dtype(OP, "x", x, {"ln_weight": ln_weight, "ln_bias": ln_bias}, dtype=False)
    V.choice(OP, "activation", activation, ref.ACTIVATIONS)
    eps = V.real_number(OP, "eps", eps, "a positive float (finite)", positive=True)
    if isinstance(scale, Tensor):
        V.tensor(OP, "scale", scale)
        V.scalar_param(OP, "scale", scale, allowed=((),))
        V.same_device_dtype(OP, "x", x, {"scale": scale}, dtype=False)
    else:
        scale = V.real_number(OP, "scale", scale, "a float or a 0-d tensor (finite)")
    if gate is not None:
        V.tensor(OP, "gate", gate)
        V.scalar_param(OP, "gate", gate)
        V.same_device_dtype(OP, "x", x, {"gate": gate}, dtype=False)
    return d, r, eps, scale


def adapter_block(x: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor], *,
                  ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, eps: float = 1e-5,
                  activation: str = "gelu", scale: float | Tensor = 1.0, gate: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None) -> Tensor:
    """Fused bottleneck adapter residual block (API.md).

    x (..., d); w_down (r, d); b_down (r,) or None; w_up (d, r); b_up (d,) or None (nn.Linear layout).
    h = LayerNorm(x; ln_weight, ln_bias, eps) if ln_weight is not None else x;
    y = residual + s · up(act(down(h))), residual defaults to x, s = scale (float or 0-d tensor) times
    tanh(gate) when gate (shape () or (1,)) is given. Differentiable in every tensor argument (second order:
    the reference backend only; the fused backward raises NotImplementedError when differentiated).
    """
    amp = _autocast.autocast_dtype(x) if isinstance(x, Tensor) else None
    if amp is not None:
        # Mixed precision (fastbridge/ops/_autocast.py): the projections run in the autocast dtype, as eager's
        # nn.Linear would; the update is added to the residual in the residual's own dtype, as eager's
        # `x + update` does (an fp32 residual stream stays fp32). The op computes 0 + update: a zero
        # residual read with row stride 0 (no copy).
        res = x if residual is None else residual
        xa, wd, bd, wu, bu = _autocast.cast(amp, x, w_down, b_down, w_up, b_up)
        zero = xa.new_zeros(xa.shape[-1:]).expand(xa.shape) if xa.dim() >= 1 else None
        with torch.autocast(x.device.type, enabled=False):
            update = adapter_block(xa, wd, bd, wu, bu, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps,
                                   activation=activation, scale=scale, gate=gate, residual=zero)
        return res + update
    d, r, eps, scale = _validate(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, activation, scale, gate,
                                 residual)
    if _backend.select(OP, x.device, _kernel_unavailable(x, d, r)) == "reference":
        return ref.adapter_block(x, w_down, b_down, w_up, b_up, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps,
                                 activation=activation, scale=scale, gate=gate, residual=residual)

    # The tensor part of the multiplier, through ordinary autograd (its grad comes back as Σ dy·u).
    s = None
    float_scale = 1.0
    if isinstance(scale, Tensor):
        s = scale.float().reshape(())
    else:
        float_scale = float(scale)
    if gate is not None:
        t = torch.tanh(gate.float()).reshape(())
        s = t if s is None else s * t

    lead = x.shape[:-1]
    x2 = V.as_rows(x, d)
    res2 = V.as_rows(residual, d) if residual is not None else None
    y, _, _, _ = _adapter_block_op(x2, w_down, b_down, w_up, b_up, ln_weight, ln_bias, float(eps), activation,
                                   float_scale, s, res2)
    return y.reshape(*lead, d)
