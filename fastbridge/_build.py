"""Build and load fastbridge's C++/CUDA extension (csrc/): JIT on first use, or a prebuilt library.

The extension holds the ``torch.ops.fastbridge.qformer_*`` ops (schemas in csrc/ops.cpp, CPU kernel,
CUDA kernels). Loading order:

1. a prebuilt library from the ahead-of-time build (``FASTBRIDGE_BUILD_EXT=1 pip install -e .
   --no-build-isolation`` → setup.py → CMakeLists.txt), ``fastbridge/_C/libfastbridge_C.so`` with its
   ``build.json``, used when that records this torch version and these sources;
2. else a JIT build with ninja (``torch.utils.cpp_extension.load``), cached under
   ``$FASTBRIDGE_CACHE_DIR`` (default ``~/.cache/fastbridge``)``/ext/<version>-torch<...>-<cpu|cuXY>-<hash>``:
   the directory name carries the fastbridge version, the torch version, CPU/CUDA and a hash of the
   sources and flags, so a change of any of them builds afresh and an unchanged one loads in
   milliseconds. A one-line message is printed while it builds.

CUDA sources are compiled when torch was built with CUDA (``torch.version.cuda``) and a CUDA toolkit is
found (``torch.utils.cpp_extension.CUDA_HOME``) -- never decided by ``torch.cuda.is_available()``, so a
build on a machine without a GPU still carries the CUDA kernels. ``FASTBRIDGE_BUILD_CUDA=0`` builds the
CPU part only. The sources and flags are listed once, in csrc/sources.txt, csrc/cxx_flags.txt and
csrc/nvcc_flags.txt (read by CMakeLists.txt and tests/test_qformer_nvcc.py too).

``fastbridge build`` (``fastbridge._build.build``) prebuilds; ``fastbridge info`` shows ``describe()``.
``FASTBRIDGE_NO_JIT=1`` never builds (only a prebuilt or already cached library is loaded).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ExtensionUnavailable", "build", "describe", "load", "unavailable_reason", "csrc_dir", "sources",
           "cxx_flags", "nvcc_flags", "with_cuda", "build_dir"]

PKG = Path(__file__).resolve().parent
LIB_NAME = "fastbridge_C"
PREBUILT_DIR = PKG / "_C"  # the ahead-of-time build puts libfastbridge_C.so + build.json here
# Rough first-build times (2 cores): the message shown while building. CPU: `python -m fastbridge build` from
# an empty FASTBRIDGE_CACHE_DIR took 30 s of compiler CPU time on the 2-core dev machine (ninja runs 2 jobs:
# about 15 s of wall clock when the machine is idle; 145 s measured while ~20 processes shared the 2
# cores). CUDA: not measured (no CUDA torch here).
_EST_S = {"cpu": 15, "cuda": 150}


class ExtensionUnavailable(RuntimeError):
    """The C++/CUDA extension cannot be built or loaded here (the message says why)."""


def csrc_dir() -> Path:
    """csrc/ of the source tree (editable install) or the copy installed as package data."""
    for cand in (PKG / "csrc", PKG.parent / "csrc"):
        if (cand / "sources.txt").is_file():
            return cand
    raise ExtensionUnavailable(f"the C++ sources (csrc/sources.txt) are not found next to {PKG}")


def _lines(name: str) -> list[str]:
    text = (csrc_dir() / name).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def sources(cuda: Optional[bool] = None) -> list[Path]:
    """The extension's source files (absolute paths); .cu files only when building with CUDA."""
    cuda = with_cuda() if cuda is None else cuda
    root = csrc_dir()
    return [root / s for s in _lines("sources.txt") if cuda or not s.endswith(".cu")]


def cxx_flags() -> list[str]:
    return _lines("cxx_flags.txt")


def nvcc_flags() -> list[str]:
    return _lines("nvcc_flags.txt")


def cuda_home() -> Optional[str]:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def with_cuda() -> bool:
    """CUDA kernels are built when torch has CUDA and a CUDA toolkit is found (FASTBRIDGE_BUILD_CUDA=0: never)."""
    if os.environ.get("FASTBRIDGE_BUILD_CUDA", "").strip() == "0":
        return False
    return torch.version.cuda is not None and cuda_home() is not None


def hash_files(h, root: Path, suffixes) -> None:
    """Feed every file under ``root`` (recursively) whose suffix is in ``suffixes`` into the hash ``h``: its
    path relative to root, then its bytes, in sorted order."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())


def _source_hash(cuda: bool) -> str:
    h = hashlib.sha256()
    hash_files(h, csrc_dir(), (".h", ".cuh", ".cpp", ".cu", ".txt"))
    h.update(repr((cuda, os.environ.get("TORCH_CUDA_ARCH_LIST", ""))).encode())
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)


def build_dir(cuda: Optional[bool] = None) -> Path:
    """The versioned JIT build directory: fastbridge version, torch version, CPU/CUDA, source hash."""
    from . import __version__

    cuda = with_cuda() if cuda is None else cuda
    root = Path(os.environ.get("FASTBRIDGE_CACHE_DIR") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastbridge")
    kind = f"cu{torch.version.cuda}" if cuda else "cpu"
    return root / "ext" / _slug(f"{__version__}-torch{torch.__version__}-{kind}-{_source_hash(cuda)[:12]}")


# ------------------------------------------------------------------------------------------- state
_lock = threading.Lock()
_loaded: list[str] = []   # path of the loaded library (a plain global list: read by torch.compile-safe code)
_failed: list[str] = []   # why loading failed (not retried in this process)


def _ops_present() -> bool:
    return hasattr(torch.ops.fastbridge, "qformer_attn_fwd")


def _prebuilt() -> Optional[Path]:
    meta = PREBUILT_DIR / "build.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    lib = PREBUILT_DIR / info.get("library", "")
    cuda = bool(info.get("cuda"))
    if not lib.is_file() or info.get("torch") != torch.__version__:
        return None
    try:
        if info.get("sources") != _source_hash(cuda):
            return None
    except ExtensionUnavailable:  # an install without the sources: trust the recorded torch version
        pass
    if cuda and torch.version.cuda is None:
        return None
    return lib


def _jit_build(verbose: bool) -> str:
    from torch.utils import cpp_extension

    cuda = with_cuda()
    bdir = build_dir(cuda)
    lib = bdir / f"{LIB_NAME}.so"
    if lib.is_file():
        torch.ops.load_library(str(lib))
        return str(lib)
    if os.environ.get("FASTBRIDGE_NO_JIT", "").strip() == "1":
        raise ExtensionUnavailable("the C++ extension is not built and FASTBRIDGE_NO_JIT=1 forbids building it "
                                   "(run `fastbridge build`)")
    bdir.mkdir(parents=True, exist_ok=True)
    est = _EST_S["cuda" if cuda else "cpu"]
    print(f"fastbridge: building the C++ extension (first use, ~{est} s{' with CUDA' if cuda else ''})… "
          f"[{bdir}]", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        cpp_extension.load(
            name=LIB_NAME,
            sources=[str(s) for s in sources(cuda)],
            extra_cflags=cxx_flags(),
            extra_cuda_cflags=nvcc_flags() if cuda else None,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(csrc_dir())],
            build_directory=str(bdir),
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001 - reported as unavailable, with the compiler's message
        msg = str(e).strip().splitlines()
        first = next((ln for ln in msg if "error" in ln.lower()), msg[0] if msg else type(e).__name__)
        raise ExtensionUnavailable(f"building the C++ extension failed ({first.strip()[:300]}); "
                                   f"run `fastbridge build` for the full log") from e
    if verbose:
        print(f"fastbridge: built {lib} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return str(lib)


def load(verbose: bool = False) -> str:
    """Load the extension (building it on first use); returns the library path.

    Raises ExtensionUnavailable (why) when it cannot be built or loaded. Failures are remembered for the
    process; ``build()`` retries.
    """
    if _loaded:
        return _loaded[0]
    if _failed:
        raise ExtensionUnavailable(_failed[0])
    with _lock:
        if _loaded:
            return _loaded[0]
        try:
            pre = _prebuilt()
            if pre is not None:
                torch.ops.load_library(str(pre))
                path = str(pre)
            elif _ops_present():  # loaded by someone else (torch.ops.load_library of a prebuilt .so)
                path = "(already loaded)"
            else:
                path = _jit_build(verbose)
        except ExtensionUnavailable as e:
            _failed.append(str(e))
            raise
        except Exception as e:  # noqa: BLE001 - OSError from dlopen, missing sources, ...
            _failed.append(f"loading the C++ extension failed: {type(e).__name__}: {e}")
            raise ExtensionUnavailable(_failed[0]) from e
        _loaded.append(path)
        return path


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded (building it if needed), else why it cannot be."""
    try:
        load()
        return None
    except ExtensionUnavailable as e:
        return str(e)


def has_cuda_kernels() -> bool:
    """Whether the loaded extension carries the CUDA kernels (after a successful load)."""
    if not _loaded:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastbridge::qformer_attn_fwd", "CUDA")


def build(verbose: bool = True) -> str:
    """Prebuild (or rebuild after a failure) and load the extension; returns the library path.

    For ``fastbridge build``: prints the compiler commands when ``verbose``; raises ExtensionUnavailable.
    """
    _failed.clear()
    path = load(verbose=verbose)
    if verbose:
        cuda = "with" if has_cuda_kernels() else "without"
        print(f"fastbridge: C++ extension ready ({cuda} CUDA kernels): {path}")
    return path


def describe() -> str:
    """One line for ``fastbridge info``: the extension's state, without building anything."""
    if _loaded:
        return f"loaded ({'CPU + CUDA' if has_cuda_kernels() else 'CPU'} kernels) from {_loaded[0]}"
    if _failed:
        return f"unavailable: {_failed[0]}"
    try:
        pre = _prebuilt()
        if pre is not None:
            return f"prebuilt (ahead of time): {pre}"
        cuda = with_cuda()
        lib = build_dir(cuda) / f"{LIB_NAME}.so"
    except ExtensionUnavailable as e:
        return f"unavailable: {e}"
    what = "CPU + CUDA" if cuda else "CPU only" + ("" if torch.version.cuda is None else ": no CUDA toolkit found")
    if lib.is_file():
        return f"built, cached ({what}): {lib}"
    return f"not built yet ({what}); JIT-built on first use or by `fastbridge build` into {lib.parent}"


# ------------------------------------------------------------------------------ nvcc compile check
NVCC_ARCHS = ("80", "90a")  # A100 and H100 (sm_90a: the arch-specific Hopper target)


def find_nvcc() -> Optional[str]:
    """nvcc from CUDA_HOME / torch's CUDA_HOME, else PATH (works with a CPU build of torch too)."""
    import shutil

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cuda_home(), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_command(source: Path, arch: str, out: Path, nvcc: str) -> list[str]:
    """The JIT build's nvcc flags (torch's common flags, C++20, csrc/nvcc_flags.txt), for one arch."""
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{csrc_dir()}"]
    return [nvcc, "-c", str(source), "-o", str(out), *incs, *cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", *nvcc_flags(),
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> list[dict]:
    """[{kernel, arch, registers, stack, spill_stores, spill_loads}] from `-Xptxas -v` output."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return rows


def demangle(name: str) -> str:
    import subprocess

    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return name
    out = re.sub(r"fastbridge::\(anonymous namespace\)::|\(fastbridge::QfParams(, bool\*)?\)", "", out)
    return out.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")


def nvcc_check(archs=NVCC_ARCHS, out_dir: Optional[Path] = None, timeout: float = 900) -> list[dict]:
    """Compile every .cu of csrc/sources.txt with nvcc for each arch (in parallel, one nvcc per arch)
    with the JIT build's flags; returns ptxas's resource usage per kernel. Raises RuntimeError with
    nvcc's output when a compilation fails, ExtensionUnavailable when no nvcc is found."""
    import subprocess
    import tempfile

    nvcc = find_nvcc()
    if nvcc is None:
        raise ExtensionUnavailable("nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)")
    cu = [s for s in sources(cuda=True) if s.suffix == ".cu"]
    with tempfile.TemporaryDirectory(prefix="fastbridge-nvcc-") as tmp:
        out_dir = Path(out_dir or tmp)
        procs = []
        for src in cu:
            for arch in archs:
                cmd = nvcc_command(src, arch, out_dir / f"{src.stem}.sm_{arch}.o", nvcc)
                procs.append((src, arch, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          text=True)))
        rows = []
        for src, arch, proc in procs:
            log, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed for {src.name} (sm_{arch}):\n{log[-6000:]}")
            for r in parse_ptxas(log):
                r["source"] = src.name
                rows.append(r)
    return rows


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fastbridge._build", description="build the extension, or "
                                 "compile the CUDA sources for sm_80 / sm_90a and print registers and spills")
    ap.add_argument("--nvcc-check", action="store_true")
    args = ap.parse_args(argv)
    if not args.nvcc_check:
        build(verbose=True)
        return 0
    rows = nvcc_check()
    bad = 0
    for r in sorted(rows, key=lambda r: (r["arch"], demangle(r["kernel"]))):
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0) + r.get("stack", 0)
        bad += spill > 0
        print(f"{r['arch']:8s} {demangle(r['kernel']):44s} regs={r.get('registers', '?'):>3} "
              f"stack={r.get('stack', 0)} spill(st/ld)={r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}")
    print(f"{len(rows)} kernels, {bad} spilling")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
