"""Backend selection: the one place that decides whether an op runs a fused kernel or the reference.

Names (API.md):
  "auto"      -- the fused kernel where it can run, the eager reference elsewhere (default).
  "kernel"    -- force the fused kernels; raise a clear error where they cannot run.
  "reference" -- force the eager PyTorch references of fastbridge/reference.py.

Chosen by ``FASTBRIDGE_BACKEND`` (read at each call) and overridden by ``fastbridge.use_backend``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from typing import Callable, Iterator, TypeVar

import torch

_F = TypeVar("_F", bound=Callable)


def assume_constant(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (about 1 s) at import.

    That decorator imports torch._dynamo only to set the marker dynamo reads when it traces a call to
    ``fn`` (tests/test_foundation.py checks that the official decorator sets exactly this marker). If
    dynamo is loaded already, the official decorator is used.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn

BACKENDS = ("auto", "kernel", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastbridge_backend", default=None)
_warned: set[tuple[str, str]] = set()


class FastbridgeFallbackWarning(UserWarning):
    """Issued once per (op, reason) when "auto" runs the eager reference instead of a kernel.

    The reference computes the same result; only speed and memory differ.
    """


class BackendUnavailableError(RuntimeError):
    """Raised when the "kernel" backend is forced where the kernel cannot run."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@assume_constant
def current_backend() -> str:
    """The backend name in force: use_backend() if active, else FASTBRIDGE_BACKEND, else "auto".

    Under torch.compile it is read once, at trace time, and fixed in the compiled graph.
    """
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("FASTBRIDGE_BACKEND", "auto").strip().lower() or "auto",
                       "FASTBRIDGE_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run fastbridge ops with backend ``name`` ("auto", "kernel" or "reference")."""
    token = _override.set(_check_name(name, "fastbridge.use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def triton_interpret() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_triton_error: list[str | None] = []  # filled on first use (a plain global: torch.compile traces it)


def triton_import_error() -> str | None:
    if not _triton_error:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_error.append(None)
        except Exception as e:  # pragma: no cover - depends on the install
            _triton_error.append(f"triton cannot be imported ({type(e).__name__}: {e})")
    return _triton_error[0]


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why a Triton kernel cannot run on ``device`` right now (None if it can)."""
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        if triton_interpret():
            return None
        # 8.0 (A100) and later: Triton supports those (and compiles no bf16 dots below), and the launch
        # configurations are compile-checked for sm_80 .. sm_90 (python -m fastbridge.sm90_check --arch all).
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"the Triton kernels need a GPU of compute capability >= 8.0, {device} "
                    f"({torch.cuda.get_device_name(device)}) has {major}.{minor}")
        return None
    if device.type == "cpu":
        if triton_interpret():
            return None
        return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
    return f"no Triton kernel for device type {device.type!r}"


def resolve(unavailable_reason: str | None) -> tuple[str, str | None]:
    """What one call will run, without warning or raising: ("kernel", None) or ("reference", why).

    A forced "kernel" backend answers "kernel" (the op raises BackendUnavailableError itself).
    """
    name = current_backend()
    if name == "reference":
        return "reference", "backend 'reference' selected"
    if unavailable_reason is None or name == "kernel":
        return "kernel", None
    return "reference", unavailable_reason


def select(op: str, device: torch.device, unavailable_reason: str | None) -> str:
    """Resolve the backend for one call of ``op``: returns "kernel" or "reference".

    ``unavailable_reason`` is None when the op's kernel can run for these inputs, else why it cannot.
    """
    name = current_backend()
    if name == "reference":
        return "reference"
    if unavailable_reason is None:
        return "kernel"
    if name == "kernel":
        raise BackendUnavailableError(
            f"fastbridge.ops.{op}: backend 'kernel' was requested but cannot run on {device}: "
            f"{unavailable_reason}. Use backend 'auto' or 'reference' (FASTBRIDGE_BACKEND / fastbridge.use_backend)."
        )
    warn_once((op, unavailable_reason),
              f"fastbridge.ops.{op}: running the eager reference on {device.type} ({unavailable_reason}); "
              "results are the same, only speed and memory differ. This message is shown once.")
    return "reference"


def _package_dirs() -> tuple[str, ...]:
    """Folders whose frames are not the user's: torch, fastbridge and the libraries fastbridge patches."""
    dirs = []
    for name in ("torch", "fastbridge", "transformers", "peft", "accelerate"):
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    kernels = sys.modules.get("fastbridge.kernels")  # a link to the repository's kernels/ folder
    for path in getattr(kernels, "__path__", []):
        dirs += [os.path.abspath(path) + os.sep, os.path.realpath(path) + os.sep]
    return tuple(dirs)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by this function's caller point at the user's code.

    Walks out of the frames of torch (nn.Module.__call__ and friends), fastbridge and the libraries it
    patches (transformers, PEFT, accelerate) to the first frame of other code; 2 (the caller's caller)
    when there is none.
    """
    dirs = _package_dirs()
    # frame 0: here; 1: the function calling warnings.warn (stacklevel 1); 2: its caller (stacklevel 2)
    frame = sys._getframe(2)
    level = 2
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(dirs) and not filename.startswith("<frozen"):
            return level
        frame = frame.f_back
        level += 1
    return 2


def warn_once(key, message: str, category: type[Warning] = FastbridgeFallbackWarning) -> bool:
    """Issue ``message`` once per ``key`` (the one helper behind every fastbridge one-time warning).

    The warning points at the user's call site (:func:`user_stacklevel`), not at torch/nn/modules/module.py.
    Returns True when it was issued now. Skipped while torch.compile traces (the eager call warns).
    """
    if torch.compiler.is_compiling() or key in _warned:
        return False
    _warned.add(key)
    warnings.warn(message, category, stacklevel=user_stacklevel())
    return True


def describe_triton(device: torch.device) -> str:
    """What a fastbridge Triton op will run on ``device`` now, in words (for the patch report)."""
    device = torch.device(device)
    name = current_backend()
    if name == "reference":
        return f"reference on {device.type} (backend 'reference' selected)"
    reason = triton_unavailable_reason(device)
    if reason is None:
        if device.type == "cpu":
            return "kernel (Triton interpreter, cpu: TRITON_INTERPRET=1, slow, for testing)"
        return f"kernel (Triton, {device.type})"
    if name == "kernel":
        return f"none: backend 'kernel' is forced but cannot run on {device.type} ({reason}); calls will raise"
    if device.type == "cpu":
        gpu = "no GPU" if not torch.cuda.is_available() else "the model is on the CPU"
        return (f"reference on cpu ({gpu}; set TRITON_INTERPRET=1 to run the Triton kernels through the "
                "interpreter, slowly)")
    return f"reference on {device.type} ({reason})"


def describe_extension(device: torch.device) -> str:
    """What fastbridge's C++/CUDA attention op will run on ``device``, without building the extension."""
    from . import _build

    device = torch.device(device)
    if current_backend() == "reference":
        return f"reference on {device.type} (backend 'reference' selected)"
    state = _build.describe()
    if state.startswith("unavailable"):
        return f"transformers' SDPA on {device.type} (the C++ extension is {state})"
    if device.type == "cuda" and state.startswith("loaded") and not _build.has_cuda_kernels():
        return "transformers' SDPA on cuda (the C++ extension was built without CUDA kernels)"
    if device.type not in ("cpu", "cuda"):
        return f"transformers' SDPA on {device.type} (no C++/CUDA kernel for this device type)"
    where = "CUDA" if device.type == "cuda" else "C++"
    built = "" if state.startswith(("loaded", "built", "prebuilt")) else \
        f"; built on first use, about {_build._EST_S['cuda' if device.type == 'cuda' else 'cpu']} s"
    return f"kernel ({where} extension, {device.type}{built})"


def available_backends() -> dict[str, str]:
    """For ``fastbridge info``: which kernel families can run here and why not."""
    out = {}
    cpu_reason = triton_unavailable_reason(torch.device("cpu"))
    out["triton (cpu, interpreter)"] = "yes" if cpu_reason is None else f"no: {cpu_reason}"
    if torch.cuda.is_available():
        reason = triton_unavailable_reason(torch.device("cuda"))
        out["triton (cuda)"] = "yes" if reason is None else f"no: {reason}"
    else:
        out["triton (cuda)"] = "no: no CUDA device visible to torch"
    out["reference (eager PyTorch)"] = "yes"
    return out
