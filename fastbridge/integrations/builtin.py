"""The integrations fastbridge.patch knows. Each later integration adds a register_integration call."""
from __future__ import annotations

import dataclasses

from .._backend import describe_extension, describe_triton
from ..modules.adapter import BottleneckAdapter
from ..patch import Integration, register_integration


def _set_fused(value: bool):
    def apply(module, **_options):
        module.fused = value

    return apply


# fastbridge's own modules are fused already: patch keeps them fused (and reports them); unpatch
# switches them to the plain eager composition, so patched-vs-unpatched comparisons are one call.
register_integration(Integration(
    name="fastbridge.BottleneckAdapter",
    description="fastbridge's own bottleneck adapters (fused adapter_block)",
    matches=lambda m: isinstance(m, BottleneckAdapter),
    patch=_set_fused(True),
    unpatch=_set_fused(False),
    fused_by_default=True,
    backend=describe_triton,
))


# LLaMA-Adapter: fastbridge's own AdaptionPromptAttention (fused already; unpatch -> eager composition),
# and PEFT AdaptionPrompt attention for llama / mistral (integrations/peft.py; never imports peft itself).
from ..modules.adaption_prompt import AdaptionPromptAttention  # noqa: E402

register_integration(Integration(
    name="fastbridge.AdaptionPromptAttention",
    description="fastbridge's own adaption-prompt attention (fused gated_attention)",
    matches=lambda m: isinstance(m, AdaptionPromptAttention),
    patch=_set_fused(True),
    unpatch=_set_fused(False),
    fused_by_default=True,
    backend=describe_triton,
))
try:
    from .peft import integration as _peft_integration  # noqa: E402
except ImportError:  # pragma: no cover - keeps fastbridge importable whatever happens to that file's imports
    _peft_integration = None
if _peft_integration is not None:
    _peft = _peft_integration()
    if _peft.backend is None:  # its fused path is gated_attention (Triton)
        _peft = dataclasses.replace(_peft, backend=describe_triton)
    register_integration(_peft)


# BLIP-2 / InstructBLIP Q-Former (transformers): attn_implementation "fastbridge" for the Q-Former only,
# batched key / value projections of the image features (integrations/qformer.py).
from . import qformer as _qformer  # noqa: E402

register_integration(Integration(
    name="transformers.QFormer",
    description="BLIP-2 / InstructBLIP Q-Former attention (fastbridge qformer_cross_attention, batched K/V)",
    matches=_qformer.matches,
    patch=_qformer.patch,
    unpatch=_qformer.unpatch,
    backend=describe_extension,
))


# Flamingo-style gated cross-attention (transformers): Llama 3.2 Vision (mllama) cross-attention decoder layers and
# IDEFICS gated cross-attention layers run fastbridge gated_cross_attention with the structured image / tile
# visibility derived from the model's own masks (integrations/flamingo.py).
from . import flamingo as _flamingo  # noqa: E402

register_integration(Integration(
    name=_flamingo.MLLAMA,
    description="Llama 3.2 Vision (mllama) cross-attention decoder layers (fastbridge gated_cross_attention, "
                "tanh gate folded, per-tile visibility)",
    matches=_flamingo.matches_mllama,
    patch=_flamingo.patch,
    unpatch=_flamingo.unpatch,
    patch_model=_flamingo.patch_model,
    unpatch_model=_flamingo.unpatch_model,
))
register_integration(Integration(
    name=_flamingo.IDEFICS,
    description="IDEFICS gated cross-attention layers (fastbridge gated_cross_attention, per-image visibility)",
    matches=_flamingo.matches_idefics,
    patch=_flamingo.patch,
    unpatch=_flamingo.unpatch,
    patch_model=_flamingo.patch_model,
    unpatch_model=_flamingo.unpatch_model,
))
