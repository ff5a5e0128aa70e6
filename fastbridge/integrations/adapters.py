"""fastbridge.add_adapters: bottleneck adapters after the FFN of each block of Hugging Face models.

Placement (Houlsby / Pfeiffer "output adapter", as in the BLIP adapter study): each block's FFN output
projection ``W_out`` (``BlipMLP.fc2``, ``BlipTextOutput.dense``, ``Blip2QFormerOutput.dense``,
``CLIPMLP.fc2``, ``ViTMLP.fc2``, ``LlamaMLP.down_proj``, ...) becomes ``adapter(W_out(x))``: the adapter
sees the FFN output before the block's dropout / residual add / LayerNorm, and its own residual is
that output.

Mechanism: the :class:`~fastbridge.modules.BottleneckAdapter` is registered as a child named
``adapter`` of the FFN output Linear and a forward hook (a module-level function, so deepcopy and
pickle keep working) replaces the Linear's output with ``linear.adapter(output)``. No module is
replaced, so every original parameter keeps its name: the base model's state-dict keys are unchanged
and adapters only add keys ``<linear path>.adapter.{down,up}.{weight,bias}`` (plus ``ln`` / ``gate``
when enabled). ``remove_adapters`` removes hooks and children and restores what ``freeze`` froze.

Model parts ("targets"): ``vision`` (BLIP / BLIP-2 / ViT / CLIP vision encoders), ``text`` (BLIP text
encoder / decoder, CLIP text encoder), ``qformer`` (BLIP-2 Q-Former: both the query FFN
``output_query`` and, where present, the text FFN ``output``), ``language_model`` (LLaMA, and
BLIP-2's OPT / T5 / LLaMA language model). Defaults per family: BLIP vision+text, BLIP-2
vision+qformer, ViT vision, CLIP vision, LLaMA / OPT / T5 language_model (where a model holds none of
its family's default parts, e.g. ``CLIPTextModel``, every part it holds).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..modules.adapter import PRESETS, BottleneckAdapter

logger = logging.getLogger("fastbridge")

__all__ = ["add_adapters", "remove_adapters", "AdapterReport", "PARTS", "ADAPTER_NAME"]

PARTS = ("vision", "qformer", "text", "language_model")
ADAPTER_NAME = "adapter"  # child name of the adapter on its FFN output Linear
_PART_ATTR = "_fastbridge_adapter_part"  # on each adapted Linear: the part it belongs to
_FROZEN_ATTR = "_fastbridge_adapter_frozen"  # on the model: names of the parameters add_adapters froze
_TF = "transformers.models."

# Blocks: (module, class) owning the FFN output Linear(s) named in attrs; part None = from context.
# Classes missing from the installed transformers version are skipped.
_RULES = (
    ("blip.modeling_blip", "BlipMLP", ("fc2",), "vision"),
    ("blip.modeling_blip_text", "BlipTextOutput", ("dense",), "text"),
    ("blip_2.modeling_blip_2", "Blip2MLP", ("fc2",), "vision"),
    ("blip_2.modeling_blip_2", "Blip2QFormerOutput", ("dense",), "qformer"),  # `output` and `output_query`
    ("vit.modeling_vit", "ViTMLP", ("fc2",), "vision"),       # transformers >= 5
    ("vit.modeling_vit", "ViTOutput", ("dense",), "vision"),  # transformers 4.x
    ("clip.modeling_clip", "CLIPMLP", ("fc2",), None),        # vision or text tower
    ("llama.modeling_llama", "LlamaMLP", ("down_proj",), "language_model"),
    ("opt.modeling_opt", "OPTDecoderLayer", ("fc2",), "language_model"),
    ("t5.modeling_t5", "T5DenseActDense", ("wo",), "language_model"),
    ("t5.modeling_t5", "T5DenseGatedActDense", ("wo",), "language_model"),
)
# Modules that say which part the blocks below them belong to (for blocks shared by two towers).
_CONTEXTS = (
    ("clip.modeling_clip", "CLIPVisionModel", "vision"),
    ("clip.modeling_clip", "CLIPVisionTransformer", "vision"),  # transformers 4.x
    ("clip.modeling_clip", "CLIPTextModel", "text"),
    ("clip.modeling_clip", "CLIPTextTransformer", "text"),      # transformers 4.x
)
# Families: base class of the supported models, default parts, examples for error messages.
# The outermost family instance decides the defaults of the blocks below it (BLIP-2's LLaMA
# language model follows BLIP-2's defaults, not LLaMA's).
_FAMILIES = (
    ("BLIP-2", "blip_2.modeling_blip_2", "Blip2PreTrainedModel", ("vision", "qformer"),
     "Blip2ForConditionalGeneration, Blip2Model, Blip2VisionModel, Blip2QFormerModel, ..."),
    ("BLIP", "blip.modeling_blip", "BlipPreTrainedModel", ("vision", "text"),
     "BlipForConditionalGeneration, BlipModel, BlipForQuestionAnswering, BlipVisionModel, ..."),
    ("BLIP text", "blip.modeling_blip_text", "BlipTextPreTrainedModel", ("text",),
     "BlipTextModel, BlipTextLMHeadModel"),
    ("ViT", "vit.modeling_vit", "ViTPreTrainedModel", ("vision",), "ViTModel, ViTForImageClassification, ..."),
    ("CLIP", "clip.modeling_clip", "CLIPPreTrainedModel", ("vision",),
     "CLIPModel (vision tower), CLIPVisionModel, CLIPTextModel (text), ..."),
    ("LLaMA", "llama.modeling_llama", "LlamaPreTrainedModel", ("language_model",), "LlamaModel, LlamaForCausalLM, ..."),
    ("OPT", "opt.modeling_opt", "OPTPreTrainedModel", ("language_model",), "OPTModel, OPTForCausalLM"),
    ("T5", "t5.modeling_t5", "T5PreTrainedModel", ("language_model",), "T5Model, T5ForConditionalGeneration"),
)

def _load_class(mod: str, name: str):
    """The class if its transformers module is already imported, else None.

    A model can only hold instances of classes whose module is imported, so nothing is imported
    here: transformers stays optional and unrelated model code is never loaded.
    """
    module = sys.modules.get(_TF + mod)
    return getattr(module, name, None) if module is not None else None


def _load_tables():
    """The rule / context / family tables with the classes of the imported transformers modules."""
    rules = [(c, attrs, part) for mod, name, attrs, part in _RULES if (c := _load_class(mod, name))]
    contexts = [(c, part) for mod, name, part in _CONTEXTS if (c := _load_class(mod, name))]
    families = [(label, c, defaults) for label, mod, name, defaults, _ in _FAMILIES if (c := _load_class(mod, name))]
    return rules, contexts, families


def _supported() -> str:
    return "; ".join(f"{label}: {examples}" for label, _, _, _, examples in _FAMILIES)


# --------------------------------------------------------------------------------------- hook
def _adapter_hook(module: nn.Module, args, output):
    """Forward hook on an FFN output Linear: its output goes through the adapter (residual = output)."""
    return getattr(module, ADAPTER_NAME)(output)


def _is_adapted(module: nn.Module) -> bool:
    return (isinstance(getattr(module, ADAPTER_NAME, None), BottleneckAdapter)
            and any(h is _adapter_hook for h in module._forward_hooks.values()))


# ------------------------------------------------------------------------------------- report
@dataclass
class AdapterReport:
    """What add_adapters did. ``str(report)`` is a one-line summary in PEFT's style."""
    paths: list[str]                 # module path of each inserted adapter
    parts: dict[str, int]            # adapters per part ("vision": 12, ...)
    adapter_params: int              # parameters in the inserted adapters
    trainable_params: int            # parameters with requires_grad in the whole model, after freezing
    total_params: int                # all parameters of the model (adapters included)
    num_adapters: int = field(init=False)
    trainable_pct: float = field(init=False)

    def __post_init__(self):
        self.num_adapters = len(self.paths)
        self.trainable_pct = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        parts = ", ".join(f"{p} x{n}" for p, n in self.parts.items())
        return (f"fastbridge.add_adapters: {self.num_adapters} adapters ({parts}) || trainable params: "
                f"{self.trainable_params:,} || all params: {self.total_params:,} || "
                f"trainable%: {self.trainable_pct:.4f}")


# -------------------------------------------------------------------------------------- sites
@dataclass
class _Site:
    path: str            # path of the FFN output Linear
    linear: nn.Module
    part: str
    family: Optional[int]  # id of the outermost family instance above it (None: outside any)


def _find_sites(model: nn.Module):
    """Every FFN output Linear of a supported block, with its part; and the family instances found."""
    rules, contexts, families = _load_tables()
    sites: list[_Site] = []
    fam_defaults: dict[Optional[int], tuple[str, ...]] = {None: PARTS}
    memo: set[int] = set()

    def walk(module: nn.Module, prefix: str, fam: Optional[int], ctx: Optional[str]):
        if id(module) in memo:
            return
        memo.add(id(module))
        if fam is None:
            for _, cls, defaults in families:
                if isinstance(module, cls):
                    fam = id(module)
                    fam_defaults[fam] = defaults
                    break
        for cls, part in contexts:
            if isinstance(module, cls):
                ctx = part
                break
        for cls, attrs, part in rules:
            if isinstance(module, cls):
                part = part or ctx
                for attr in attrs:
                    lin = getattr(module, attr, None)
                    if isinstance(lin, nn.Module) and part is not None:
                        sites.append(_Site(f"{prefix}.{attr}" if prefix else attr, lin, part, fam))
                break
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{name}" if prefix else name, fam, ctx)

    walk(model, "", None, None)
    return sites, fam_defaults


def _normalize_targets(targets) -> tuple[Optional[set[str]], bool]:
    """(parts wanted or None for the defaults, whether each wanted part must be present)."""
    if targets is None:
        return None, False
    if isinstance(targets, str):
        targets = [targets]
    try:
        got = set(targets)
    except TypeError:
        raise TypeError(f"fastbridge.add_adapters: 'targets' must be None, a part name or a collection of part "
                        f"names from {PARTS} (or 'all'), got {type(targets).__name__}") from None
    if "all" in got:
        return set(PARTS), False
    bad = sorted(t for t in got if t not in PARTS)
    if bad or not got:
        raise ValueError(f"fastbridge.add_adapters: 'targets' must name parts among {PARTS} (or 'all'), "
                         f"got {sorted(map(str, got))}")
    return got, True


def _out_features(lin: nn.Module) -> int:
    d = getattr(lin, "out_features", None)
    if isinstance(d, int):
        return d
    w = getattr(lin, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        return w.shape[0]
    raise ValueError(f"fastbridge.add_adapters: cannot tell the output width of {type(lin).__name__}")


def _device_dtype(lin: nn.Module):
    w = next(iter(lin.parameters()), None)
    if w is None:
        return None, torch.float32
    # Trainable adapter parameters in float32 even for half models (cast to x.dtype in forward);
    # float64 models keep float64 adapters.
    return w.device, (torch.float64 if w.dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------------------- public API
def add_adapters(model: nn.Module, r: Optional[int] = None, *, preset: str = "blip",
                 reduction_factor: Optional[int] = None, activation: Optional[str] = None,
                 layer_norm: Optional[bool] = None, gate: bool = False, scale: float = 1.0,
                 targets: Union[None, str, Iterable[str]] = None, freeze: bool = True, verbose: bool = False,
                 **adapter_kwargs) -> AdapterReport:
    """Insert one BottleneckAdapter after the FFN of each transformer block of ``model`` (in place).

    Args:
      model: a Hugging Face BLIP, BLIP-2, ViT, CLIP, LLaMA (or OPT / T5) model, or a module holding
        one (e.g. a PEFT wrapper).
      r: bottleneck width; default from ``preset`` ("blip": r = 64; "houlsby" / "pfeiffer":
        d_model // 16). Give ``r`` or ``reduction_factor``, not both.
      preset: "blip" (GELU), "houlsby" (SiLU) or "pfeiffer" (ReLU), see BottleneckAdapter.from_preset.
      activation, layer_norm: override the preset's.
      gate, scale: ``s = scale · tanh(gate)`` multiplies the adapter branch (gate zero-initialised).
      targets: parts to adapt among ``PARTS`` ("vision", "qformer", "text", "language_model") or
        "all"; None = the family's defaults (BLIP: vision+text; BLIP-2: vision+qformer; ViT, CLIP:
        vision; LLaMA: language_model).
      freeze: set requires_grad=False on every parameter that is not a BottleneckAdapter parameter
        (anything trainable before, e.g. a LoRA, included); ``remove_adapters`` sets it back on
        exactly the parameters frozen here.
      verbose: also print the report (default: returned, and logged at INFO level on the "fastbridge"
        logger, silent unless logging is configured).
      adapter_kwargs: further BottleneckAdapter arguments (bias, ln_eps, init, learnable_scale, dtype).

    Each adapter has d_model = the Linear's out_features, lives on the Linear's device in float32
    (float64 for float64 models) and is the identity when created (zero up-projection), so the model's
    outputs are unchanged until it is trained.

    Calling it again on FFNs that already carry an adapter raises RuntimeError (nothing is changed);
    adding other parts later (e.g. ``targets="vision"`` then ``targets="text"``) is allowed.
    Raises ValueError for a model with no supported block, or targets the model does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbridge.add_adapters: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if preset not in PRESETS:
        raise ValueError(f"fastbridge.add_adapters: 'preset' must be one of {tuple(PRESETS)}, got {preset!r}")
    if r is not None and reduction_factor is not None:
        raise ValueError("fastbridge.add_adapters: give the bottleneck width 'r' or a 'reduction_factor', not both")
    for name, v in (("r", r), ("reduction_factor", reduction_factor)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"fastbridge.add_adapters: {name!r} must be a positive int, got {v!r}")
    wanted, strict = _normalize_targets(targets)

    sites, fam_defaults = _find_sites(model)
    cls_name = type(model).__name__
    if not sites:
        if len(fam_defaults) == 1:  # no supported family anywhere
            raise ValueError(f"fastbridge.add_adapters: {cls_name} is not a supported model (no transformer "
                             f"block of a supported family found). Supported: {_supported()}")
        raise ValueError(f"fastbridge.add_adapters: found no FFN block to adapt in {cls_name}")
    present = sorted({s.part for s in sites}, key=PARTS.index)
    if wanted is not None:
        missing = [p for p in PARTS if p in wanted and p not in present] if strict else []
        if missing:
            raise ValueError(f"fastbridge.add_adapters: {cls_name} has no {missing} blocks to adapt ('targets' = "
                             f"{sorted(wanted)}); parts it has: {present}")
        chosen = [s for s in sites if s.part in wanted]
    else:
        by_fam: dict[Optional[int], set[str]] = {}
        for s in sites:
            by_fam.setdefault(s.family, set()).add(s.part)
        allow = {f: (set(fam_defaults[f]) & parts) or parts for f, parts in by_fam.items()}
        chosen = [s for s in sites if s.part in allow[s.family]]

    already = [s.path for s in chosen if _is_adapted(s.linear)]
    if already:
        raise RuntimeError(f"fastbridge.add_adapters: {len(already)} of the targeted FFNs of {cls_name} already carry "
                           f"a fastbridge adapter (e.g. {already[0]!r}); call "
                           "fastbridge.integrations.adapters.remove_adapters(model) first")
    clash = [s.path for s in chosen if hasattr(s.linear, ADAPTER_NAME)]
    if clash:
        raise RuntimeError(f"fastbridge.add_adapters: {clash[0]!r} already has an attribute {ADAPTER_NAME!r}")

    # Build every adapter before changing the model, so a bad argument leaves it untouched.
    overrides = dict(adapter_kwargs, gate=gate, scale=scale)
    if r is not None:
        overrides["r"] = r
    if reduction_factor is not None:
        overrides.update(r=None, reduction_factor=reduction_factor)
    if activation is not None:
        overrides["activation"] = activation
    if layer_norm is not None:
        overrides["layer_norm"] = bool(layer_norm)
    adapters = []
    for s in chosen:
        device, dtype = _device_dtype(s.linear)
        kw = dict(overrides)
        kw.setdefault("device", device)
        kw.setdefault("dtype", dtype)
        adapters.append(BottleneckAdapter.from_preset(preset, _out_features(s.linear), **kw))

    for s, ad in zip(chosen, adapters):
        s.linear.add_module(ADAPTER_NAME, ad)
        s.linear.register_forward_hook(_adapter_hook)
        setattr(s.linear, _PART_ATTR, s.part)

    if freeze:
        ours = {id(p) for m in model.modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()}
        frozen = list(getattr(model, _FROZEN_ATTR, ()))
        for name, p in model.named_parameters():
            if id(p) not in ours and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(name)
        setattr(model, _FROZEN_ATTR, frozen)

    params = dict(model.named_parameters())
    parts: dict[str, int] = {}
    for s in chosen:
        parts[s.part] = parts.get(s.part, 0) + 1
    report = AdapterReport(
        paths=[f"{s.path}.{ADAPTER_NAME}" for s in chosen],
        parts={p: parts[p] for p in PARTS if p in parts},
        adapter_params=sum(p.numel() for ad in adapters for p in ad.parameters()),
        trainable_params=sum(p.numel() for p in params.values() if p.requires_grad),
        total_params=sum(p.numel() for p in params.values()),
    )
    (print if verbose else logger.info)(str(report))
    return report


def _adapted_linears(model: nn.Module):
    return [(path, m) for path, m in model.named_modules() if _is_adapted(m)]


def remove_adapters(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Remove every adapter add_adapters inserted and un-freeze what it froze; returns the same model.

    The model is restored exactly: no hook, no extra submodule or parameter, the original
    requires_grad flags. A model without adapters is returned unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbridge.remove_adapters: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    removed = []
    for path, lin in _adapted_linears(model):
        for key in [k for k, h in lin._forward_hooks.items() if h is _adapter_hook]:
            del lin._forward_hooks[key]
            lin._forward_hooks_with_kwargs.pop(key, None)
            lin._forward_hooks_always_called.pop(key, None)
        del lin._modules[ADAPTER_NAME]
        if hasattr(lin, _PART_ATTR):
            delattr(lin, _PART_ATTR)
        removed.append(path)
    frozen = getattr(model, _FROZEN_ATTR, None)
    if frozen is not None:
        params = dict(model.named_parameters())
        for name in frozen:
            if name in params:
                params[name].requires_grad_(True)
        delattr(model, _FROZEN_ATTR)
    msg = f"fastbridge.remove_adapters: removed {len(removed)} adapters"
    (print if verbose else logger.info)(msg)
    return model
