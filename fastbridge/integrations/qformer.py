"""fastbridge.patch for the BLIP-2 / InstructBLIP Q-Former (transformers).

What ``patch`` does to each Q-Former (``Blip2QFormerModel``, ``InstructBlipQFormerModel``,
``InstructBlipVideoQFormerModel`` -- inside Blip2Model / Blip2ForConditionalGeneration / InstructBLIP
models, or alone, as Granite Speech uses it):

1. switches only the Q-Former's attention implementation to ``"fastbridge"``
   (fastbridge/integrations/transformers.py): ``qformer.set_attn_implementation("fastbridge")``, the
   per-module form of ``model.set_attn_implementation({"qformer_config": "fastbridge"})`` -- the vision
   encoder and the language model keep theirs. Self- and cross-attention of every Q-Former layer then
   run fastbridge.ops.qformer_cross_attention.
2. batches the key / value projections of the image features: the cross-attention layers (0, 2, 4, ...
   in BLIP-2) all project the same ``encoder_hidden_states``; one GEMM with the concatenated weights of
   all of them (``[K_0; V_0; K_2; V_2; ...]``) runs at the first of those projections (in layer 0's
   forward; a pre-hook on the Q-Former encoder records the image features and decides), and each
   layer's ``key`` / ``value`` Linear returns its slice of that output (an instance ``forward`` of the
   Linear: parameters, names and the state dict are unchanged; autograd reaches every weight through
   the concatenation). Only where that is the same computation: plain ``nn.Linear`` projections
   without hooks, one dtype / device / bias layout, the same input tensor -- and not under gradient
   checkpointing (whose recomputation must see the layer's own projections). Otherwise each layer
   projects as before. Option ``qformer_batch_kv=False`` turns it off.
   FSDP2: whole-model (or encoder-level) ``fully_shard`` batches as above (the weights are unsharded
   when the encoder runs). With ``fully_shard`` per Q-Former layer, a layer's weights exist unsharded
   only inside that layer's forward and its gradients are reduce-scattered at the end of that layer's
   backward, so one GEMM cannot span layers: the projections are batched per FSDP unit (units holding
   two or more cross-attention layers) and otherwise run in each layer's own forward, with a one-time
   ``FastbridgeFallbackWarning`` (same results, only speed differs).
   Memory: the projections of all layers exist at once (in training they are kept for backward
   anyway; in inference this raises the peak by the K/V of the other cross-attention layers).

``unpatch`` restores the previous attention implementation and removes the hooks and forwards.
"""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import FastbridgeFallbackWarning

__all__ = ["matches", "patch", "unpatch", "QFORMER_CLASSES"]

QFORMER_CLASSES = (
    ("transformers.models.blip_2.modeling_blip_2", "Blip2QFormerModel"),
    ("transformers.models.instructblip.modeling_instructblip", "InstructBlipQFormerModel"),
    ("transformers.models.instructblipvideo.modeling_instructblipvideo", "InstructBlipVideoQFormerModel"),
)
_PREV = "_fastbridge_prev_attn_implementation"
_KV = "_fastbridge_kv_batch"
_HOOKS = "_fastbridge_kv_hooks"


def _classes() -> tuple:
    # only classes already imported: a model of a class whose module was never imported cannot exist
    out = []
    for mod, name in QFORMER_CLASSES:
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, name):
            out.append(getattr(m, name))
    return tuple(out)


def matches(module: nn.Module) -> bool:
    classes = _classes()
    return bool(classes) and isinstance(module, classes)


def _set_attn_implementation(qformer: nn.Module, name: Optional[str]) -> None:
    try:
        qformer.set_attn_implementation(name)
    except (AttributeError, ValueError, TypeError):  # older transformers: set the sub-config directly
        qformer.config._attn_implementation = name


# ------------------------------------------------------------------------------------ K/V batching
_warned: set[str] = set()


def _notice(reason: str) -> None:
    """A one-time FastbridgeFallbackWarning per reason: the K/V projections run less batched, same results."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastbridge.patch (Q-Former): {reason}; the results are the same, only speed differs. "
                      "This message is shown once.", FastbridgeFallbackWarning, stacklevel=4)


def _fsdp_module_class() -> tuple:
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:  # pragma: no cover - older torch or no torch.distributed
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return ()
    return (FSDPModule,)


_FSDP = _fsdp_module_class()


class _KVBatch:
    """One batched GEMM: the key / value projections of the cross-attention layers of one FSDP unit
    (of the whole Q-Former without FSDP or with whole-model sharding). Cleared when the encoder returns."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.linears = linears  # [key_0, value_0, key_1, value_1, ...] of the cross-attention layers
        self.source: Optional[torch.Tensor] = None
        self.outputs: Optional[list[torch.Tensor]] = None

    def usable(self, x) -> bool:
        if not isinstance(x, torch.Tensor) or len(self.linears) < 2:
            return False
        w0 = self.linears[0].weight
        has_bias = self.linears[0].bias is not None
        for lin in self.linears:
            if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
                return False
            if lin.weight.dtype != w0.dtype or lin.weight.device != w0.device or lin.in_features != x.shape[-1]:
                return False
            if (lin.bias is not None) != has_bias:
                return False
        return True

    def compute(self, x: torch.Tensor) -> None:
        weight = torch.cat([lin.weight for lin in self.linears], dim=0)
        bias = torch.cat([lin.bias for lin in self.linears]) if self.linears[0].bias is not None else None
        y = F.linear(x, weight, bias)
        self.outputs = list(y.split([lin.out_features for lin in self.linears], dim=-1))
        self.source = x

    def clear(self) -> None:
        self.source = None
        self.outputs = None


class _KVBatching:
    """The K/V batching of one Q-Former: which projections share a GEMM in the current forward.

    The encoder's pre-hook (``start``) only decides and records the image features; each batch runs
    lazily, at the first call of one of its projections -- inside the forward of the layer that owns it,
    where FSDP2 has unsharded that layer's weights. The projections are grouped by their FSDP unit (the
    innermost ``fully_shard``-ed module between the encoder and the Linear; none without FSDP or with
    whole-model / encoder-level sharding): a unit's weights exist unsharded only inside its own forward
    and its gradients are reduce-scattered at the end of its own backward, so a GEMM never spans units.
    A unit holding fewer than two cross-attention layers projects per layer (a one-time notice says so).
    """

    def __init__(self, encoder: nn.Module, linears: list[nn.Linear]) -> None:
        self.linears = linears
        # per projection: the modules strictly below the encoder down to the Linear, outermost first
        self.paths = [_module_path(encoder, lin) for lin in linears]
        self.batches: list[_KVBatch] = []
        self.slots: dict[int, tuple[_KVBatch, int]] = {}  # projection index -> (its batch, index in it)
        self.source: Optional[torch.Tensor] = None

    def _units(self) -> list[list[int]]:
        owners: list = []
        units: list[list[int]] = []
        for i, path in enumerate(self.paths):
            owner = None
            for m in path:
                if _FSDP and isinstance(m, _FSDP):
                    owner = m  # the innermost one wins
            for j, o in enumerate(owners):
                if o is owner:
                    units[j].append(i)
                    break
            else:
                owners.append(owner)
                units.append([i])
        return units

    def start(self, x) -> None:
        self.clear()
        if not _KVBatch(self.linears).usable(x):
            return
        units = self._units()
        for unit in units:
            if len(unit) >= 4:  # two or more cross-attention layers (a key and a value each)
                batch = _KVBatch([self.linears[i] for i in unit])
                self.batches.append(batch)
                for j, i in enumerate(unit):
                    self.slots[i] = (batch, j)
        if len(units) > 1:
            _notice(f"the cross-attention layers are sharded separately (FSDP fully_shard inside the Q-Former "
                    f"encoder, {len(units)} units), so their key / value projections are batched only within a "
                    "unit, and a unit with one cross-attention layer projects in that layer's own forward")
        if self.slots:
            self.source = x

    def forward(self, index: int, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        slot = self.slots.get(index)
        if slot is not None:
            batch, j = slot
            if batch.outputs is None and self.source is not None and x is self.source:
                batch.compute(x)  # the first projection of its unit: inside the unit's forward
            if batch.outputs is not None and x is batch.source:
                return batch.outputs[j]
        return F.linear(x, linear.weight, linear.bias)

    def clear(self) -> None:
        for batch in self.batches:
            batch.clear()
        self.batches = []
        self.slots = {}
        self.source = None


def _module_path(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    for name, m in root.named_modules():
        if m is target:
            path, mod = [], root
            for part in name.split(".") if name else []:
                mod = getattr(mod, part)
                path.append(mod)
            return path
    return []


def _checkpointing(encoder: nn.Module) -> bool:
    if getattr(encoder, "gradient_checkpointing", False):
        return True
    return any(getattr(m, "gradient_checkpointing", False) for m in encoder.modules() if m is not encoder)


def _encoder_pre_hook(batching: _KVBatching, encoder: nn.Module, args, kwargs):
    batching.clear()
    x = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    if x is None or (encoder.training and _checkpointing(encoder)):
        return None
    batching.start(x)
    return None


def _encoder_post_hook(batching: _KVBatching, encoder, args, output):
    batching.clear()
    return None


def _cross_attention_linears(qformer: nn.Module) -> list[nn.Linear]:
    linears = []
    for layer in getattr(getattr(qformer, "encoder", None), "layer", []):
        cross = getattr(layer, "crossattention", None)
        mha = getattr(cross, "attention", None)
        if mha is not None and isinstance(getattr(mha, "key", None), nn.Linear) and \
                isinstance(getattr(mha, "value", None), nn.Linear):
            linears += [mha.key, mha.value]
    return linears


def _install_kv_batching(qformer: nn.Module) -> None:
    encoder = getattr(qformer, "encoder", None)
    linears = _cross_attention_linears(qformer)
    if encoder is None or len(linears) < 4:  # fewer than two cross-attention layers: nothing to batch
        return
    batching = _KVBatching(encoder, linears)
    for i, lin in enumerate(linears):
        lin.forward = functools.partial(batching.forward, i, lin)
    hooks = [encoder.register_forward_pre_hook(functools.partial(_encoder_pre_hook, batching), with_kwargs=True),
             encoder.register_forward_hook(functools.partial(_encoder_post_hook, batching), always_call=True)]
    setattr(qformer, _KV, batching)
    setattr(qformer, _HOOKS, hooks)


def _remove_kv_batching(qformer: nn.Module) -> None:
    batching = qformer.__dict__.pop(_KV, None)
    for h in qformer.__dict__.pop(_HOOKS, []):
        h.remove()
    if batching is not None:
        batching.clear()
        for lin in batching.linears:
            lin.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------------- patch / unpatch
def patch(qformer: nn.Module, *, qformer_batch_kv: bool = True, **_options) -> None:
    from . import transformers as tf

    tf.register()
    setattr(qformer, _PREV, qformer.config._attn_implementation)
    _set_attn_implementation(qformer, tf.NAME)
    if qformer_batch_kv:
        _install_kv_batching(qformer)


def unpatch(qformer: nn.Module) -> None:
    _remove_kv_batching(qformer)
    prev = qformer.__dict__.pop(_PREV, None)
    if prev is not None:
        _set_attn_implementation(qformer, prev)
