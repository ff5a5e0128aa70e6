"""Which code path each integration's calls took: ``fastbridge.stats(model)`` (API.md).

Every integration records one outcome per call:

* ``"fused"``     -- fastbridge's fused kernels ran (Triton / the C++-CUDA extension);
* ``"reference"`` -- fastbridge's eager reference ran (e.g. on CPU without ``TRITON_INTERPRET=1``, or
                     the "reference" backend was chosen): same results, eager speed;
* ``"fallback"``  -- the integration ran the library's original code (PEFT's forward, transformers' SDPA),
                     with the reason why.

Counts are process-wide, since the last :func:`reset_stats`. Calls made inside ``torch.compile``'d code
are not counted: recording is skipped while dynamo traces (a Python counter that changes every call would
otherwise be specialised into the graph and force recompiles), so the compiled graph carries no trace of
it and has no graph break.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

OUTCOMES = ("fused", "reference", "fallback")

# (integration, outcome, reason or None) -> number of calls. A plain dict: cheap, and never touched
# under torch.compile (see record()).
_counts: dict[tuple[str, str, Optional[str]], int] = {}


def record(integration: str, outcome: str, reason: Optional[str] = None) -> None:
    """Count one call of ``integration`` that took path ``outcome`` ("fused", "reference" or "fallback").

    ``reason`` says why a call fell back (or ran the reference); it is part of the key, so keep it short
    and free of per-call values (shapes are fine, tensors are not).
    """
    if torch.compiler.is_compiling():  # constant True while dynamo traces: the branch leaves the graph
        return
    if outcome not in OUTCOMES:
        raise ValueError(f"fastbridge._stats.record: 'outcome' must be one of {OUTCOMES}, got {outcome!r}")
    key = (integration, outcome, reason)
    _counts[key] = _counts.get(key, 0) + 1


def record_op(integration: str, unavailable_reason: Callable[[], Optional[str]]) -> None:
    """Record one call of ``integration`` that runs a fastbridge op: "fused" when the op will run its
    kernel, "reference" (with the reason) when it will run the eager reference.

    ``unavailable_reason``: a function giving the op's ``_kernel_unavailable(...)`` for the call's inputs,
    called only when recording (not under torch.compile).
    """
    if torch.compiler.is_compiling():
        return
    from ._backend import resolve

    backend, why = resolve(unavailable_reason())
    if backend == "kernel":
        record(integration, "fused")
    else:
        record(integration, "reference", why)


def reset_stats() -> None:
    """Forget every count (``fastbridge.reset_stats()``)."""
    _counts.clear()


@dataclass
class IntegrationStats:
    """The calls of one integration: how many ran fused, the reference, or a fallback (per reason)."""

    fused: int = 0
    reference: int = 0
    reference_reasons: dict[str, int] = field(default_factory=dict)
    fallback: dict[str, int] = field(default_factory=dict)  # reason -> calls

    @property
    def fallbacks(self) -> int:
        return sum(self.fallback.values())

    @property
    def total(self) -> int:
        return self.fused + self.reference + self.fallbacks

    def as_dict(self) -> dict:
        return {"fused": self.fused, "reference": self.reference, "fallback": dict(self.fallback),
                "total": self.total}


class Stats(dict):
    """``fastbridge.stats(...)``: integration name -> :class:`IntegrationStats`; ``print`` it for a summary."""

    def as_dict(self) -> dict:
        return {name: s.as_dict() for name, s in self.items()}

    def __str__(self) -> str:
        if not self:
            return ("fastbridge.stats: no calls recorded (since the last reset_stats(); calls inside "
                    "torch.compile'd code are not counted)")
        lines = ["fastbridge.stats: calls per integration (since the last reset_stats(); torch.compile'd "
                 "calls are not counted)"]
        width = max(len(n) for n in self)
        for name, s in self.items():
            lines.append(f"  {name:<{width}}  {s.total:>7} calls: {s.fused} fused, {s.reference} reference, "
                         f"{s.fallbacks} fallback")
            for why, n in sorted(s.reference_reasons.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {'':<{width}}    reference x{n}: {why}")
            for why, n in sorted(s.fallback.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {'':<{width}}    fallback x{n}: {why}")
        return "\n".join(lines)

    __repr__ = __str__


def _model_integrations(model: torch.nn.Module) -> set[str]:
    """The integration names that can record calls for ``model``: what patch() patched, fastbridge's own
    modules, and the "fastbridge" transformers attention where a (sub-)config selects it."""
    from .patch import _ATTR  # no import cycle at module level

    names: set[str] = set()
    for module in model.modules():
        name = getattr(module, _ATTR, None)
        if name is not None:
            names.add(name)
        own = getattr(type(module), "_fastbridge_stats_name", None)  # fastbridge's own modules
        if own is not None:
            names.add(own)
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "fastbridge":
            names.add(ATTENTION)
    if "transformers.QFormer" in names:
        names.add(ATTENTION)
    return names


# The integration name the transformers attention function records under (integrations/transformers.py).
ATTENTION = "transformers.attention(fastbridge)"


def stats(model: Optional[torch.nn.Module] = None, *, integrations: Optional[Iterable[str]] = None) -> Stats:
    """How many calls of each integration ran fused, the reference, or a fallback (and why).

    ``model``: show only the integrations that model uses (its patched modules, fastbridge modules and the
    "fastbridge" attention implementation); the counts themselves are process-wide since the last
    :func:`reset_stats`. Without ``model``, every integration that recorded a call.
    """
    keep = None
    if model is not None:
        keep = _model_integrations(model)
    if integrations is not None:
        keep = set(integrations) if keep is None else keep & set(integrations)
    out = Stats()
    for (name, outcome, reason), n in sorted(_counts.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")):
        if keep is not None and name not in keep:
            continue
        s = out.setdefault(name, IntegrationStats())
        if outcome == "fused":
            s.fused += n
        elif outcome == "reference":
            s.reference += n
            if reason:
                s.reference_reasons[reason] = s.reference_reasons.get(reason, 0) + n
        else:
            s.fallback[reason or "unspecified"] = s.fallback.get(reason or "unspecified", 0) + n
    if keep is not None:  # integrations the model uses but that ran no call yet: shown as 0 calls
        for name in sorted(keep):
            out.setdefault(name, IntegrationStats())
    return out
