"""fastbridge.patch / fastbridge.unpatch: one registry of integrations, one walk over the model.

An integration says which modules it can patch (``matches``), patches one in place (``patch``)
and restores it (``unpatch``). Later work registers more (Q-Former attention, PEFT AdaptionPrompt);
this file does not change for them. ``patch`` is idempotent, leaves unmatched modules alone and
returns a report of what it patched.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

logger = logging.getLogger("fastbridge")

_ATTR = "_fastbridge_patched"  # on each patched module: the integration's name


@dataclass(frozen=True)
class Integration:
    name: str
    description: str
    matches: Callable[[nn.Module], bool]
    patch: Callable[..., None]  # (module, **options) -> None, in place
    unpatch: Callable[[nn.Module], None]
    # Model-level hooks (e.g. switching an attention implementation in a config), run once per model.
    patch_model: Callable[..., None] | None = None
    unpatch_model: Callable[[nn.Module], None] | None = None
    # fastbridge's own modules are fused from construction, patched or not: unpatch switches them to eager
    # even where patch was never called (e.g. right after fastbridge.add_adapters).
    fused_by_default: bool = False


_REGISTRY: dict[str, Integration] = {}


def register_integration(integration: Integration) -> Integration:
    """Add (or replace, by name) an integration. Integrations are tried in registration order."""
    _REGISTRY[integration.name] = integration
    return integration


def integrations() -> list[Integration]:
    _load_builtin()
    return list(_REGISTRY.values())


@dataclass
class PatchReport:
    patched: dict[str, str] = field(default_factory=dict)   # module path -> integration name
    already: dict[str, str] = field(default_factory=dict)   # patched by an earlier call

    @property
    def counts(self) -> Counter:
        return Counter(list(self.patched.values()) + list(self.already.values()))

    def __str__(self) -> str:
        if not self.counts:
            return "fastbridge.patch: nothing to patch (no supported modules found)"
        parts = ", ".join(f"{n} x{c}" for n, c in sorted(self.counts.items()))
        new = len(self.patched)
        return f"fastbridge.patch: {new} module(s) newly patched; fused now: {parts}"


def patch(model: nn.Module, *, verbose: bool = False, **options) -> nn.Module:
    """Patch every supported module of ``model`` in place; returns the same model (idempotent).

    The report of what was patched is kept as ``model.fastbridge_report`` and logged (printed with
    ``verbose=True``). Options are passed to each integration's patch function.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbridge.patch: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    used: set[str] = set()
    for path, module in model.named_modules():
        done = getattr(module, _ATTR, None)
        if done is not None:
            report.already[path] = done
            continue
        for integ in integrations():
            if integ.matches(module):
                integ.patch(module, **options)
                setattr(module, _ATTR, integ.name)
                report.patched[path] = integ.name
                used.add(integ.name)
                break
    for integ in integrations():
        if integ.name in used and integ.patch_model is not None:
            integ.patch_model(model, **options)
    model.fastbridge_report = report
    (print if verbose else logger.info)(str(report))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every module ``patch`` changed; returns the same model."""
    used: set[str] = set()
    own = [i for i in integrations() if i.fused_by_default]
    for _, module in model.named_modules():
        name = getattr(module, _ATTR, None)
        if name is None:
            integ = next((i for i in own if i.matches(module)), None)
            if integ is not None:
                integ.unpatch(module)
                used.add(integ.name)
            continue
        _REGISTRY[name].unpatch(module)
        delattr(module, _ATTR)
        used.add(name)
    for integ in integrations():
        if integ.name in used and integ.unpatch_model is not None:
            integ.unpatch_model(model)
    if hasattr(model, "fastbridge_report"):
        del model.fastbridge_report
    return model


def is_patched(module: nn.Module) -> bool:
    return getattr(module, _ATTR, None) is not None


_builtin_loaded = False


def _load_builtin() -> None:
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    from .integrations import builtin  # noqa: F401  (registers on import)
