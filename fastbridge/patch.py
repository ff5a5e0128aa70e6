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

import torch
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
    # What its calls will run on a device, in words ("kernel (Triton, cuda)", "reference on cpu (...)"),
    # for the patch report; None: not reported.
    backend: Callable[[torch.device], str] | None = None


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
    backends: dict[str, str] = field(default_factory=dict)  # integration name -> what will run, in words

    @property
    def counts(self) -> Counter:
        return Counter(list(self.patched.values()) + list(self.already.values()))

    def __str__(self) -> str:
        if not self.counts:
            return "fastbridge.patch: nothing to patch (no supported modules found)"
        lines = [f"fastbridge.patch: {len(self.patched)} module(s) newly patched, {len(self.already)} already; "
                 "will run:"]
        for name, n in sorted(self.counts.items()):
            lines.append(f"  {name} x{n}: {self.backends.get(name, 'backend not reported')}")
        lines.append("  (calls an integration cannot serve exactly run the library's own code; "
                     "fastbridge.stats(model) counts what each call ran)")
        return "\n".join(lines)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    for p in module.parameters():
        return p.device
    return default


def patch(model: nn.Module, *, verbose: bool = False, **options) -> nn.Module:
    """Patch every supported module of ``model`` in place; returns the same model (idempotent).

    The report of what was patched, and which backend will run it on the model's device, is kept as
    ``model.fastbridge_report`` and logged at INFO level on the "fastbridge" logger (printed instead with
    ``verbose=True``). Options are passed to each integration's patch function. After running,
    ``fastbridge.stats(model)`` says how many calls took the fused kernels, the reference or a fallback.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbridge.patch: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    used: set[str] = set()
    model_device = _device_of(model, torch.device("cpu"))
    devices: dict[str, torch.device] = {}
    for path, module in model.named_modules():
        done = getattr(module, _ATTR, None)
        if done is not None:
            report.already[path] = done
            devices.setdefault(done, _device_of(module, model_device))
            continue
        for integ in integrations():
            if integ.matches(module):
                integ.patch(module, **options)
                setattr(module, _ATTR, integ.name)
                report.patched[path] = integ.name
                devices.setdefault(integ.name, _device_of(module, model_device))
                used.add(integ.name)
                break
    for integ in integrations():
        if integ.name in used and integ.patch_model is not None:
            integ.patch_model(model, **options)
    for name, device in devices.items():
        integ = _REGISTRY.get(name)
        if integ is not None and integ.backend is not None:
            report.backends[name] = integ.backend(device)
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
