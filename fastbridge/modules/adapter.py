"""BottleneckAdapter: y = residual + scale · tanh(gate)? · up(act(down(LN?(x)))) as one fused op."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .. import _stats
from .. import reference as ref
from ..ops import adapter_block
from ..ops.adapter_block import _kernel_unavailable

STATS_NAME = "fastbridge.BottleneckAdapter"  # fastbridge.stats(): this module's calls

# AdapterHub's presets (HoulsbyConfig / PfeifferConfig: reduction factor 16, swish / relu), and the
# BLIP adapter study's residual bottleneck after each FFN (r = 64 at d = 768, GELU as in BLIP's FFN).
PRESETS = {
    "houlsby": dict(reduction_factor=16, activation="silu", layer_norm=False),
    "pfeiffer": dict(reduction_factor=16, activation="relu", layer_norm=False),
    "blip": dict(r=64, activation="gelu", layer_norm=False),
}


class BottleneckAdapter(nn.Module):
    """Residual bottleneck adapter, fused into one kernel forward and two backward.

    ``forward(x, residual=None)`` returns ``residual + s · up(act(down(LN?(x))))`` with residual
    defaulting to x and ``s = scale · tanh(gate)`` (gate only when ``gate=True``, zero-initialised,
    Flamingo style). The up-projection is zero-initialised, so a new adapter is the identity.

    ``fused`` (True by default) picks the fused op; ``fastbridge.unpatch(model)`` sets it False, which
    runs the plain nn.Linear / LayerNorm composition users run today (AdapterHub / BLIP adapter math).
    Parameters may be kept in float32 while activations run in half precision: they are cast to x's
    dtype in forward (differentiably), as autocast would.
    """

    _fastbridge_stats_name = STATS_NAME

    def __init__(self, d_model: int, r: Optional[int] = None, *, reduction_factor: Optional[int] = None,
                 activation: str = "gelu", layer_norm: bool = False, ln_eps: float = 1e-5, bias: bool = True,
                 scale: float = 1.0, learnable_scale: bool = False, gate: bool = False, init: str = "zero",
                 device=None, dtype=None):
        super().__init__()
        if r is None:
            if reduction_factor is None:
                raise ValueError("BottleneckAdapter: give the bottleneck width 'r' or a 'reduction_factor'")
            r = max(1, d_model // reduction_factor)
        if activation not in ref.ACTIVATIONS:
            raise ValueError(f"BottleneckAdapter: 'activation' must be one of {ref.ACTIVATIONS}, got {activation!r}")
        if init not in ("zero", "bert"):
            raise ValueError(f"BottleneckAdapter: 'init' must be 'zero' or 'bert', got {init!r}")
        fk = dict(device=device, dtype=dtype)
        self.d_model, self.r, self.activation = d_model, r, activation
        self.ln = nn.LayerNorm(d_model, eps=ln_eps, **fk) if layer_norm else None
        self.down = nn.Linear(d_model, r, bias=bias, **fk)
        self.up = nn.Linear(r, d_model, bias=bias, **fk)
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale), **fk))
        else:
            self.scale = float(scale)
        self.gate = nn.Parameter(torch.zeros((), **fk)) if gate else None
        self.fused = True
        self.reset_parameters(init)

    @classmethod
    def from_preset(cls, preset: str, d_model: int, **overrides) -> "BottleneckAdapter":
        if preset not in PRESETS:
            raise ValueError(f"BottleneckAdapter.from_preset: 'preset' must be one of {tuple(PRESETS)}, got {preset!r}")
        kw = dict(PRESETS[preset])
        if "r" in overrides:
            kw.pop("reduction_factor", None)
        kw.update(overrides)
        return cls(d_model, **kw)

    @classmethod
    def houlsby(cls, d_model: int, **kw) -> "BottleneckAdapter":
        return cls.from_preset("houlsby", d_model, **kw)

    @classmethod
    def pfeiffer(cls, d_model: int, **kw) -> "BottleneckAdapter":
        return cls.from_preset("pfeiffer", d_model, **kw)

    def reset_parameters(self, init: str = "zero") -> None:
        if init == "bert":  # Houlsby's near-identity init: small normal weights everywhere
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.normal_(self.up.weight, std=1e-2)
        else:  # LoRA-style: a trainable down-projection, a zero up-projection -> exact identity
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        for lin in (self.down, self.up):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.ln is not None:
            self.ln.reset_parameters()

    def extra_repr(self) -> str:
        s = self.scale if isinstance(self.scale, float) else "learnable"
        return (f"d_model={self.d_model}, r={self.r}, activation={self.activation}, layer_norm={self.ln is not None}, "
                f"scale={s}, gate={self.gate is not None}, fused={self.fused}")

    def _params(self, dt: torch.dtype):
        def c(t):
            return None if t is None else t.to(dt)

        ln = self.ln
        return (c(self.down.weight), c(self.down.bias), c(self.up.weight), c(self.up.bias),
                None if ln is None else ln.weight, None if ln is None else ln.bias, 1e-5 if ln is None else ln.eps)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        wd, bd, wu, bu, ln_w, ln_b, eps = self._params(x.dtype)
        if not self.fused:
            _stats.record(STATS_NAME, "fallback", "fused=False (fastbridge.unpatch): the eager composition")
            return self._eager(x, residual, wd, bd, wu, bu, ln_w, ln_b, eps)
        _stats.record_op(STATS_NAME, lambda: _kernel_unavailable(x, self.d_model, self.r))
        return adapter_block(x, wd, bd, wu, bu, ln_weight=ln_w, ln_bias=ln_b, eps=eps, activation=self.activation,
                             scale=self.scale, gate=self.gate, residual=residual)

    def _eager(self, x, residual, wd, bd, wu, bu, ln_w, ln_b, eps) -> Tensor:
        """The straightforward composition users run today (AdapterHub / the BLIP adapter study)."""
        dt = x.dtype
        h = x
        if ln_w is not None:
            h = F.layer_norm(x, (self.d_model,), ln_w.to(dt), None if ln_b is None else ln_b.to(dt), eps)
        u = F.linear(ref.apply_activation(F.linear(h, wd, bd), self.activation), wu, bu)
        s = self.scale if isinstance(self.scale, float) else self.scale.to(dt)
        if self.gate is not None:
            s = s * torch.tanh(self.gate).to(dt)
        return (x if residual is None else residual) + s * u
