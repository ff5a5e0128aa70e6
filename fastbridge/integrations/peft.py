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
accelerate hook, its saved ``_old_forward``). The instance-level forward is a small picklable object
(:class:`FusedForward`), so ``torch.save`` / ``torch.load`` and ``deepcopy`` of a patched model keep it fused.

Mixed precision: under ``torch.autocast`` the fused op runs in the autocast dtype, as PEFT's matmuls and
transformers' SDPA do (not in fp32 because RoPE's fp32 cos / sin promoted q and k), and the layer returns
the dtype PEFT returns (the dtype of q after RoPE). See fastbridge/ops/_autocast.py.

torch.compile: the patched forward has no branch on tensor data. Eagerly, a mask is checked element by
element once and a mask the fused call cannot express falls back (above); while compiling, the mask is
converted the same way without branching and checked with ``torch._assert_async`` (an error, never a
wrong result, if it is not causal + key padding); decisions that depend on the configuration only (a
sliding window shorter than the keys, attention implementation, dropout, ...) are made in Python as
before. transformers-version differences (the ``past_key_values`` -> ``cache`` keyword of transformers
>= 5.24) live in fastbridge/integrations/_compat.py.
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

from .. import _backend, _stats
from .._backend import FastbridgeFallbackWarning
from ..ops.gated_attention import _kernel_unavailable as _ga_kernel_unavailable
from ..ops import _autocast, gated_attention
from . import _compat

logger = logging.getLogger("fastbridge")

NAME = "peft.AdaptionPrompt"
MODEL_TYPES = ("llama", "mistral")
IMPLEMENTATIONS = ("sdpa", "eager")
_PEFT_LAYER = "peft.tuners.adaption_prompt.layer"
_SAVED = "_fastbridge_peft_saved"  # (attribute name, whether an instance attribute was replaced, that attribute)
# kwargs that change the attention in ways the fused call does not reproduce
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks", "cu_seq_lens_q", "cu_seq_lens_k",
                       "max_length_q", "max_length_k", "is_causal")

# How many calls took each path, for tests and diagnostics: "fused" and "fallback: <reason>" (users:
# fastbridge.stats(model), which also tells fused kernels from the reference).
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


class FusedForward:
    """The patched ``forward`` of one AdaptedAttention: a plain picklable object (a bound method of a
    module-level function would pickle as ``getattr(module, "_fused_forward")`` and fail to load)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.rope = _rope_fn(module.model)

    def __call__(self, *args, **kwargs):
        if args:  # PEFT calls the attention with keywords only; positional hidden_states first
            kwargs = {"hidden_states": args[0], **kwargs}
            if len(args) > 1:
                return _fallback(self.module, "positional arguments beyond hidden_states", kwargs, args)
        return _fused_forward(self.module, self.rope, **kwargs)


def patch(module: nn.Module, **_options) -> None:
    if _SAVED in module.__dict__:
        return
    target = _target(module)
    had = target in module.__dict__
    module.__dict__[_SAVED] = (target, had, module.__dict__.get(target))
    module.__dict__[target] = FusedForward(module)


def unpatch(module: nn.Module) -> None:
    target, had, saved = module.__dict__.pop(_SAVED, (None, False, None))
    if target is None:
        return
    if had:
        module.__dict__[target] = saved
    else:
        module.__dict__.pop(target, None)


def _original(module: nn.Module):
    _, had, saved = module.__dict__.get(_SAVED, (None, False, None))
    return saved if had else types.MethodType(type(module).forward, module)


def _fallback(module: nn.Module, reason: str, kwargs, args=()):
    if not torch.compiler.is_compiling():  # counted and announced eagerly (a warning would break the graph)
        stats[f"fallback: {reason}"] += 1
        _stats.record(NAME, "fallback", reason)
        if reason not in _warned:
            _warned.add(reason)
            msg = (f"fastbridge ({NAME}): running PEFT's original AdaptedAttention forward ({reason}); results "
                   "are the same, only speed and memory differ. This message is shown once.")
            logger.info(msg)
            warnings.warn(msg, FastbridgeFallbackWarning, stacklevel=_backend.user_stacklevel())
    return _original(module)(*args[1:], **kwargs)


# ------------------------------------------------------------------------------------------ masks
@dataclass
class _Plan:
    kpm: Optional[Tensor]    # (B, Lk) bool, None = every key visible
    lk: Optional[int]        # key length the mask was built for (None: any)
    crop: bool = False       # sdpa's mask-free prefill: keys beyond Lq are cropped, causal top-left
    empty: Optional[Tensor] = None  # (B or 1, Lq) bool: eager rows that see no key (they get the mean of v)


_plan_cache: dict = {}


def _mask_plan(mask, B: int, Lq: int, impl: str, sliding_window: Optional[int]):
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
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        return f"attention mask of dtype {mask.dtype}"
    if torch.compiler.is_compiling():
        # No branch on mask data while tracing: convert without checking, then assert on the device.
        if sliding_window is not None and mask.shape[-1] > sliding_window:
            return "attention mask that is not causal + key padding (a sliding window shorter than the keys)"
        return _convert(mask, B, Lq, impl, verify="assert")
    try:
        version = mask._version
    except RuntimeError:  # inference-mode tensors have no version counter (and cannot be modified)
        version = -1
    key = (B, Lq, impl, version)
    hit = _plan_cache.get("last")
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        plan = _convert(mask, B, Lq, impl, verify="check")
    try:
        _plan_cache["last"] = (weakref.ref(mask), key, plan)
    except TypeError:  # pragma: no cover - tensors support weak references
        pass
    return plan


def _convert(mask: Tensor, B: int, Lq: int, impl: str, verify: str):
    """The mask as causal + (B, Lk) key padding. ``verify="check"``: check element by element and return
    why not (str) where it is something else; ``"assert"``: no data-dependent branch (torch.compile), a
    device-side assert instead."""
    Lk = mask.shape[-1]
    if mask.dtype == torch.bool:
        visible = mask
        clean = None
    else:
        visible = mask == 0
        clean = visible | (mask <= torch.finfo(mask.dtype).min / 2)  # 0 or finfo.min (HF eager) / -inf
    vis = visible[:, 0]              # (Bm, Lq, Lk)
    kpm = vis[:, -1, :]              # the last query sees every non-padded key under a causal mask
    i = torch.arange(Lq, device=mask.device).view(Lq, 1)
    j = torch.arange(Lk, device=mask.device).view(1, Lk)
    causal = j <= i + (Lk - Lq)      # bottom-right aligned, as the op
    expected = causal.unsqueeze(0) & kpm.unsqueeze(1)
    empty = ~vis.any(-1) if impl == "eager" else None  # eager gives such rows the mean of v (see _fused_forward)
    if verify == "assert":
        ok = (visible == expected.unsqueeze(1)).all()
        if clean is not None:
            ok = ok & clean.all()
        torch._assert_async(ok, "fastbridge (peft.AdaptionPrompt): under torch.compile the attention mask must "
                                "be causal + key padding (sliding windows, packed sequences, custom masks and "
                                "biases are not supported there; they run PEFT's forward when not compiled)")
        return _Plan(kpm.expand(B, Lk), Lk, empty=empty)
    if clean is not None and not bool(clean.all()):
        return "additive attention mask with values other than 0 and -inf/finfo.min (a bias)"
    if visible.shape[1] > 1 and not bool((visible == visible[:, :1]).all()):
        return "attention mask that differs between heads"
    if Lq > 1 and not torch.equal(vis, expected):
        return "attention mask that is not causal + key padding (sliding window, packed sequences or custom)"
    if empty is not None and not bool(empty.any()):
        empty = None
    if bool(kpm.all()):
        return _Plan(None, Lk, empty=empty)
    return _Plan(kpm.expand(B, Lk).contiguous(), Lk, empty=empty)


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
    name, cache = _compat.get_cache(kwargs)
    if cache is not None and not hasattr(cache, "update"):
        return f"{name} of type {type(cache).__name__}"
    return None


def _apply_rotary(q, k, cos, sin):
    from ..modules.adaption_prompt import apply_rotary

    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _rope_fn(attn: nn.Module):
    """The attention's own module-level apply_rotary_pos_emb (picklable by name), else fastbridge's."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return fn if fn is not None else _apply_rotary


def _fused_forward(self: nn.Module, rope, **kwargs):
    """PEFT AdaptedAttention.forward as one fused gated-attention call (see the module docstring)."""
    attn = self.model
    reason = _static_reason(self, attn, kwargs)
    hs = kwargs.get("hidden_states")
    if reason is None:
        impl = attn.config._attn_implementation
        window = getattr(attn, "sliding_window", None) or getattr(attn.config, "sliding_window", None)
        plan = _mask_plan(kwargs.get("attention_mask"), hs.shape[0], hs.shape[1], impl, window)
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
    q, k = rope(q, k, cos, sin)
    out_dtype = q.dtype  # what PEFT returns: the dtype of q after RoPE
    keyword, cache = _compat.get_cache(kwargs)
    if cache is not None:
        k, v = _compat.update_cache(cache, keyword, k, v, attn.layer_idx, kwargs)
    if plan.crop and k.shape[2] > Lq:
        k, v = k[:, :, :Lq], v[:, :, :Lq]
    if plan.lk is not None and k.shape[2] != plan.lk:
        raise RuntimeError(f"fastbridge ({NAME}): the attention mask covers {plan.lk} keys but the layer has "
                           f"{k.shape[2]} (after the cache update)")

    prompt = self.adaption_prompt                                   # (1, P, hidden)
    P = prompt.shape[1]
    Hkv = k.shape[1]
    pk = attn.k_proj(prompt).view(1, P, Hkv, D).transpose(1, 2)
    pv = attn.v_proj(prompt).view(1, P, Hkv, D).transpose(1, 2)
    # One dtype for the fused call: the autocast dtype under autocast (fastbridge/ops/_autocast.py), else q's.
    dt = _autocast.autocast_dtype(q) or q.dtype
    q, k, v, pk, pv = _autocast.cast(dt, q, k, v, pk, pv)
    out = gated_attention(q, k, v, pk, pv, self.adaption_gate, causal=True, scale=float(attn.scaling),
                          gate_fn="identity", key_padding_mask=plan.kpm)
    if plan.empty is not None:
        # transformers' eager attention gives a row that sees no key (finfo.min everywhere) a uniform softmax
        # over all keys: the mean of v (the op gives 0, as sdpa). Added without a branch on the data.
        mean_v = v.mean(dim=2, keepdim=True).repeat_interleave(q.shape[1] // Hkv, dim=1)   # (B, H, 1, D)
        out = out + plan.empty[:, None, :, None].to(out.dtype) * mean_v.to(out.dtype)
    out = attn.o_proj(out.transpose(1, 2).reshape(B, Lq, -1))
    if getattr(attn.o_proj, "bias", None) is not None:
        out = out + attn.o_proj.bias  # PEFT's o_proj(main) + o_proj(prompt) adds the bias twice
    if not torch.compiler.is_compiling():
        stats["fused"] += 1
        _stats.record_op(NAME, lambda: _ga_kernel_unavailable(q, (k, v, pk, pv, self.adaption_gate)))
    return out.to(out_dtype), None


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
