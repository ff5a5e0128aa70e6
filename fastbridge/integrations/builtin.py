"""The integrations fastbridge.patch knows. Each later integration adds a register_integration call."""
from __future__ import annotations

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
))
