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
   in BLIP-2) all project the same ``encoder_hidden_states``; a pre-hook on the Q-Former encoder runs
   one GEMM with the concatenated weights of all of them (``[K_0; V_0; K_2; V_2; ...]``) and each
   layer's ``key`` / ``value`` Linear returns its slice of that output (an instance ``forward`` of the
   Linear: parameters, names and the state dict are unchanged; autograd reaches every weight through
   the concatenation). Only where that is the same computation: plain ``nn.Linear`` projections
   without hooks, one dtype / device / bias layout, the same input tensor -- and not under gradient
   checkpointing (whose recomputation must see the layer's own projections). Otherwise each layer
   projects as before. Option ``qformer_batch_kv=False`` turns it off.
   Memory: the projections of all layers exist at once (in training they are kept for backward
   anyway; in inference this raises the peak by the K/V of the other cross-attention layers).

``unpatch`` restores the previous attention implementation and removes the hooks and forwards.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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
class _KVBatch:
    """The batched key / value projections of one Q-Former forward (cleared when the encoder returns)."""

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


def _batched_linear_forward(batch: _KVBatch, index: int, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of a patched key / value Linear: its slice of the batched projection, else its own GEMM."""
    if batch.outputs is not None and x is batch.source:
        return batch.outputs[index]
    return F.linear(x, linear.weight, linear.bias)


def _checkpointing(encoder: nn.Module) -> bool:
    if getattr(encoder, "gradient_checkpointing", False):
        return True
    return any(getattr(m, "gradient_checkpointing", False) for m in encoder.modules() if m is not encoder)


def _encoder_pre_hook(batch: _KVBatch, encoder: nn.Module, args, kwargs):
    batch.clear()
    x = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    if x is None or (encoder.training and _checkpointing(encoder)) or not batch.usable(x):
        return None
    batch.compute(x)
    return None


def _encoder_post_hook(batch: _KVBatch, encoder, args, output):
    batch.clear()
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
    batch = _KVBatch(linears)
    for i, lin in enumerate(linears):
        lin.forward = functools.partial(_batched_linear_forward, batch, i, lin)
    hooks = [encoder.register_forward_pre_hook(functools.partial(_encoder_pre_hook, batch), with_kwargs=True),
             encoder.register_forward_hook(functools.partial(_encoder_post_hook, batch), always_call=True)]
    setattr(qformer, _KV, batch)
    setattr(qformer, _HOOKS, hooks)


def _remove_kv_batching(qformer: nn.Module) -> None:
    batch = qformer.__dict__.pop(_KV, None)
    for h in qformer.__dict__.pop(_HOOKS, []):
        h.remove()
    if batch is not None:
        batch.clear()
        for lin in batch.linears:
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
