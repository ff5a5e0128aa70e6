"""fastbridge.patch for PEFT AdaptionPrompt (LLaMA-Adapter) attention, llama and mistral.

PEFT's ``AdaptedAttention.forward`` runs the wrapped LlamaAttention / MistralAttention, then recomputes
q_proj + RoPE, repeats the prompt's keys / values over the batch (and over the GQA groups), runs the
prompt softmax eagerly and a second o_proj. The patched forward runs the layer once:

    q, k, v = q_proj / k_proj / v_proj (hidden), RoPE(q, k) from position_embeddings, KV-cache update
    pk, pv  = k_proj / v_proj (adaption_prompt)        (1, Hkv, P, D): broadcast over the batch, no RoPE
    out     = fastbridge.ops.gated_attention(q, k, v, pk, pv, adaption_gate, gate_fn="identity",
                                             causal=True, key_padding_mask=...)     (one fused call)
    return    o_proj(out) (+ o_proj.bias once more: PEFT applies o_proj, bias included, to each branch)

Masks. Hugging Face hands the attention a 4D mask (bool for sdpa, additive 0 / finfo.min for eager) or
None. The fused call takes ``causal=True`` plus a (B, Lk) key-padding mask, which expresses exactly the
causal + left/right padding masks built from a 2D ``attention_mask`` (prefill, training) and every
single-query (decoding) mask; sdpa's mask-free prefill (``None``, Lq > 1) is causal with the keys past Lq
cropped, as sdpa does for an empty static cache. The conversion is checked element by element once per
mask tensor (all layers of one forward share it). A mask it cannot express (sliding window in effect,
packed sequences, custom 4D masks or biases, eager attention with fully masked rows — below), another
attention implementation (flash / flex / paged), ``output_attentions`` or attention dropout in training
run PEFT's original forward instead — same results, eager speed — with a ``FastbridgeFallbackWarning``
once per reason (``stats`` counts the calls of each path).

Query rows with no visible key at all (the positions before the first token of a left-padded sample) get
0 from the main branch, as sdpa gives them. transformers' eager attention gives them the mean of all values
instead, and a causal-LM loss does read the last of those positions (it predicts the first real token), so
with ``attn_implementation="eager"`` such masks run PEFT's forward (decoding steps stay fused).

``unpatch`` removes the instance-level forward, restoring PEFT's class forward exactly (or, under an
accelerate hook, its saved ``_old_forward``).
"""
from __future__ import annotations

import logging
import sys
import types
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .._backend import FastbridgeFallbackWarning
from ..ops import gated_attention

logger = logging.getLogger("fastbridge")

NAME = "peft.AdaptionPrompt"
MODEL_TYPES = ("llama", "mistral")
IMPLEMENTATIONS = ("sdpa", "eager")
_PEFT_LAYER = "peft.tuners.adaption_prompt.layer"
_SAVED = "_fastbridge_peft_saved"  # (attribute name, the instance attribute it replaced or _MISSING)
_MISSING = object()
# kwargs that change the attention in ways the fused call does not reproduce
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks", "cu_seq_lens_q", "cu_seq_lens_k",
                       "max_length_q", "max_length_k", "cache", "is_causal")

# How many calls took each path, for tests and diagnostics: "fused" and "fallback: <reason>".
stats: Counter = Counter()
_warned: set[str] = set()


def _adapted_attention_class():
    mod = sys.modules.get(_PEFT_LAYER)  # PEFT modules exist only once PEFT is imported: no import here
    return None if mod is None else getattr(mod, "AdaptedAttention", None)


def matches(module: nn.Module) -> bool:
    cls = _adapted_attention_class()
    return (cls is not None and isinstance(module, cls) and getattr(module, "model_type", None) in MODEL_TYPES
            and all(hasattr(getattr(module, "model", None), n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")))


def _target(module: nn.Module) -> str:
    # accelerate's hooks replace `forward` on the instance and call the saved `_old_forward`
    return "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"


def patch(module: nn.Module, **_options) -> None:
    if _SAVED in module.__dict__:
        return
    target = _target(module)
    saved = module.__dict__.get(target, _MISSING)
    module.__dict__[_SAVED] = (target, saved)
    setattr(module, target, types.MethodType(_fused_forward, module))


def unpatch(module: nn.Module) -> None:
    target, saved = module.__dict__.pop(_SAVED, (None, None))
    if target is None:
        return
    if saved is _MISSING:
        module.__dict__.pop(target, None)
    else:
        setattr(module, target, saved)


def _original(module: nn.Module):
    _, saved = module.__dict__.get(_SAVED, (None, _MISSING))
    return saved if saved is not _MISSING else types.MethodType(type(module).forward, module)


def _fallback(module: nn.Module, reason: str, kwargs):
    stats[f"fallback: {reason}"] += 1
    if reason not in _warned:
        _warned.add(reason)
        msg = (f"fastbridge ({NAME}): running PEFT's original AdaptedAttention forward ({reason}); results are "
               "the same, only speed and memory differ. This message is shown once.")
        logger.info(msg)
        warnings.warn(msg, FastbridgeFallbackWarning, stacklevel=3)
    return _original(module)(**kwargs)


# ------------------------------------------------------------------------------------------ masks
@dataclass
class _Plan:
    kpm: Optional[Tensor]   # (B, Lk) bool, None = every key visible
    lk: Optional[int]       # key length the mask was built for (None: any)
    crop: bool = False      # sdpa's mask-free prefill: keys beyond Lq are cropped, causal top-left


_plan_cache: dict = {}


def _mask_plan(mask, B: int, Lq: int, impl: str):
    """How to run HF's attention mask exactly as causal + key padding: a _Plan, or why not (str)."""
    if mask is None:
        if Lq == 1:  # decoding without padding: every key is visible (sdpa and eager)
            return _Plan(None, None)
        if impl == "sdpa":  # sdpa: is_causal, keys beyond the queries cropped (empty static cache)
            return _Plan(None, None, crop=True)
        return "eager attention without a mask over several queries (bidirectional attention)"
    if not isinstance(mask, Tensor):
        return f"attention mask of type {type(mask).__name__}"
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[2] != Lq:
        return f"attention mask of shape {tuple(mask.shape)} (expected (B, 1, Lq, Lk))"
    try:
        version = mask._version
    except RuntimeError:  # inference-mode tensors have no version counter (and cannot be modified)
        version = -1
    key = (B, Lq, impl, version)
    hit = _plan_cache.get("last")
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    plan = _derive_plan(mask, B, Lq, impl)
    try:
        _plan_cache["last"] = (weakref.ref(mask), key, plan)
    except TypeError:  # pragma: no cover - tensors support weak references
        pass
    return plan


@torch.no_grad()
def _derive_plan(mask: Tensor, B: int, Lq: int, impl: str):
    Lk = mask.shape[-1]
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.is_floating_point():
        visible = mask == 0
        masked = mask <= torch.finfo(mask.dtype).min / 2  # finfo.min (HF eager) or -inf
        if not bool((visible | masked).all()):
            return "additive attention mask with values other than 0 and -inf/finfo.min (a bias)"
    else:
        return f"attention mask of dtype {mask.dtype}"
    if visible.shape[1] > 1 and not bool((visible == visible[:, :1]).all()):
        return "attention mask that differs between heads"
    vis = visible[:, 0]              # (Bm, Lq, Lk)
    kpm = vis[:, -1, :]              # the last query sees every non-padded key under a causal mask
    if Lq > 1:
        i = torch.arange(Lq, device=mask.device).view(Lq, 1)
        j = torch.arange(Lk, device=mask.device).view(1, Lk)
        causal = j <= i + (Lk - Lq)  # bottom-right aligned, as the op
        if not torch.equal(vis, causal.unsqueeze(0) & kpm.unsqueeze(1)):
            return "attention mask that is not causal + key padding (sliding window, packed sequences or custom)"
    if impl == "eager" and not bool(vis.any(-1).all()):
        # eager softmax over a row of finfo.min gives the mean of all values there, the op gives 0 (as sdpa)
        return "eager attention with fully masked query rows (left padding)"
    if bool(kpm.all()):
        return _Plan(None, Lk)
    return _Plan(kpm.expand(B, Lk).contiguous(), Lk)


# ---------------------------------------------------------------------------------------- forward
def _static_reason(module: nn.Module, attn: nn.Module, kwargs: dict) -> Optional[str]:
    if kwargs.get("output_attentions") or kwargs.get("output_attention"):
        return "output_attentions=True"
    hs = kwargs.get("hidden_states")
    if not isinstance(hs, Tensor) or hs.dim() != 3:
        return "hidden_states not given as a (B, L, hidden) keyword argument"
    pe = kwargs.get("position_embeddings")
    if not (isinstance(pe, (tuple, list)) and len(pe) == 2):
        return "no position_embeddings (cos, sin) passed to the attention"
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if impl not in IMPLEMENTATIONS:
        return f"attention implementation {impl!r} (fused for {IMPLEMENTATIONS})"
    if not getattr(attn, "is_causal", True) or not getattr(attn.config, "is_causal", True):
        return "non-causal attention"
    if attn.training and float(getattr(attn, "attention_dropout", 0.0) or 0.0) > 0.0:
        return "attention dropout in training"
    D = attn.head_dim
    if abs(float(getattr(attn, "scaling", D ** -0.5)) - D ** -0.5) > 1e-9 * D ** -0.5:
        return "attention scaling other than head_dim**-0.5 (PEFT's prompt branch uses head_dim**-0.5)"
    prompt = getattr(module, "adaption_prompt", None)
    if not isinstance(prompt, Tensor) or prompt.dim() != 3 or prompt.shape[0] != 1:
        return "adaption_prompt not of shape (1, P, hidden)"
    for k in _UNSUPPORTED_KWARGS:
        if kwargs.get(k) is not None:
            return f"attention keyword {k!r}"
    pkv = kwargs.get("past_key_values")
    if pkv is not None and not hasattr(pkv, "update"):
        return f"past_key_values of type {type(pkv).__name__}"
    return None


def _rope_fn(attn: nn.Module):
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        from ..modules.adaption_prompt import apply_rotary

        def fn(q, k, cos, sin):
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return fn


def _fused_forward(self: nn.Module, **kwargs):
    """PEFT AdaptedAttention.forward as one fused gated-attention call (see the module docstring)."""
    attn = self.model
    reason = _static_reason(self, attn, kwargs)
    hs = kwargs.get("hidden_states")
    if reason is None:
        plan = _mask_plan(kwargs.get("attention_mask"), hs.shape[0], hs.shape[1], attn.config._attn_implementation)
        if isinstance(plan, str):
            reason = plan
    if reason is not None:
        return _fallback(self, reason, kwargs)

    B, Lq, _ = hs.shape
    D = attn.head_dim
    q = attn.q_proj(hs).view(B, Lq, -1, D).transpose(1, 2)
    k = attn.k_proj(hs).view(B, Lq, -1, D).transpose(1, 2)
    v = attn.v_proj(hs).view(B, Lq, -1, D).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    q, k = _rope_fn(attn)(q, k, cos, sin)
    pkv = kwargs.get("past_key_values")
    if pkv is not None:
        k, v = pkv.update(k, v, attn.layer_idx)
    if plan.crop and k.shape[2] > Lq:
        k, v = k[:, :, :Lq], v[:, :, :Lq]
    if plan.lk is not None and k.shape[2] != plan.lk:
        raise RuntimeError(f"fastbridge ({NAME}): the attention mask covers {plan.lk} keys but the layer has "
                           f"{k.shape[2]} (after the cache update)")

    prompt = self.adaption_prompt                                   # (1, P, hidden)
    P = prompt.shape[1]
    Hkv = k.shape[1]
    pk = attn.k_proj(prompt).view(1, P, Hkv, D).transpose(1, 2).to(q.dtype)
    pv = attn.v_proj(prompt).view(1, P, Hkv, D).transpose(1, 2).to(q.dtype)
    out = gated_attention(q, k, v, pk, pv, self.adaption_gate, causal=True, scale=float(attn.scaling),
                          gate_fn="identity", key_padding_mask=plan.kpm)
    out = attn.o_proj(out.transpose(1, 2).reshape(B, Lq, -1))
    if getattr(attn.o_proj, "bias", None) is not None:
        out = out + attn.o_proj.bias  # PEFT's o_proj(main) + o_proj(prompt) adds the bias twice
    stats["fused"] += 1
    return out.to(q.dtype), None


def integration():
    from ..patch import Integration

    return Integration(
        name=NAME,
        description="PEFT AdaptionPrompt (LLaMA-Adapter) attention, llama / mistral: one fused gated_attention "
                    "call with the layer's own q/k/v, the prompt broadcast over the batch, one o_proj",
        matches=matches,
        patch=patch,
        unpatch=unpatch,
    )
