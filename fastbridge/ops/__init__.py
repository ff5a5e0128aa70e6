"""fastbridge.ops: the fused ops of API.md, each a torch.library custom op (torch.ops.fastbridge.*)."""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

from .adapter_block import adapter_block
from .gated_attention import gated_attention
from .gated_cross_attention import gated_cross_attention
from .qformer_cross_attention import qformer_cross_attention

__all__ = ["adapter_block", "gated_attention", "gated_cross_attention", "qformer_cross_attention"]

_CACHE_KEY = "torch.ops.fastbridge"


def source_tag(dirs) -> str:
    """A hash of every source file (.py, .h, .cpp, .cu) under ``dirs``: names and contents."""
    from .._build import hash_files

    h = hashlib.sha256()
    for root in dirs:
        hash_files(h, Path(root), (".py", ".h", ".cpp", ".cu"))
    return h.hexdigest()[:16]


def _tag_compile_caches(_inductor_config) -> None:
    """torch.compile's on-disk caches (FX graph, AOTAutograd) key a custom op by its name, not by what
    implements it: after fastbridge's ops change (an upgrade, an edited kernel) a cached graph would call
    them under the old contract -- a failed shape assert at best, wrong gradients at worst. The inductor
    config is part of every cache key, so one entry tagged with a hash of the sources that define the
    ops (this package, the Triton kernels, the C++/CUDA sources) keeps such graphs apart."""
    from .. import __version__
    from .. import kernels  # a namespace package with nothing imported (no triton needed)
    from .._build import ExtensionUnavailable, csrc_dir

    dirs = [Path(__file__).parent, *map(Path, kernels.__path__)]
    try:
        dirs.append(csrc_dir())
    except ExtensionUnavailable:  # no C++ sources installed: the C++ ops cannot load either
        pass
    tag = f"fastbridge {__version__} {source_tag(dirs)}"
    _inductor_config.unsafe_marked_cacheable_functions = {**_inductor_config.unsafe_marked_cacheable_functions,
                                                          _CACHE_KEY: tag}


_INDUCTOR_CONFIG = "torch._inductor.config"


class _TagWhenInductorLoads(importlib.abc.MetaPathFinder):
    """Tags torch._inductor.config right after it is imported. Importing it here would import
    torch._dynamo (about 1 s of ``import fastbridge``); nothing compiles before it is imported."""

    def find_spec(self, name, path, target=None):
        if name != _INDUCTOR_CONFIG:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_tag(module):
            exec_module(module)
            _tag_compile_caches(module)

        loader.exec_module = exec_and_tag
        return spec


if _INDUCTOR_CONFIG in sys.modules:
    _tag_compile_caches(sys.modules[_INDUCTOR_CONFIG])
elif not any(isinstance(f, _TagWhenInductorLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _TagWhenInductorLoads())
