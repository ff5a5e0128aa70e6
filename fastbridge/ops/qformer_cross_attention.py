"""fastbridge.ops.qformer_cross_attention: softmax(q kᵀ·scale + mask) v with dropout, fused (API.md).

The op is the C++/CUDA extension (csrc/, built on first use by fastbridge/_build.py), whose schemas live
in csrc/ops.cpp (``TORCH_LIBRARY(fastbridge, m)``):
  fastbridge::qformer_attn_fwd  (q, k, v, key_mask?, bias?, scale, dropout_p, rng?, allow_tf32) -> (out, stats)
  fastbridge::qformer_attn_bwd  its backward (recomputes the probabilities from stats: per row the
    score max m and log l, kept apart so a row masked with finfo.min everywhere keeps exact gradients)
  fastbridge::qformer_dropout_keep  the dropout keep mask the kernels apply (tests, debugging)
  fastbridge::qformer_cuda_smem_bytes  shared memory a CUDA launch needs (checked against the device first)
This module registers their autograd formula and fake (meta) kernels, so dispatch modes, profilers,
``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` see the op by name. The "reference"
backend calls fastbridge.reference.qformer_cross_attention with ordinary autograd, outside the op.

Masks: a bool (B, Lk) key mask (True = attend) goes to the kernels as a key mask; a float mask
broadcastable to (B, H, Lq, Lk) is added to the scaled scores (read through stride-0 broadcasting,
never materialised). The additive mask is a constant to the kernels: if it requires grad (and grad
mode is on) the op runs the reference, which differentiates it ("auto"), or raises ("kernel").
A query row with no visible key gives 0 (and zero gradients).

Dropout (training): inverted dropout on the probabilities, p = dropout_p, with a counter-based Philox
stream (csrc/philox.h): the kernels draw element (b, h, i, j) from (seed, offset, row (b·H + h)·Lq + i,
key group j / 4), so the backward replays exactly the forward's mask, and the CPU and CUDA kernels
draw the same mask for the same ``rng = [seed, offset]``. ``rng`` is drawn on q's device from that
device's generator (``generator``, else torch's default one there: the CPU generator for CPU tensors,
the CUDA generator for CUDA tensors, so ``torch.manual_seed`` / ``torch.cuda.manual_seed`` make runs
reproducible). On CUDA it stays on the device and the kernels read it there: under CUDA graphs
(``torch.compile(mode="reduce-overhead")``) each replay draws a new [seed, offset] with torch's own
graph-safe Philox state and so a new mask; a host rng passed to the ops under stream capture is refused.
(The reference backend draws its mask from torch.rand instead: same distribution, other stream.)

Masked keys (bool key mask False) influence nothing: NaN / inf in their k / v rows change no output
and no gradient, and their dk / dv are 0.

Second-order gradients (``create_graph=True``): the first-order gradients are then computed by
differentiating the reference math (in the reference's compute dtype, with the kernels' dropout mask
and masked keys' k / v read as zeros), so they can be differentiated again -- slower than the kernel's
backward, which runs whenever no graph of the backward is wanted.

fp32 on CUDA: TF32 tensor cores. With torch's float32 matmul precision "highest" (the default) the
kernels use the 3xTF32 split (fp32-accurate); with "high" / "medium" one TF32 product (faster,
~1e-3 relative error, as cuBLAS under the same setting).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import _build
from .. import reference as ref
from . import _autocast
from . import _validate as V

OP = "qformer_cross_attention"
_NS = "fastbridge"
_FWD = f"{_NS}::qformer_attn_fwd"
_BWD = f"{_NS}::qformer_attn_bwd"
_KEEP = f"{_NS}::qformer_dropout_keep"
CUDA_HEAD_DIMS = (32, 64, 128)  # 128 in bf16 / fp16 only

__all__ = ["qformer_cross_attention", "philox_rng", "dropout_keep_mask"]


# ----------------------------------------------------------------------------------- fake kernels
def _fwd_fake(q, k, v, key_mask, bias, scale, dropout_p, rng, allow_tf32):
    B, H, _, D = k.shape
    Lq = q.shape[2]
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq, 2), dtype=torch.float32)


def _grad_like(t):
    """The kernels' gradient layout (csrc/qformer_host.h grad_like): the input's own layout where it is
    dense with a unit last stride -- so autograd stores a leaf's grad without a re-layout copy (HF passes
    k, v as transposed views) -- else contiguous."""
    g = torch.empty_like(t)
    if g.dim() > 0 and g.shape[-1] > 1 and g.stride(-1) != 1:
        g = t.new_empty(t.shape)
    return g


def _bwd_fake(dout, q, k, v, out, stats, key_mask, bias, scale, dropout_p, rng, allow_tf32):
    return _grad_like(q), _grad_like(k), _grad_like(v)


def _keep_fake(like, rng, Lk, dropout_p):
    B, H, Lq, _ = like.shape
    return like.new_empty((B, H, Lq, Lk), dtype=torch.bool)


# --------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, bias, scale, dropout_p, rng, allow_tf32 = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, key_mask, bias, rng)
    ctx.cfg = (scale, dropout_p, allow_tf32)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dout, _dstats):
    q, k, v, out, stats, key_mask, bias, rng = ctx.saved_tensors
    scale, dropout_p, allow_tf32 = ctx.cfg
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dout, q, k, v)):
        # create_graph=True: the kernel's backward is not differentiable (its op has no autograd formula:
        # torch would return zeros for the second order); differentiate the reference math instead.
        grads = _differentiable_grads(ctx.needs_input_grad[:3], dout, q, k, v, key_mask, bias, scale, dropout_p, rng)
        return (*grads, None, None, None, None, None, None)
    dq, dk, dv = torch.ops.fastbridge.qformer_attn_bwd(dout, q, k, v, out, stats, key_mask, bias, scale, dropout_p,
                                                       rng, allow_tf32)
    return dq, dk, dv, None, None, None, None, None, None


def _differentiable_grads(needs, dout, q, k, v, key_mask, bias, scale, dropout_p, rng):
    """(dq, dk, dv) (None where not needed) as a differentiable function of dout, q, k, v: the reference's
    math (fastbridge.reference.qformer_cross_attention, in its compute dtype) with the kernels' dropout
    keep mask and the masked keys' k / v rows read as zeros, differentiated with create_graph=True."""
    B, H, Lk, D = k.shape
    cdt = ref.compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if qc.shape[0] != B:
        qc = qc.expand(B, -1, -1, -1)
    visible = None
    if key_mask is not None:
        visible = key_mask.view(B, 1, 1, Lk)
        hidden = ~key_mask.view(B, 1, Lk, 1)
        kc, vc = kc.masked_fill(hidden, 0.0), vc.masked_fill(hidden, 0.0)  # masked keys influence nothing
    scores = qc @ kc.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.to(cdt)
    p = ref._masked_softmax(scores, visible)
    if dropout_p > 0.0:
        keep = torch.ops.fastbridge.qformer_dropout_keep(dout.detach(), rng, Lk, dropout_p)
        p = p * keep.to(cdt) / (1.0 - dropout_p)
    out = (p @ vc).to(q.dtype)
    inputs = [t for t, n in zip((q, k, v), needs) if n]
    grads = iter(torch.autograd.grad(out, inputs, dout, create_graph=True)) if inputs else iter(())
    return tuple(next(grads) if n else None for n in needs)


_registered: list[bool] = []


def _register() -> None:
    """Fake kernels and the autograd formula of the extension's ops (once, after it is loaded)."""
    if _registered:
        return
    torch.library.register_fake(_FWD)(_fwd_fake)
    torch.library.register_fake(_BWD)(_bwd_fake)
    torch.library.register_fake(_KEEP)(_keep_fake)
    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)
    _registered.append(True)


def ensure_loaded() -> None:
    """Build / load the extension and register its Python parts; raises _build.ExtensionUnavailable."""
    _build.load()
    _register()


# The extension's library declares this module as the home of its Python registrations
# (m.set_python_module): importing it after the library was loaded registers them.
if _build._ops_present():
    _register()


@_backend.assume_constant
def _extension_reason() -> str:
    """'' when the extension is loaded (built on first use), else why not. Read once at trace time."""
    try:
        ensure_loaded()
        return ""
    except _build.ExtensionUnavailable as e:
        return str(e)


@_backend.assume_constant
def _cuda_kernels_built() -> bool:
    return _build.has_cuda_kernels()


@_backend.assume_constant
def _allow_tf32() -> bool:
    # torch's fp32 matmul precision, new API first (the legacy getter raises when the two are mixed)
    try:
        from ..kernels._common import fp32_matmul_allows_tf32
    except ImportError:  # pragma: no cover - no triton: the legacy getter (the C++ / CUDA ops need no triton)
        return torch.get_float32_matmul_precision() != "highest"
    return fp32_matmul_allows_tf32()


@_backend.assume_constant
def _cuda_smem_needed(dtype: torch.dtype, D: int, backward: bool) -> int:
    """Bytes of shared memory per block of the smallest CUDA launch (csrc/qformer_cuda_layout.h)."""
    return int(torch.ops.fastbridge.qformer_cuda_smem_bytes(dtype, D, backward))


@_backend.assume_constant
def _cuda_smem_allowed(index: int) -> Optional[int]:
    """The device's opt-in shared memory per block (None where torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def smem_shortfall(dtype: torch.dtype, D: int, backward: bool, allowed: Optional[int], device: str) -> Optional[str]:
    """Why the CUDA kernels cannot launch for dtype / head dim D on a device allowing ``allowed`` bytes of
    shared memory per block (an RTX 30xx / 40xx: 99 KB; A100: 163 KB; H100: 227 KB), or None."""
    if allowed is None:
        return None
    for bwd in (False, True) if backward else (False,):
        needed = _cuda_smem_needed(dtype, D, bwd)
        if needed > allowed:
            kind = "backward" if bwd else "forward"
            return (f"the CUDA {kind} kernel needs {needed} bytes of shared memory per block for {dtype} at head dim "
                    f"{D}; {device} allows {allowed}")
    return None


def _kernel_unavailable(q: Tensor, attn_mask: Optional[Tensor], k: Tensor, v: Tensor) -> Optional[str]:
    """Why the C++/CUDA kernels cannot serve this call (None: they can). ``k`` / ``v`` tell whether a
    backward will follow (any input requiring grad), whose kernel needs more shared memory."""
    if q.dtype == torch.float64:
        return "the C++/CUDA kernels compute in fp32 / fp16 / bf16, not float64"
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad and torch.is_grad_enabled():
        return "the additive attn_mask requires grad (the kernels treat masks as constants)"
    if q.device.type not in ("cpu", "cuda"):
        return f"no C++/CUDA kernel for device type {q.device.type!r}"
    reason = _extension_reason()
    if reason:
        return reason
    if q.device.type == "cuda":
        if not _cuda_kernels_built():
            return ("the C++ extension was built without CUDA kernels (torch without CUDA, or no CUDA toolkit "
                    "found when it was built)")
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return f"the CUDA kernels need compute capability >= 8.0, {q.device} has {major}.{minor}"
        D = q.shape[-1]
        if D not in CUDA_HEAD_DIMS or (D == 128 and q.dtype == torch.float32):
            return f"the CUDA kernels support head dims 32, 64 (and 128 in bf16 / fp16), got {D} in {q.dtype}"
        backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        return smem_shortfall(q.dtype, D, backward, _cuda_smem_allowed(index), str(q.device))
    return None


# ------------------------------------------------------------------------------------------ helpers
def philox_rng(generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """The [seed, offset] (int64) of one dropout call, drawn on ``generator``'s device from it, or on
    ``device`` (default: the CPU) from torch's default generator there -- the CUDA generator for a CUDA
    device. It stays on that device: the CUDA kernels read it there (CUDA-graph safe)."""
    if generator is not None:
        device = generator.device
    device = torch.device("cpu" if device is None else device)
    return torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64, device=device)


def dropout_keep_mask(like: Tensor, rng: Tensor, Lk: int, dropout_p: float) -> Tensor:
    """The bool keep mask (B, H, Lq, Lk) the kernels apply for ``rng`` to an out-shaped ``like``."""
    ensure_loaded()
    return torch.ops.fastbridge.qformer_dropout_keep(like, rng, int(Lk), float(dropout_p))


def _validate(q, k, v, attn_mask, scale, dropout_p, generator):
    V.tensor(OP, "q", q, ndim=4)
    V.tensor(OP, "k", k, ndim=4)
    B, H, Lk, D = k.shape
    if q.shape[1] != H or q.shape[3] != D or q.shape[0] not in (1, B):
        V.fail(OP, "q", f"of shape (B or 1, H, Lq, D) = ({B} or 1, {H}, Lq, {D}) (B, H, D of k)",
               f"shape {V._fmt_shape(q.shape)}")
    if Lk < 1:
        V.fail(OP, "k", "of shape (B, H, Lk, D) with at least one key (Lk >= 1)", f"shape {V._fmt_shape(k.shape)}")
    if D < 1:
        V.fail(OP, "k", "of shape (B, H, Lk, D) with a head dim D >= 1", f"shape {V._fmt_shape(k.shape)}")
    V.tensor(OP, "v", v, ndim=4)
    V.shape(OP, "v", v, tuple(k.shape), f"(B, H, Lk, D) = {V._fmt_shape(k.shape)} (k's shape)")
    V.same_device_dtype(OP, "q", q, {"k": k, "v": v})
    Lq = q.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            V.fail(OP, "attn_mask", "None or a torch.Tensor", type(attn_mask).__name__)
        if attn_mask.device != q.device:
            V.fail(OP, "attn_mask", f"on q's device {q.device}", f"device {attn_mask.device}")
        if attn_mask.dtype == torch.bool:
            V.shape(OP, "attn_mask", attn_mask, (B, Lk), f"(B, Lk) = ({B}, {Lk}) for a bool key mask (True = attend)")
        elif attn_mask.dtype in V.FLOAT_DTYPES:
            target = (B, H, Lq, Lk)
            ok = attn_mask.dim() <= 4 and all(s in (1, t) for s, t in zip(reversed(attn_mask.shape), reversed(target)))
            if not ok:
                V.fail(OP, "attn_mask", f"an additive float mask broadcastable to (B, H, Lq, Lk) = {target}",
                       f"shape {V._fmt_shape(attn_mask.shape)}")
        else:
            V.fail(OP, "attn_mask", f"a bool key mask (B, Lk) = ({B}, {Lk}) or a float additive mask broadcastable to "
                   f"(B, H, Lq, Lk)", f"dtype {attn_mask.dtype}")
    if scale is not None:
        scale = V.real_number(OP, "scale", scale, "None or a positive float (finite)", positive=True)
    dropout_p = V.real_number(OP, "dropout_p", dropout_p, "a float in [0, 1)")
    if not 0.0 <= dropout_p < 1.0:
        V.fail(OP, "dropout_p", "a float in [0, 1)", repr(dropout_p))
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            V.fail(OP, "generator", "None or a torch.Generator", type(generator).__name__)
        if not _same_device(generator.device, q.device):
            V.fail(OP, "generator", f"None or a torch.Generator on q's device {q.device} (the CPU generator draws "
                   f"for CPU tensors, a CUDA generator for CUDA tensors)", f"a generator on {generator.device}")
    return B, H, Lq, Lk, D, scale, dropout_p


def _same_device(a: torch.device, b: torch.device) -> bool:
    """a and b name one device (an index-less "cuda" is the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    if a.index is not None and b.index is not None:
        return False
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


# ------------------------------------------------------------------------------------------ public API
def qformer_cross_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Optional[Tensor] = None,
                            scale: Optional[float] = None, dropout_p: float = 0.0,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """Q-Former cross-attention: softmax(q kᵀ·scale + mask) v, inverted dropout on the probabilities.

    q (B or 1, H, Lq, D) -- a query batch of 1 broadcasts over k's batch B; k, v (B, H, Lk, D).
    attn_mask: None, a bool (B, Lk) key mask (True = attend), or an additive float mask broadcastable to
    (B, H, Lq, Lk); keys the bool mask hides influence nothing. scale defaults to D**-0.5. dropout_p > 0
    applies dropout (pass 0.0 in eval); generator: a torch.Generator on q's device that the Philox
    [seed, offset] is drawn from (default: torch's default generator of q's device). Returns (B, H, Lq, D)
    in q's dtype; differentiable in q, k, v, twice too (create_graph=True). Runs the C++ (CPU) / CUDA
    kernels, or the reference (backend "reference", float64, ...).
    """
    amp = _autocast.autocast_dtype(q) if isinstance(q, Tensor) else None
    if amp is not None:  # mixed precision: run in the dtype eager PyTorch would use (fastbridge/ops/_autocast.py)
        q, k, v = _autocast.cast(amp, q, k, v)
    B, H, Lq, Lk, D, scale, dropout_p = _validate(q, k, v, attn_mask, scale, dropout_p, generator)
    scale = D ** -0.5 if scale is None else scale
    if _backend.current_backend() == "reference" or \
            _backend.select(OP, q.device, _kernel_unavailable(q, attn_mask, k, v)) == "reference":
        return ref.qformer_cross_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p,
                                           generator=generator)
    key_mask = bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            key_mask = attn_mask
        else:
            bias = attn_mask if attn_mask.dtype == torch.float32 else attn_mask.float()  # before broadcasting
    rng = philox_rng(generator, q.device) if dropout_p > 0.0 else None
    out, _ = torch.ops.fastbridge.qformer_attn_fwd(q, k, v, key_mask, bias, scale, dropout_p, rng, _allow_tf32())
    return out
