"""fastbridge's mixed-precision policy, decided once for every fused op.

Under ``torch.autocast`` eager PyTorch runs matmuls, SDPA and linear layers in the autocast dtype (bf16 /
fp16) whatever dtype their inputs arrive in. fastbridge's ops are custom ops, which autocast does not cast
by itself, so without a rule an op would run in whatever dtype its inputs happened to have: fp32 when a
model's fp32 RoPE table or fp32 parameters promoted a tensor (the slow path on a GPU), or a dtype mismatch
between q (promoted) and v (not) -- a crash.

The rule (applied in each op's public function, before validation): when autocast is enabled for the
device type of the op's first tensor and that tensor is fp32 / fp16 / bf16 (autocast never touches
float64), the op's floating inputs that feed matmuls are cast to the autocast dtype, and the op runs in that dtype -- the dtype eager PyTorch would have
used for the same computation. What eager keeps in fp32 stays fp32:

* ``gated_attention`` / ``qformer_cross_attention`` / ``gated_cross_attention``: q, k, v (and the prompt's
  keys / values) run in the autocast dtype; gates, scales and additive masks keep their dtype; the output
  has the autocast dtype, as SDPA's under autocast.
* ``adapter_block``: the down / up projections run in the autocast dtype, and the residual is added in the
  residual's own dtype (eager: ``x + up(...)`` promotes the bf16 update back to an fp32 residual stream), so
  the op computes the update in the autocast dtype and adds it to the unrounded residual.

Gradients come back in each input's own dtype through the casts (ordinary autograd ops).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The dtype an op on ``t`` must run in under the active autocast, or None (autocast off for t's
    device type, or t is not a float type autocast casts)."""
    device_type = t.device.type
    if device_type not in ("cuda", "cpu", "xpu", "mps"):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None  # float64 is never autocast
    return torch.get_autocast_dtype(device_type)


def cast(dtype: torch.dtype, *tensors):
    """``tensors`` cast to ``dtype``; None, non-tensors (validation reports them) and tensors already of that
    dtype are returned as they are."""
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype else t
                 for t in tensors)
