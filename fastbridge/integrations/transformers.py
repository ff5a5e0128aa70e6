"""transformers integration: the ``"fastbridge"`` attention implementation (API.md).

Importing this module registers ``"fastbridge"`` with both of transformers' registries:

* ``AttentionInterface``: :func:`fastbridge_attention_forward`, the attention function: query, key,
  value (B, H, L, D) in, (B, L, H, D) out, ``(out, None)`` (no attention weights), dropout as the module
  passes it (HF modules pass their dropout only in training). It runs
  fastbridge.ops.qformer_cross_attention (C++/CUDA kernels) for the bidirectional attention it is
  written for -- BLIP-2 / InstructBLIP Q-Former self- and cross-attention -- and routes every case it
  cannot serve exactly to transformers' SDPA function, unchanged: causal attention (LLMs), grouped
  query attention, sliding windows, soft-capping, attention sinks, position biases, flex BlockMasks, a
  paged cache, or inputs the kernels cannot run (head dim / dtype / device, see the op).
* ``AttentionMaskInterface``: transformers' SDPA mask builder (boolean masks, True = attend; None when
  nothing is masked). Without a mask function registered, transformers builds *no* padding mask for
  an unknown implementation name and silently attends to padding.

``attn_implementation="fastbridge"`` (or ``{"qformer_config": "fastbridge"}`` for BLIP-2 / InstructBLIP,
the per-sub-config form) then works like any built-in implementation; fastbridge.patch does it for the
Q-Former only (fastbridge/integrations/qformer.py).

Masks reaching the function: None; a boolean (B or 1, 1 or H, Lq, Lk) SDPA mask -- a key-padding mask
when its query dimension is broadcast (stride 0, how transformers builds padding masks), passed to
the kernels as a (B, Lk) key mask, else converted to an additive 0 / -inf mask; a float additive mask
(eager style), passed as is. A query row that sees no key gives 0 (SDPA would give NaN).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _stats

NAME = "fastbridge"

__all__ = ["NAME", "fastbridge_attention_forward", "register", "is_registered", "fallback_reason"]

# kwargs that select attention variants the kernels do not implement: any non-None value routes to SDPA
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "cache", "block_mask",
                       "cu_seq_lens_q", "cu_seq_lens_k")


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def fallback_reason(module, query, key, value, attention_mask, is_causal=None, **kwargs) -> Optional[str]:
    """Why this call goes to SDPA instead of the fastbridge kernels (None: the kernels serve it exactly)."""
    from ..ops.qformer_cross_attention import _kernel_unavailable

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if causal:
        return "causal attention (the kernels implement bidirectional Q-Former attention)"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} is not supported by the fastbridge kernels"
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
        return "query / key / value are not (B, H, L, D) with matching key and value"
    if key.shape[1] != query.shape[1]:
        return "grouped-query attention (fewer key / value heads than query heads)"
    if query.shape[0] not in (1, key.shape[0]) or query.shape[-1] != key.shape[-1] or key.shape[2] == 0:
        return "query and key batch / head dim do not match"
    if query.dtype != key.dtype or query.dtype != value.dtype:
        return "query, key and value dtypes differ"
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            return f"attention mask of type {type(attention_mask).__name__} (e.g. a flex BlockMask)"
        if attention_mask.dim() not in (2, 4):
            return f"a {attention_mask.dim()}-d attention mask"
        shape, want = attention_mask.shape, (key.shape[0], query.shape[1], query.shape[2], key.shape[2])
        if attention_mask.dim() == 2:
            want = (want[0], want[3])  # (B, Lk) padding mask
        if shape[-1] != want[-1] or any(s not in (1, w) for s, w in zip(shape, want)):
            return f"attention mask of shape {tuple(shape)} does not fit {want}"
        if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            return f"attention mask of dtype {attention_mask.dtype}"
    if _backend.current_backend() == "auto":  # "kernel" raises in the op instead; "reference" runs the reference
        mask = None if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask
        return _kernel_unavailable(query, mask, key, value)
    return None


def _convert_mask(mask: Optional[torch.Tensor], B: int, Lq: int, Lk: int) -> Optional[torch.Tensor]:
    """transformers' mask -> the op's attn_mask: a bool (B, Lk) key mask where it is one, else additive."""
    if mask is None:
        return None
    if mask.dim() == 2:  # (B, Lk): a padding mask (bool / integer, 1 = attend) or an additive float mask
        return mask.to(torch.bool).expand(B, Lk) if not mask.is_floating_point() else mask[:, None, None, :]
    if mask.dtype != torch.bool:
        return mask  # additive (eager style), broadcastable to (B, H, Lq, Lk)
    if mask.shape[1] == 1 and (mask.shape[2] == 1 or mask.stride(2) == 0):
        return mask[:, 0, 0, :].expand(B, Lk)  # a key-padding mask: the kernels' key mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def fastbridge_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                 scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers AttentionInterface function ``"fastbridge"``: (B, H, L, D) in, ((B, L, H, D), None) out."""
    reason = fallback_reason(module, query, key, value, attention_mask, is_causal=is_causal, **kwargs)
    if reason is not None:
        _stats.record(_stats.ATTENTION, "fallback", f"transformers' SDPA: {reason}")
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    from ..ops import qformer_cross_attention

    if _backend.current_backend() == "reference":
        _stats.record(_stats.ATTENTION, "reference", "backend 'reference' selected")
    else:
        _stats.record(_stats.ATTENTION, "fused")
    B, Lq, Lk = key.shape[0], query.shape[2], key.shape[2]
    mask = _convert_mask(attention_mask, B, Lq, Lk)
    out = qformer_cross_attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


def is_registered() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    return (AttentionInterface._global_mapping.get(NAME) is fastbridge_attention_forward
            and NAME in AttentionMaskInterface._global_mapping)


def register() -> None:
    """Register ``"fastbridge"`` with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fastbridge_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
