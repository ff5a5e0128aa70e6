"""Ahead-of-time build of the C++/CUDA extension for setup.py (only when FASTBRIDGE_BUILD_EXT=1).

    FASTBRIDGE_BUILD_EXT=1 pip install -e . --no-build-isolation

runs CMakeLists.txt (same sources and flags as the JIT build, csrc/*.txt) and puts
``libfastbridge_C.so`` and ``build.json`` (torch version, CUDA or not, source hash) into
``fastbridge/_C/`` (the source tree for an editable install, the wheel otherwise); fastbridge/_build.py
loads it when build.json matches the running torch and sources, else falls back to the JIT build.
It needs the torch that will run it: ``--no-build-isolation`` (an isolated build environment has no torch
and must not get a new one). CUDA kernels when torch has CUDA and a CUDA toolkit is found
(FASTBRIDGE_BUILD_CUDA=0: CPU only). This module is imported by setup.py only in that mode, so the
default install stays torch-free.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension
from setuptools.command.build_ext import build_ext

LIB = "libfastbridge_C.so"


def _torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # an isolated build environment
        raise SystemExit("FASTBRIDGE_BUILD_EXT=1 builds against the installed torch: run pip with "
                         f"--no-build-isolation (torch is not importable here: {e})") from e
    return torch, cpp_extension


def _source_hash(root: Path, cuda: bool) -> str:
    spec = importlib.util.spec_from_file_location("_fastbridge_build_for_aot", root / "fastbridge" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._source_hash(cuda)


class CMakeBuildExt(build_ext):
    """Builds the extension with CMake instead of setuptools' compiler drivers."""

    root: Path = Path(".")

    def run(self) -> None:
        torch, cpp_extension = _torch()
        root = self.root
        cuda = (os.environ.get("FASTBRIDGE_BUILD_CUDA", "").strip() != "0" and torch.version.cuda is not None
                and cpp_extension.CUDA_HOME is not None)
        editable = self.inplace or getattr(self, "editable_mode", False)
        out = (root / "fastbridge" / "_C") if editable else Path(self.build_lib) / "fastbridge" / "_C"
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "cmake"
        cfg = ["cmake", "-S", str(root), "-B", str(tmp), f"-DPython3_EXECUTABLE={sys.executable}",
               f"-DFASTBRIDGE_OUTPUT_DIR={out.resolve()}", f"-DFASTBRIDGE_WITH_CUDA={'ON' if cuda else 'OFF'}",
               "-DCMAKE_BUILD_TYPE=Release"]
        if cuda:
            cfg.append(f"-DCMAKE_CUDA_COMPILER={Path(cpp_extension.CUDA_HOME) / 'bin' / 'nvcc'}")
        print("fastbridge: building the C++ extension ahead of time" + (" with CUDA" if cuda else ""), flush=True)
        subprocess.run(cfg, check=True)
        subprocess.run(["cmake", "--build", str(tmp), "-j", str(max(1, os.cpu_count() or 1))], check=True)
        meta = {"library": LIB, "torch": torch.__version__, "cuda": cuda, "sources": _source_hash(root, cuda)}
        (out / "build.json").write_text(json.dumps(meta, indent=1) + "\n")

    def get_outputs(self):
        return []

    def get_output_mapping(self):
        return {}


def aot_setup_kwargs(root: Path) -> dict:
    """setup() keyword arguments of the ahead-of-time build."""
    CMakeBuildExt.root = Path(root).resolve()
    return {"ext_modules": [Extension("fastbridge._C.libfastbridge_C", sources=[])],
            "cmdclass": {"build_ext": CMakeBuildExt}}
