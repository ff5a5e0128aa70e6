"""Every transformers / PEFT version difference the integrations need, in one place.

The integrations ask these functions instead of testing versions themselves, so supporting a new release
means reading (and testing) this file only.

Differences handled here:

* **The KV-cache keyword.** transformers <= 5.23 passes the cache to an attention module as
  ``past_key_values=`` and updates it with ``cache.update(k, v, layer_idx)``; transformers >= 5.24 renamed
  it ``cache=`` and passes the remaining attention kwargs on, ``cache.update(k, v, layer_idx, kwargs=...)``
  (the old name is still accepted by the decorated transformers modules until 5.40). :func:`get_cache`
  accepts both spellings (and the older singular ``past_key_value``), :func:`update_cache` updates the
  cache exactly once the way the running version's own attention does.
* **Recording attentions** (``output_attentions``): transformers 5.x records them through forward hooks on
  the attention modules while a collector is active; older versions pass ``output_attentions=True``
  (:func:`recording_attentions`, :func:`foreign_hooks`).
* **Cached cross-attention keys / values**: ``cache.layers[i]`` in 5.x, ``key_cache[i]`` before
  (:func:`cached_kv`).
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Optional

import torch
from torch import nn

# Keyword names of the KV cache an attention module may receive, newest first.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
# Attention kwargs that are not "extra" kwargs forwarded to cache.update(kwargs=...) by transformers >= 5.24.
_NAMED_ATTENTION_ARGS = ("hidden_states", "position_embeddings", "attention_mask", *CACHE_KWARGS)


@functools.lru_cache(maxsize=None)
def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers, (0, 0) if it is not installed."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - the integrations are only used with transformers
        return (0, 0)
    parts = []
    for piece in transformers.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def cache_keyword() -> str:
    """The keyword this transformers passes the KV cache to attention modules under."""
    return "cache" if transformers_version() >= (5, 24) else "past_key_values"


def get_cache(kwargs: dict) -> tuple[Optional[str], Any]:
    """(keyword, cache) of the KV cache in an attention module's kwargs: either spelling; (None, None) if
    no cache is given. Two different non-None caches under both names is a caller error."""
    found = [(name, kwargs[name]) for name in CACHE_KWARGS if kwargs.get(name) is not None]
    if not found:
        return None, None
    if any(c is not found[0][1] for _, c in found[1:]):
        names = ", ".join(n for n, _ in found)
        raise TypeError(f"fastbridge: the attention received two different KV caches ({names}); pass one")
    return found[0]


def update_cache(cache, keyword: str, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                 kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Append this step's keys / values to ``cache`` exactly once, as the running transformers' own
    attention does; returns the keys / values to attend to (cached + new)."""
    if keyword == "cache":  # transformers >= 5.24: the remaining attention kwargs go along
        extra = {k: v for k, v in kwargs.items() if k not in _NAMED_ATTENTION_ARGS}
        return cache.update(key, value, layer_idx, kwargs=extra)
    return cache.update(key, value, layer_idx)


def without_cache(kwargs: dict) -> dict:
    """``kwargs`` without any KV-cache keyword (for code that must not touch the cache)."""
    return {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}


# transformers 5.x records attentions through forward hooks on the attention modules while a
# collector is active (utils.output_capturing); the fused layer skips the inner module, so recording
# attentions must run the original forward. Older versions pass output_attentions as a kwarg.
def recording_attentions(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    mod = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(mod, "_active_collector", None)
    if collector is None:
        return False
    if torch.compiler.is_compiling():  # Dynamo cannot trace ContextVar.get; transformers' compiled path is a global
        active = getattr(collector, "global_var", None) if getattr(collector, "compiling", False) else None
    else:
        try:
            active = collector.get()
        except LookupError:
            return False
    return active is not None and "attentions" in active


# transformers 5.x installs its output-capturing forward hooks (``output_capturing_hook``) on the
# attention modules for good the first time attentions are requested; they only act while a collector is
# active, which recording_attentions sends to the original forward. Any other hook on the inner module does.
def foreign_hooks(module: nn.Module) -> bool:
    if module._forward_pre_hooks:
        return True
    return any(getattr(h, "__name__", "") != "output_capturing_hook" for h in module._forward_hooks.values())


# the cached cross-attention keys / values of layer ``layer_idx`` (cache.layers[i] in 5.x).
def cached_kv(cache, layer_idx: int):
    if hasattr(cache, "layers"):
        return cache.layers[layer_idx].keys, cache.layers[layer_idx].values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]
