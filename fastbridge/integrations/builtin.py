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
