"""fastbridge: fused kernels for parameter-efficient vision-language bridges."""
__version__ = "0.1.0"

from ._backend import FastbridgeFallbackWarning, current_backend, use_backend
from ._stats import reset_stats, stats
from . import ops, reference
from .checkpoint import load_trainable, save_trainable
from .patch import Integration, patch, register_integration, unpatch


def add_adapters(model, *args, **kwargs):
    """Insert fastbridge BottleneckAdapters after the FFN of each block of a Hugging Face model.

    See fastbridge.integrations.adapters.add_adapters for the arguments.
    """
    from .integrations.adapters import add_adapters as _add

    return _add(model, *args, **kwargs)


def remove_adapters(model, **kwargs):
    """Remove the adapters add_adapters inserted and restore the model exactly."""
    from .integrations.adapters import remove_adapters as _remove

    return _remove(model, **kwargs)


__all__ = [
    "__version__", "ops", "reference", "use_backend", "current_backend", "FastbridgeFallbackWarning",
    "patch", "unpatch", "register_integration", "Integration", "save_trainable", "load_trainable",
    "add_adapters", "remove_adapters", "stats", "reset_stats",
]
