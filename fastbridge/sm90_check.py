"""Compile fastbridge's Triton kernels for a GPU target without a GPU and report their resources.

    python -m fastbridge.sm90_check [--arch 90 | --arch 80 89 | --arch all] [--dtype bf16 [fp32 ...]] [--jobs N]
                                    [--allow-spills] [--only PREFIX]

What is compiled: the launches the launchers actually make. Each launcher (kernels/adapter_block.py,
kernels/gated_attention.py) is called on CPU tensors of representative shapes (adapter_block_launches,
gated_attention_launches: training / prefill with both dQ modes, short prompts, decode packed and not, with and
without split-K, the adapter at two row counts, and every autotune candidate) believing it runs on the target
arch with that arch's SM count; each kernel launch is recorded instead of run, bound by Triton's own binder for
the target -- integers equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get
divisibility hints, exactly as at launch -- and compiled once per distinct specialisation (sm_80 A100, sm_86
RTX 30xx / A6000, sm_89 RTX 40xx / L4 / L40, sm_90 H100; ``all``: each of them) to PTX and cubin with Triton's
bundled ptxas. Reported per launch: registers per thread, stack frame (spills), shared memory, and the
wgmma.mma_async / mma.sync instruction counts of the PTX (Hopper tensor cores read operands from shared memory;
mma.sync is the pre-Hopper path, operands in registers).

Exits 1 if any launch spills, needs more shared memory than a block of that arch may have
(kernels/_common.SMEM_PER_BLOCK), or -- for sm_90 and later -- is a hot kernel (the gated-attention key loops
whose matmul tiles have M >= 64 rows, where wgmma is possible) with an mma.sync matmul ("NOT WGMMA"); the other
kernels carry the reason they are exempt (decode tiles below 64 rows, memory-bound adapter kernels, prompt-sized
work). tests/test_sm90_compile.py runs it, so no such launch reaches a GPU run. --dtype calls the launchers with
fp16 or fp32 inputs (fp32: under torch's default "highest" matmul precision, fp32-tf32: under "high") instead of
bf16; several dtypes: one section each. --allow-spills: spills do not fail (fp32's configurations spill on every
arch; accepted).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastbridge.kernels._common import SMEM_PER_BLOCK
from fastbridge.kernels._strided import Strided

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Resources:
    name: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    wgmma_ops: int  # wgmma.mma_async instructions in the PTX (Hopper tensor cores, operands from shared memory)
    mma_sync_ops: int  # mma.sync instructions (Ampere-style tensor cores, operands in registers)
    # None: every matmul of this kernel must compile to wgmma on sm_90 (a "hot" kernel whose tiles allow it);
    # else why not (decode tile below 64 rows, memory-bound kernel, ...). Set by the check, not by ptxas.
    wgmma_exempt: str | None = None

    @property
    def wgmma(self) -> bool:
        return self.wgmma_ops > 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack > 0

    def not_wgmma(self, arch: int) -> bool:
        """A hot kernel for a Hopper target (arch >= 90) with a matmul that compiled to mma.sync."""
        return arch >= 90 and self.wgmma_exempt is None and self.mma_sync_ops > 0

    def row(self) -> str:
        return (f"{self.name:32s} {self.config:60s} regs={self.registers:3d} stack={self.stack:4d} "
                f"spill(st/ld)={self.spill_stores}/{self.spill_loads} smem={self.shared:6d} "
                f"wgmma={self.wgmma_ops:3d} mma.sync={self.mma_sync_ops:3d}")


def _aligned_paths(name: str, ty, path: tuple) -> list[tuple]:
    """Argument paths (Triton's attrs keys; a Strided argument's leaves are (arg, field[, stride])) that
    compile_kernel marks 16-divisible: pointers, the strides of a Strided argument, D and R."""
    if isinstance(ty, Strided):
        return [path + (0,)] + [path + (1, j) for j in range(len(ty.strides))]
    return [path] if ty.startswith("*") or name in ("D", "R") else []


def compile_kernel(jit_fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90, num_stages: int = 3):
    """Compile with 16-byte aligned pointers and multiple-of-16 head dims / strides (benchmarks/sweep_tiles.py's
    candidates and the table-checked kernels; the check itself compiles captured launches, compile_launch).
    ``signature``: Triton type per non-constexpr argument, a Strided of types for a tensor argument
    (kernels/_strided.py: ``Strided("*bf16", ("i32",) * 3)``)."""
    names = jit_fn.arg_names
    full_sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    attrs = {p: [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs
             for p in _aligned_paths(n, signature[n], (i,))}
    src = ASTSource(jit_fn, full_sig, constexprs, attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def count_ops(ptx: str) -> tuple[int, int]:
    """(wgmma.mma_async, mma.sync) instruction counts of a PTX listing."""
    return len(re.findall(r"\bwgmma\.mma_async\b", ptx)), len(re.findall(r"\bmma\.sync\b", ptx))


def resources(name: str, config: str, compiled, wgmma_exempt: str | None = "not classified") -> Resources:
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)

    def field(key):
        m = re.search(rf"{key}[:=]\s*(\d+)", out)
        return int(m.group(1)) if m else 0

    meta = compiled.metadata
    shared = getattr(meta, "shared", None) or field("SHARED")
    return Resources(name, config, field("REG"), 0, 0, field("STACK"), int(shared), *count_ops(ptx),
                     wgmma_exempt=wgmma_exempt)


# ------------------------------------------------------------------------------------------------------------
# The launches the check compiles: each launcher is called on CPU tensors of representative shapes with its
# kernels' launch replaced by a recorder, then every recorded launch is specialised by Triton's own binder
# (integers equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get divisibility
# hints) and compiled for the target: the specialisations that launch, not a neighbouring compile.
# ------------------------------------------------------------------------------------------------------------
class _Pointer:
    """A recorded tensor argument: what Triton's binder reads of it (element type, address), not its memory."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = t.data_ptr()

    def data_ptr(self):
        return self._ptr


def _stand_in(a):
    if isinstance(a, Strided):
        return a._replace(ptr=_stand_in(a.ptr))
    return _Pointer(a) if hasattr(a, "data_ptr") else a


def _stand_ins(args: tuple) -> tuple:
    return tuple(_stand_in(a) for a in args)


@dataclass
class Launch:
    name: str
    config: str
    fn: object
    args: tuple
    kwargs: dict
    wgmma_exempt: str | None


# The H100 has 132 SMs; the other archs' most common parts (A100 108, RTX 3090 82, RTX 4090 128).
SM_COUNT = {80: 108, 86: 82, 89: 128, 90: 132}

_FN_NAMES = {"_gated_attn_fwd_kernel": "gated_attn_fwd", "_gated_attn_fwd_split_kernel": "gated_attn_fwd_split",
             "_gated_attn_fwd_combine_kernel": "gated_attn_fwd_combine", "_gated_attn_bwd_pre_kernel":
             "gated_attn_bwd_pre", "_gated_attn_bwd_dkdv_kernel": "gated_attn_bwd_dkdv",
             "_gated_attn_bwd_dq_kernel": "gated_attn_bwd_dq", "_adapter_fwd_kernel": "adapter_fwd",
             "_adapter_bwd_rows_kernel": "adapter_bwd_rows", "_adapter_bwd_weights_kernel": "adapter_bwd_weights"}


def _jit_kernels(module):
    return [v for v in vars(module).values() if isinstance(v, JITFunction) and v.__name__ in _FN_NAMES]


def _capture(module, arch: int, call, env: dict | None = None) -> list[tuple]:
    """Run ``call()`` with ``module``'s kernels recording (fn, args, kwargs) instead of launching, the module
    believing it runs on ``arch`` with SM_COUNT[arch] SMs (and ``env`` set)."""
    recorded = []
    fns = _jit_kernels(module)
    saved = {n: getattr(module, n) for n in ("device_arch", "sm_count")}
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    try:
        for fn in fns:
            fn.run = (lambda f: lambda *a, grid, warmup, **kw: recorded.append((f, a, kw)))(fn)
        module.device_arch = lambda device: arch
        module.sm_count = lambda device: SM_COUNT.get(arch, 132)
        os.environ.update(env or {})
        call()
    finally:
        for fn in fns:
            del fn.run
        for n, v in saved.items():
            setattr(module, n, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return recorded


def _tiles(kw: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_R")
    short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_D": "BD", "BLOCK_R": "BR"}
    parts = [f"{short[k]}={kw[k]}" for k in keys if k in kw]
    return " ".join(parts + [f"warps={kw.get('num_warps', 4)}", f"stages={kw.get('num_stages', 3)}"])


def _ga_exempt(name: str, kw: dict) -> str | None:
    """Why a gated-attention kernel need not be all-wgmma on sm_90, or None. wgmma takes M in multiples of 64
    rows; the hot kernels' matmuls have the query tile (forward, dq) or the key tile (dkdv; also the query
    tile for the atomic dQ dot) as M."""
    if name in ("gated_attn_bwd_pre", "gated_attn_fwd_combine"):
        return "no key loop (prompt-sized / merge work)"
    if name == "gated_attn_bwd_dkdv":
        m = kw["BLOCK_N"] if not kw["ATOMIC_DQ"] else min(kw["BLOCK_N"], kw["BLOCK_M"])
    else:
        m = kw["BLOCK_M"]
    return None if m >= 64 else f"M tile {m} < 64"


def gated_attention_launches(arch: int = 90, dtype=None, fp32_precision: str = "highest"):
    """The gated-attention launches at representative shapes, per supported head dim: training / prefill
    (L = 4096, forward and both dQ modes of the backward), a 64-token prompt, decode (Lq = 1; pack-GQA) over a
    short cache and over a long one (split-K + combine), MHA decode (not packed), 16-query steps (packed into 64
    rows where that tile fits). B = 2, H = 8 query heads on Hkv = 2 KV heads (GQA group 4; MHA: 8), in the
    Hugging Face layout (B, L, H, D) viewed as (B, H, L, D), key padding mask, causal, a shared 10-token prompt."""
    import torch

    from fastbridge.kernels import _autotune
    from fastbridge.kernels import gated_attention as K

    dtype = dtype or torch.bfloat16
    B, H, P = 2, 8, 10

    def t(b, h, n, d):
        return torch.zeros(b, n, h, d, dtype=dtype).transpose(1, 2)

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(fp32_precision)
    try:
        for D in (16, 32, 64, 128, 256):
            for label, Lq, Lk, Hkv, backward in (
                    ("L=4096", 4096, 4096, 2, True), ("Lq=64", 64, 64, 2, False),
                    ("decode Lk=200", 1, 200, 2, False), ("decode Lk=4096", 1, 4096, 2, False),
                    ("decode MHA Lk=4096", 1, 4096, H, False), ("Lq=16 Lk=4096", 16, 4096, 2, False)):
                q, k, v = t(B, H, Lq, D), t(B, Hkv, Lk, D), t(B, Hkv, Lk, D)
                pk, pv = t(1, Hkv, P, D), t(1, Hkv, P, D)
                g = torch.zeros(H, dtype=dtype)
                kpm = torch.ones(B, Lk, dtype=torch.bool)
                args = (q, k, v, pk, pv, g, True, D ** -0.5, kpm)
                runs = [("", lambda: K.gated_attention_forward(*args), None, 0)]
                if backward:
                    out, lse_m, lse_p = q.clone(), torch.zeros(B, H, Lq), torch.zeros(B, H, Lq)
                    bargs = (q.clone(), q, k, v, pk, pv, g, out, lse_m, lse_p, True, D ** -0.5, kpm)
                    for mode in ("separate", "atomic"):
                        runs.append((mode, lambda: K.gated_attention_backward(*bargs), {K.DQ_ENV: mode}, 0))
                    # the autotune's other candidates (FASTBRIDGE_AUTOTUNE=1 may launch any of them)
                    for i in range(1, _autotune.MAX_CANDIDATES):
                        runs.append(("", lambda: K.gated_attention_forward(*args), None, i))
                        runs.append(("separate", lambda: K.gated_attention_backward(*bargs),
                                     {K.DQ_ENV: "separate"}, i))
                for mode, call, env, cand in runs:
                    with _autotune.forcing(cand):
                        recorded = _capture(K, arch, call, env)
                    for fn, a, kw in recorded:
                        base = _FN_NAMES[fn.__name__]
                        name = base + ("_atomic" if kw.get("ATOMIC_DQ") else "_acc" if kw.get("MAIN_FROM_ACC") else "")
                        tag = f" tune#{cand}" if cand else ""
                        yield Launch(name, f"D={D} {label}{tag} {_tiles(kw)}", fn, _stand_ins(a), kw,
                                     _ga_exempt(base, kw))
    finally:
        torch.set_float32_matmul_precision(prev)


def adapter_block_launches(arch: int = 90, dtype=None, fp32_precision: str = "highest"):
    """The adapter_block launches (forward, backward rows, weight gradients) per bottleneck tile r <= 16 .. 256,
    at d = 768 without LayerNorm and d = 4096 with it, for a large N (64-row tiles) and N = 2048 (row tiles
    picked from N and the SM count). Memory-bound (about r FLOPs per byte): wgmma is reported, not required."""
    import torch

    from fastbridge.kernels import adapter_block as K

    dtype = dtype or torch.bfloat16
    exempt = "memory-bound (about r FLOPs/byte, below the tensor-core ridge)"
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(fp32_precision)
    try:
        for r in (16, 32, 64, 128, 256):
            for d, has_ln in ((768, False), (4096, True)):
                for N in (64 * SM_COUNT.get(arch, 132), 2048):
                    x = torch.zeros(N, d, dtype=dtype)
                    wd, wu = torch.zeros(r, d, dtype=dtype), torch.zeros(d, r, dtype=dtype)
                    bd, bu = torch.zeros(r, dtype=dtype), torch.zeros(d, dtype=dtype)
                    lnw = torch.ones(d, dtype=dtype) if has_ln else None
                    lnb = torch.zeros(d, dtype=dtype) if has_ln else None
                    s = torch.ones((), dtype=dtype)

                    def both():
                        y, z, mean, rstd = K.adapter_forward(x, wd, bd, wu, bu, lnw, lnb, 1e-5, "gelu", 1.0, s, None)
                        K.adapter_backward(y, x, wd, wu, bu, lnw, lnb, "gelu", 1.0, s, z, mean, rstd, False)

                    for fn, a, kw in _capture(K, arch, both):
                        name = _FN_NAMES[fn.__name__]
                        yield Launch(name, f"r={r} d={d} ln={int(has_ln)} N={N} {_tiles(kw)}", fn, _stand_ins(a), kw,
                                     exempt)
    finally:
        torch.set_float32_matmul_precision(prev)


def compile_launch(launch: Launch, arch: int):
    """Specialise a recorded launch with Triton's binder for ``arch`` (as JITFunction.run would) and compile it;
    returns (specialisation key, compiled kernel)."""
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def specialisation_key(launch: Launch, arch: int) -> str:
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    return repr((launch.fn.__name__, specialization, sorted(options.items())))


def _i32(*names):
    return {n: "i32" for n in names}


_P, _F = "*bf16", "*fp32"
_T = Strided(_P, ("i32",) * 3)  # a (batch, head, row, feature) tensor argument (kernels/_strided.py)
# Launch signatures of the gated-attention kernels in bf16 (kernels/gated_attention.py), by kernel; also
# used by benchmarks/sweep_tiles.py to compile other launch configurations of the same kernels.
GA_SIGNATURES = {
    "fwd": dict(Q=_T, K=_T, V=_T, PK=_T, PV=_T, G=_F, KPM="*u8", OUT=_T, LSE_M=_F, LSE_P=_F,
                **_i32("H", "GROUP", "Lq", "Lk", "P", "D"), qk_scale="fp32"),
    "fwd_split": dict(Q=_T, K=_T, V=_T, KPM="*u8", ACC_PART=_F, ML_PART=_F,
                      **_i32("H", "GROUP", "Lq", "Lk", "D", "keys_per_split"), qk_scale="fp32"),
    "fwd_combine": dict(Q=_T, PK=_T, PV=_T, G=_F, ACC_PART=_F, ML_PART=_F, OUT=_T, LSE_M=_F, LSE_P=_F,
                        **_i32("H", "GROUP", "Lq", "P", "D", "n_splits"), qk_scale="fp32"),
    "pre": dict(Q=_T, PK=_T, PV=_T, G=_F, OUT=_T, DO=_T, LSE_P=_F, DELTA_M=_F, DELTA_P=_F, DG_PART=_F,
                DPK_PART=_F, DPV_PART=_F, **_i32("H", "Lq", "P", "D", "rows_per_prog"), qk_scale="fp32"),
    "dkdv": dict(Q=_T, K=_T, V=_T, DO=_T, KPM="*u8", LSE_M=_F, DELTA_M=_F, DK=_T, DV=_T, DQ_ACC=_F,
                 **_i32("H", "Hkv", "Lq", "Lk", "D"), qk_scale="fp32"),
    "dq": dict(Q=_T, K=_T, V=_T, PK=_T, PV=_T, G=_F, DO=_T, KPM="*u8", LSE_M=_F, LSE_P=_F, DELTA_M=_F,
               DELTA_P=_F, DQ=_T, DQ_ACC=_F, **_i32("H", "GROUP", "Lq", "Lk", "P", "D"), qk_scale="fp32"),
}


# --dtype: the torch dtype the launchers are called with, torch's fp32 matmul precision during the call (it
# decides the DOT_PREC they pass: kernels/_common.dot_precision) and the element size in bytes.
DTYPES = {"bf16": ("bfloat16", "highest", 2), "fp16": ("float16", "highest", 2), "fp32": ("float32", "highest", 4),
          "fp32-tf32": ("float32", "high", 4)}


def elem_size(dtype: str) -> int:
    return DTYPES[dtype][2]


@functools.lru_cache(maxsize=None)
def launches(arch: int = 90, dtype: str = "bf16") -> tuple[Launch, ...]:
    """Every distinct launch (by Triton specialisation) of the adapter_block and gated_attention launchers at the
    representative shapes, for ``arch`` and inputs of ``dtype``; the first shape that reaches one names it."""
    import torch

    tdtype, precision, _ = DTYPES[dtype]
    tdtype = getattr(torch, tdtype)
    seen, out = set(), []
    for launch in (*adapter_block_launches(arch, tdtype, precision), *gated_attention_launches(arch, tdtype, precision)):
        key = specialisation_key(launch, arch)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return tuple(out)


_IEEE_NOTE = " [3xTF32 > smem: launcher runs ieee]"


def _tf32x3_unfit(res: Resources, arch: int, consts: dict) -> bool:
    """fp32 with 3xTF32 dots that needs more shared memory than ``arch`` has: the launchers (kernels/_common.py
    ``launcher``) catch that OutOfResources and run the same configuration with fp32 FMA dots ("ieee")."""
    limit = SMEM_PER_BLOCK.get(arch)
    return limit is not None and res.shared > limit and consts.get("DOT_PREC") == "tf32x3"


def _check_one(job) -> Resources:
    arch, index, dtype = job
    launch = launches(arch, dtype)[index]
    res = resources(launch.name, launch.config, compile_launch(launch, arch), launch.wgmma_exempt)
    if _tf32x3_unfit(res, arch, launch.kwargs):  # report what runs: the ieee relaunch
        ieee = dataclasses.replace(launch, kwargs={**launch.kwargs, "DOT_PREC": "ieee"},
                                   config=launch.config + _IEEE_NOTE)
        res = resources(ieee.name, ieee.config, compile_launch(ieee, arch), ieee.wgmma_exempt)
    return res


# Kernels checked from a table of (name, config, kernel, signature in bf16, constexprs, warps, stages) rather
# than from captured launches: the gated cross-attention's own (fastbridge/sm90_gated_cross_attention.py).
_TABLE_POINTER = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp32-tf32": "*fp32"}
_TABLE_DOT_PREC = {"bf16": "ieee", "fp16": "ieee", "fp32": "tf32x3", "fp32-tf32": "tf32"}


def table_configs(arch: int = 90, dtype: str = "bf16") -> list[tuple]:
    from fastbridge import sm90_gated_cross_attention

    ptr, prec = _TABLE_POINTER[dtype], _TABLE_DOT_PREC[dtype]
    out = []
    for name, cfg, fn, sig, consts, warps, stages in sm90_gated_cross_attention.configs(arch, elem_size(dtype)):
        sig = {k: (ptr if v == "*bf16" else
                   v._replace(ptr=ptr) if isinstance(v, Strided) and v.ptr == "*bf16" else v) for k, v in sig.items()}
        if "DOT_PREC" in consts and name != "gca_tile_state":
            consts = {**consts, "DOT_PREC": prec}
        out.append((name, cfg, fn, sig, consts, warps, stages))
    return out


def _check_table_one(job) -> Resources:
    arch, index, dtype = job
    name, cfg, fn, sig, consts, warps, stages = table_configs(arch, dtype)[index]
    # not classified for wgmma: exempt from the Hopper wgmma verdict (the table compiles neighbouring
    # specialisations, not captured launches)
    res = resources(name, cfg, compile_kernel(fn, sig, consts, warps, arch, stages), "table-checked kernel")
    if _tf32x3_unfit(res, arch, consts):  # report what runs: the ieee relaunch
        res = resources(name, cfg + _IEEE_NOTE, compile_kernel(fn, sig, {**consts, "DOT_PREC": "ieee"}, warps, arch,
                                                               stages), "table-checked kernel")
    return res


def check_all(arch: int = 90, only: str | None = None, dtype: str = "bf16", jobs: int = 1) -> list[Resources]:
    """Compile every launch of launches(arch, dtype) whose kernel name starts with ``only``, then the table-checked
    kernels (gated cross-attention); ``jobs`` worker processes (1: in this one)."""
    work = [(arch, i, dtype) for i, launch in enumerate(launches(arch, dtype))
            if not only or launch.name.startswith(only)]
    table = [(arch, i, dtype) for i, c in enumerate(table_configs(arch, dtype)) if not only or c[0].startswith(only)]
    if jobs <= 1:
        return [_check_one(w) for w in work] + [_check_table_one(w) for w in table]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_check_one, work)) + list(pool.map(_check_table_one, table))


ARCHS = tuple(sorted(SMEM_PER_BLOCK))


def _archs(values: list[str]) -> list[int]:
    if values == ["all"]:
        return list(ARCHS)
    try:
        return [int(v) for v in values]
    except ValueError:
        raise SystemExit(f"--arch: expected compute capabilities like 80 89 90, or all; got {' '.join(values)}")


def report(arch: int, rows: list[Resources], allow_spills: bool = False) -> int:
    """Print the rows and the verdict for ``arch``; returns the number of failing configurations (spills unless
    ``allow_spills``, or more shared memory than SMEM_PER_BLOCK[arch])."""
    limit = SMEM_PER_BLOCK.get(arch)
    over = {id(r) for r in rows if limit is not None and r.shared > limit}
    for r in rows:
        print(r.row() + (f" SHARED MEMORY > {limit}" if id(r) in over else "")
              + (" NOT WGMMA" if r.not_wgmma(arch) else ""))
    allowed = " (allowed)" if allow_spills else ""
    print(f"{len(rows)} configurations, {sum(r.spills for r in rows)} spilling{allowed}")
    n_ieee = sum(_IEEE_NOTE in r.config for r in rows)
    if n_ieee:
        print(f"3xTF32: {n_ieee} fp32 configurations need more shared memory with 3xTF32 dots; their launchers run "
              "them with FMA dots (ieee), the rows above")
    if arch >= 90:
        hot = [r for r in rows if r.wgmma_exempt is None]
        print(f"wgmma: {sum(r.not_wgmma(arch) for r in hot)} of {len(hot)} hot kernels with mma.sync matmuls "
              f"(exempt: {len(rows) - len(hot)}, for the reason in wgmma_exempt)")
    if limit is None:
        print(f"shared memory: no per-block limit known for sm_{arch} (not checked)")
    else:
        print(f"shared memory: {len(over)} above sm_{arch}'s {limit} B per block "
              f"(largest {max((r.shared for r in rows), default=0)} B)")
    return sum((r.spills and not allow_spills) or id(r) in over or r.not_wgmma(arch) for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["90"],
                   help=f"compute capabilities, e.g. 90 or 80 89, or all ({', '.join(map(str, ARCHS))})")
    p.add_argument("--only", default=None, help="kernel name prefix, e.g. gated_attn")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["bf16"],
                   help="one or more; several: a section per (arch, dtype), headed '== sm_N DTYPE'")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--allow-spills", action="store_true", help="fail on shared memory only (fp32 spills)")
    a = p.parse_args(argv)
    archs = _archs(a.arch)
    failing = 0
    for dtype in a.dtype:
        for arch in archs:
            if len(a.dtype) > 1:
                print(f"== sm_{arch} {dtype}")
            elif len(archs) > 1:
                print(f"== sm_{arch}")
            failing += report(arch, check_all(arch, a.only, dtype, a.jobs), a.allow_spills)
    return 1 if failing else 0


if __name__ == "__main__":
    raise SystemExit(main())
