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
import warnings
from typing import Iterator

import torch

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


@torch.compiler.assume_constant_result
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
    key = (op, unavailable_reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"fastbridge.ops.{op}: running the eager reference on {device.type} ({unavailable_reason}); "
            "results are the same, only speed and memory differ. This message is shown once.",
            FastbridgeFallbackWarning,
            stacklevel=3,
        )
    return "reference"


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
