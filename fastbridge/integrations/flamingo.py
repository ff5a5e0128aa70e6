"""fastbridge.patch for Flamingo-style gated cross-attention in transformers: Llama 3.2 Vision (mllama) and IDEFICS.

Patched layers (the exact classes, not subclasses of them, whose forward may differ):

* ``MllamaCrossAttentionDecoderLayer`` (``MllamaForConditionalGeneration`` / ``MllamaForCausalLM``): the
  layer runs ``input_layernorm`` → q_proj + per-head ``q_norm`` / k_proj + ``k_norm`` / v_proj (GQA), the
  cross-attention K/V cache exactly as transformers does (``cache.update`` on the layer's slot when vision
  states come in, the cached keys / values on decoding steps) →
  ``fastbridge.ops.gated_cross_attention(q, k, v, visibility, segment_len=…, gate=cross_attn_attn_gate)``
  → ``o_proj`` → residual, then the gated MLP with ``full_text_row_masked_out_mask`` as transformers. The
  tanh gate is folded into the op (``tanh(g)·o_proj(x) = o_proj(tanh(g)·x)``: o_proj has no bias) when the
  gate has the hidden states' dtype; otherwise it is applied after o_proj as transformers does.
* ``IdeficsGatedCrossAttentionLayer`` (``IdeficsForVisionText2Text``): q/k/v projections (+ the optional
  q/k RMSNorms), the op, ``o_proj``, the ``cross_attention_gate`` zeroing of rows that see no image, then
  ``tanh(alpha_cross_attn)`` — folded into the op when it is a scalar (``alpha_type="float"``), applied
  after o_proj per channel when it is a vector — and the MLP with ``tanh(alpha_dense)`` as transformers.
  transformers does not cache IDEFICS cross-attention K/V (the layer is called with ``cache=None``; the
  image hidden states are reused while generating and projected again at each step): the same here.

Masks. Both models hand the layer a dense additive (B, 1, Lq, Lk) mask built from the per-image (and, for
mllama, per-tile) mask: 0 where a query may see a key, ``finfo(dtype).min`` elsewhere. The structured
visibility the op takes — (B, Lq, S) over S segments of ``segment_len`` keys — is derived from it exactly
once per mask tensor (cached: every layer of one forward shares the tensor): values must be 0 or
``finfo.min`` (anything else — a bias, -inf — runs the original forward); ``segment_len`` is the gcd of
Lk and every key position where some row's visibility changes, so the mask is constant on each segment by
construction (an image's tiles all seen together merge into one segment; one tile is 1601 tokens in
Llama 3.2 Vision). A row that sees no key at all gets what transformers' softmax over a constant row gives,
the mean over all keys (every segment visible): mllama's rows without an image arrive all-zero
(``full_text_row_masked_out_mask``), IDEFICS zeroes them after the attention (``cross_attention_gate``).

Under ``torch.compile`` the per-tensor check cannot branch on data: the segment length is then the one
``patch`` read from the model's config (mllama: the vision model's tokens per tile; IDEFICS: the image
tokens per image) and the structure / values are checked with ``torch._assert_async`` (a mask that is
not segment-structured raises instead of falling back).

Fallbacks (the original forward, same results at eager speed, one ``FastbridgeFallbackWarning`` per
reason; ``stats`` counts each path): attention implementations other than eager / sdpa, attention weights
being recorded (``output_attentions``), dropout in training, hooks on the inner attention module (other
than transformers' own inactive output-capturing hooks), masks as above. A layer with an instance-level
``forward`` (accelerate's hooks) is not patched, with a one-time warning.

``patch`` swaps the layer's class for a module-level subclass (``FusedMllamaCrossAttentionDecoderLayer``,
``FusedIdeficsGatedCrossAttentionLayer``; picklable, deepcopy-able, state dict unchanged); ``unpatch``
swaps it back.
"""
from __future__ import annotations

import importlib
import logging
import math
import sys
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _stats
from .._backend import FastbridgeFallbackWarning
from . import _compat

__all__ = ["MLLAMA", "IDEFICS", "matches_mllama", "matches_idefics", "patch", "unpatch", "patch_model",
           "unpatch_model", "stats"]

logger = logging.getLogger("fastbridge")

MLLAMA = "transformers.MllamaCrossAttention"
IDEFICS = "transformers.IdeficsGatedCrossAttention"
IMPLEMENTATIONS = ("eager", "sdpa")

# kind -> (transformers module, base class name, fused class name)
_CLASSES = {
    MLLAMA: ("transformers.models.mllama.modeling_mllama", "MllamaCrossAttentionDecoderLayer",
             "FusedMllamaCrossAttentionDecoderLayer"),
    IDEFICS: ("transformers.models.idefics.modeling_idefics", "IdeficsGatedCrossAttentionLayer",
              "FusedIdeficsGatedCrossAttentionLayer"),
}
_SEGMENT_HINT = "_fastbridge_segment_len"  # instance attribute set by patch_model (an int)

# How many calls took each path, for tests and diagnostics: "<kind> fused" and "<kind> fallback: <reason>"
# (fastbridge.stats(model) has the same per integration, split into kernel / reference runs). Not counted
# while torch.compile traces: a counter changing every call would be specialised into the graph.
stats: Counter = Counter()
_warned: set[tuple[str, str]] = set()


def _count(key: str) -> None:
    if not torch.compiler.is_compiling():
        stats[key] += 1


# --------------------------------------------------------------------------------------------- compat
def _cache_arg(cache, kwargs: dict):
    """The KV cache the layer received under any spelling (integrations/_compat.py); removed from kwargs."""
    if cache is None:
        _, cache = _compat.get_cache(kwargs)
    for name in _compat.CACHE_KWARGS:
        kwargs.pop(name, None)
    return cache


# ------------------------------------------------------------------------------------ classes / patch
def _base_class(kind: str):
    mod_name, cls_name, _ = _CLASSES[kind]
    mod = sys.modules.get(mod_name)  # only imported classes: a model of a class never imported cannot exist
    return None if mod is None else getattr(mod, cls_name, None)


def _fused_class(kind: str):
    mod_name, cls_name, fused_name = _CLASSES[kind]
    cls = globals().get(fused_name)
    if cls is None:
        base = getattr(importlib.import_module(mod_name), cls_name)
        forward = _mllama_forward if kind == MLLAMA else _idefics_forward
        cls = type(fused_name, (base,), {
            "forward": forward, "__module__": __name__, "__qualname__": fused_name,
            "__doc__": f"{cls_name} running fastbridge.ops.gated_cross_attention (fastbridge.patch).",
            "_fastbridge_base": base, "_fastbridge_kind": kind})
        globals()[fused_name] = cls
    return cls


def __getattr__(name: str):
    # PEP 562: unpickling a patched model in a fresh process finds the fused classes by name
    for kind, (_, _, fused_name) in _CLASSES.items():
        if name == fused_name:
            return _fused_class(kind)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _matches(kind: str, module: nn.Module) -> bool:
    base = _base_class(kind)
    if base is None or type(module) is not base:
        return False
    if "forward" in module.__dict__ or "_old_forward" in module.__dict__:
        # an instance forward (accelerate's hooks) would shadow the class swap: say so, leave it alone
        _warn(kind, "the layer has an instance-level forward (accelerate hook?); left unpatched")
        return False
    return True


def matches_mllama(module: nn.Module) -> bool:
    return _matches(MLLAMA, module)


def matches_idefics(module: nn.Module) -> bool:
    return _matches(IDEFICS, module)


def patch(module: nn.Module, **_options) -> None:
    kind = MLLAMA if matches_mllama(module) else IDEFICS if matches_idefics(module) else None
    if kind is not None:
        module.__class__ = _fused_class(kind)


def unpatch(module: nn.Module) -> None:
    base = getattr(type(module), "_fastbridge_base", None)
    if base is not None:
        module.__class__ = base
    module.__dict__.pop(_SEGMENT_HINT, None)


def patch_model(model: nn.Module, **_options) -> None:
    """Give each patched layer the segment length the model's config implies (used under torch.compile)."""
    hint = _segment_hint(model)
    for m in model.modules():
        if getattr(type(m), "_fastbridge_base", None) is not None and hint:
            setattr(m, _SEGMENT_HINT, int(hint))


def unpatch_model(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop(_SEGMENT_HINT, None)


def _segment_hint(model: nn.Module) -> Optional[int]:
    vision = getattr(getattr(model, "model", model), "vision_model", None)
    n = getattr(vision, "num_patches", None)  # mllama: tokens per tile
    if isinstance(n, int):
        return n
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) == "idefics":
        if getattr(cfg, "use_resampler", False):
            return int(cfg.perceiver_config.resampler_n_latents)
        vc = cfg.vision_config
        return (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
    return None


# ------------------------------------------------------------------------------------------ fallbacks
def _warn(kind: str, reason: str) -> None:
    if (kind, reason) not in _warned:
        _warned.add((kind, reason))
        msg = (f"fastbridge ({kind}): running transformers' original forward ({reason}); results are the same, "
               "only speed and memory differ. This message is shown once.")
        logger.info(msg)
        warnings.warn(msg, FastbridgeFallbackWarning, stacklevel=4)


def _fallback(module: nn.Module, reason: str, args: tuple, kwargs: dict):
    kind = type(module)._fastbridge_kind
    _count(f"{kind} fallback: {reason}")
    _stats.record(kind, "fallback", reason)
    _warn(kind, reason)
    return type(module)._fastbridge_base.forward(module, *args, **kwargs)


def _common_reason(attn: nn.Module, dropout: float, training: bool, kwargs: dict) -> Optional[str]:
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if impl not in IMPLEMENTATIONS:
        return f"attention implementation {impl!r} (fused for {IMPLEMENTATIONS})"
    if _compat.recording_attentions(kwargs):
        return "attention weights requested (output_attentions)"
    if training and float(dropout or 0.0) > 0.0:
        return "dropout in training"
    if _compat.foreign_hooks(attn) or "forward" in attn.__dict__:
        return "hooks or an instance forward on the inner attention module"
    return None


# ------------------------------------------------------------------------------------------ the mask
@dataclass
class _Plan:
    visibility: Optional[Tensor]   # (B, Lq, S) bool, None = every key visible
    segment_len: Optional[int]
    lk: Optional[int]              # the key length the mask covers (None: any)


_plan_cache: dict = {}


def _mask_plan(mask, B: int, Lq: int):
    """The op's structured visibility for a dense additive (B, 1, Lq, Lk) mask: a _Plan, or why not (str)."""
    if mask is None:
        return _Plan(None, None, None)
    if not isinstance(mask, Tensor):
        return f"attention mask of type {type(mask).__name__}"
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or mask.shape[2] != Lq:
        return f"attention mask of shape {tuple(mask.shape)} (expected (B, 1, Lq, Lk))"
    if not mask.is_floating_point():
        return f"attention mask of dtype {mask.dtype} (expected an additive float mask)"
    try:
        version = mask._version
    except RuntimeError:  # inference-mode tensors have no version counter (and cannot be modified)
        version = -1
    key = (B, Lq, version)
    hit = _plan_cache.get("last")
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    plan = _derive_plan(mask, B)
    try:
        _plan_cache["last"] = (weakref.ref(mask), key, plan)
    except TypeError:  # pragma: no cover - tensors support weak references
        pass
    return plan


def _visible(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(visible (Bm, Lq, Lk) bool with rows that see nothing made all-visible, values-ok bool scalar)."""
    m = mask[:, 0]
    visible = m == 0
    masked = m == torch.finfo(m.dtype).min
    ok = (visible | masked).all()
    # softmax over a row of equal finfo.min scores is the uniform mean over all keys, as every key visible
    visible = visible | ~visible.any(-1, keepdim=True)
    return visible, ok


@torch.no_grad()
def _derive_plan(mask: Tensor, B: int):
    Lk = mask.shape[-1]
    visible, ok = _visible(mask)
    if not bool(ok):
        return "additive attention mask with values other than 0 and finfo(dtype).min (a bias or -inf)"
    if bool(visible.all()):
        return _Plan(None, None, Lk)
    change = (visible[..., 1:] != visible[..., :-1]).flatten(0, -2).any(0)  # (Lk - 1,)
    seg = math.gcd(Lk, *(change.nonzero().flatten() + 1).tolist())
    vis = visible[..., ::seg].expand(B, -1, -1).contiguous()  # (B, Lq, S): constant on each segment
    return _Plan(vis, seg, Lk)


def _compiled_plan(module: nn.Module, mask, B: int, Lq: int, Lk: int) -> _Plan:
    """The plan without data-dependent branching (torch.compile): the config's segment length, checked async."""
    if mask is None:
        return _Plan(None, None, None)
    Lk = mask.shape[-1]
    seg = getattr(module, _SEGMENT_HINT, None)
    if not seg or Lk % seg:
        seg = 1
    visible, ok = _visible(mask)
    vis = visible[..., ::seg]
    same = (visible == vis.repeat_interleave(seg, dim=-1)).all()
    torch._assert_async(ok & same, "fastbridge: the cross-attention mask is not segment-structured with 0 / "
                                   "finfo.min values (run without torch.compile to fall back to transformers)")
    return _Plan(vis.expand(B, -1, -1), seg, Lk)


def _plan_for(module: nn.Module, mask, B: int, Lq: int, Lk: int):
    if torch.compiler.is_compiling():
        return _compiled_plan(module, mask, B, Lq, Lk)
    return _mask_plan(mask, B, Lq)


def _attend(kind: str, q: Tensor, k: Tensor, v: Tensor, plan: _Plan, gate: Optional[Tensor], scale: float) -> Tensor:
    from ..ops import gated_cross_attention
    from ..ops._autocast import autocast_dtype
    from ..ops.gated_cross_attention import _kernel_unavailable

    # under autocast transformers' attention runs its matmuls in the autocast dtype, whatever q / k / v
    # arrive in (the per-head RMSNorms hand back fp32 q / k with fp32 weights): the op does the same
    dt = autocast_dtype(q)
    if dt is not None:
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if plan.lk is not None and k.shape[2] != plan.lk:
        raise RuntimeError(f"fastbridge: the cross-attention mask covers {plan.lk} keys but the layer has "
                           f"{k.shape[2]} vision keys")
    _count(f"{kind} fused")
    _stats.record_op(kind, lambda: _kernel_unavailable(q, (k, v, gate)))
    return gated_cross_attention(q, k, v, plan.visibility, segment_len=plan.segment_len, gate=gate,
                                 gate_fn="tanh", scale=scale)


def _foldable(gate: Tensor, ref: Tensor, o_proj: nn.Module) -> bool:
    return (gate.dim() <= 1 and gate.numel() == 1 and gate.dtype == ref.dtype and type(o_proj) is nn.Linear
            and o_proj.bias is None)


# ------------------------------------------------------------------------------------------ mllama
def _mllama_forward(self, hidden_states, cross_attention_states=None, cross_attention_mask=None, attention_mask=None,
                    full_text_row_masked_out_mask=None, position_ids=None, cache=None, use_cache=False,
                    position_embeddings=None, **kwargs):
    """MllamaCrossAttentionDecoderLayer.forward with one fused gated cross-attention call (module docstring)."""
    cache = _cache_arg(cache, kwargs)
    attn = self.cross_attn
    B, Lq, _ = hidden_states.shape
    Lk = cross_attention_states.shape[1] if cross_attention_states is not None else -1
    reason = _common_reason(attn, attn.dropout, attn.training, kwargs)
    if reason is None and cross_attention_states is None and cache is None:
        reason = "neither vision states nor a cache"
    plan = None
    if reason is None:
        plan = _plan_for(self, cross_attention_mask, B, Lq, Lk)
        if isinstance(plan, str):
            reason = plan
    if reason is not None:
        return _fallback(self, reason, (hidden_states,), dict(
            cross_attention_states=cross_attention_states, cross_attention_mask=cross_attention_mask,
            attention_mask=attention_mask, full_text_row_masked_out_mask=full_text_row_masked_out_mask,
            position_ids=position_ids, use_cache=use_cache, position_embeddings=position_embeddings,
            **{_compat.cache_keyword(): cache}, **kwargs))

    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    H, Hkv, D = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q = attn.q_norm(attn.q_proj(h).view(B, Lq, H, D).transpose(1, 2))
    if cross_attention_states is not None:
        k = attn.k_proj(cross_attention_states).view(B, -1, Hkv, D).transpose(1, 2)
        v = attn.v_proj(cross_attention_states).view(B, -1, Hkv, D).transpose(1, 2)
        k = attn.k_norm(k)
        if cache is not None:
            k, v = _compat.update_cache(cache, _compat.cache_keyword(), k, v, attn.layer_idx, kwargs)
    else:
        k, v = _compat.cached_kv(cache, attn.layer_idx)
    gate = self.cross_attn_attn_gate
    fold = _foldable(gate, h, attn.o_proj)
    out = _attend(MLLAMA, q, k, v, plan, gate if fold else None, float(attn.scaling))
    out = attn.o_proj(out.transpose(1, 2).reshape(B, Lq, -1))
    hidden_states = residual + out if fold else residual + gate.tanh() * out

    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    hidden_states = residual + self.cross_attn_mlp_gate.tanh() * hidden_states
    return hidden_states


# ------------------------------------------------------------------------------------------ IDEFICS
def _idefics_forward(self, hidden_states, attention_mask=None, image_hidden_states=None, image_attention_mask=None,
                     cross_attention_gate=None, cache=None, **kwargs):
    """IdeficsGatedCrossAttentionLayer.forward with one fused gated cross-attention call (module docstring)."""
    cache = _cache_arg(cache, kwargs)
    attn = self.cross_attn
    if image_hidden_states is None or cross_attention_gate is None or cache is not None:
        # transformers raises a ValueError / NotImplementedError for these: let it
        return type(self)._fastbridge_base.forward(self, hidden_states, attention_mask, image_hidden_states,
                                                   image_attention_mask, cross_attention_gate,
                                                   **{_compat.cache_keyword(): cache}, **kwargs)
    reason = None
    if not (isinstance(self.act_cross_attn, nn.Tanh) and isinstance(self.act_dense, nn.Tanh)):
        reason = "gate activations other than tanh"
    elif not attn.is_cross_attention or image_hidden_states.dim() != 3:
        reason = "not a cross-attention layer over (B, Lk, d) image states"
    else:
        dropout = max(float(self.config or 0.0), float(attn.dropout or 0.0))  # self.config is the dropout p
        reason = _common_reason(attn, dropout, self.training, kwargs)
    B, Lq, _ = hidden_states.shape
    plan = None
    if reason is None:
        plan = _plan_for(self, image_attention_mask, B, Lq, image_hidden_states.shape[1])
        if isinstance(plan, str):
            reason = plan
    if reason is not None:
        return _fallback(self, reason, (hidden_states,), dict(
            attention_mask=attention_mask, image_hidden_states=image_hidden_states,
            image_attention_mask=image_attention_mask, cross_attention_gate=cross_attention_gate,
            **{_compat.cache_keyword(): cache}, **kwargs))

    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    H, D = attn.num_heads, attn.head_dim
    Lk = image_hidden_states.shape[1]
    q = attn.q_proj(h).view(B, Lq, H, D).transpose(1, 2)
    k = attn.k_proj(image_hidden_states).view(B, Lk, H, D).transpose(1, 2)
    v = attn.v_proj(image_hidden_states).view(B, Lk, H, D).transpose(1, 2)
    if attn.qk_layer_norms:
        q = attn.q_layer_norm(q)
        k = attn.k_layer_norm(k)
    alpha = self.alpha_cross_attn
    fold = _foldable(alpha, h, attn.o_proj)
    out = _attend(IDEFICS, q, k, v, plan, alpha.reshape(()) if fold else None, float(attn.scaling))
    out = attn.o_proj(out.transpose(1, 2).reshape(B, Lq, -1))
    out = F.dropout(out, p=self.config, training=self.training)
    out = out.masked_fill((cross_attention_gate == 0)[:, :, None], 0.0)
    hidden_states = residual + out if fold else residual + self.act_cross_attn(alpha) * out

    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = F.dropout(hidden_states, p=self.config, training=self.training)
    hidden_states = residual + self.act_dense(self.alpha_dense) * hidden_states
    return hidden_states
