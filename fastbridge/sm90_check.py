"""Compile fastbridge's Triton kernels for a GPU target without a GPU and report their resources.

    python -m fastbridge.sm90_check [--arch 90 | --arch 80 89 | --arch all] [--dtype bf16 [fp32 ...]] [--jobs N]
                                    [--allow-spills]

For each launch configuration the launchers pick for that arch (sm_80 A100, sm_86 RTX 30xx / A6000,
sm_89 RTX 40xx / L4 / L40, sm_90 H100; ``all``: each of them), compiles the kernel to PTX and cubin with
Triton's bundled ptxas and reports registers per thread, stack frame (spills), shared memory and whether
the PTX uses wgmma (Hopper tensor-core instructions). Exits 1 if any configuration spills or needs more
shared memory than a block of that arch may have (kernels/_common.SMEM_PER_BLOCK); tests/test_sm90_compile.py
runs it, so no such configuration reaches a GPU run. --dtype compiles the kernels for fp16 or fp32 inputs
(fp32: dots as torch's default "highest" matmul precision, fp32-tf32: as "high") instead of bf16, with the
configurations the launchers pick for that element size (4 bytes for fp32); several dtypes: one section each.
--allow-spills: only shared memory fails (fp32's configurations spill on every arch; accepted).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastbridge.kernels._common import SMEM_PER_BLOCK

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
    wgmma: bool

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack > 0

    def row(self) -> str:
        return (f"{self.name:32s} {self.config:52s} regs={self.registers:3d} stack={self.stack:4d} "
                f"spill(st/ld)={self.spill_stores}/{self.spill_loads} smem={self.shared:6d} "
                f"wgmma={'yes' if self.wgmma else 'no'}")


def compile_kernel(jit_fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90, num_stages: int = 3):
    """Compile like a launch with 16-byte aligned pointers and multiple-of-16 sizes/strides would."""
    names = jit_fn.arg_names
    full_sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    aligned = [n for n in names if n not in constexprs and (signature[n].startswith("*") or n in ("D", "R")
                                                              or n.startswith("s"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(jit_fn, full_sig, constexprs, attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def resources(name: str, config: str, compiled) -> Resources:
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
    return Resources(name, config, field("REG"), 0, 0, field("STACK"), int(shared), "wgmma" in ptx)


def adapter_block_configs(arch: int = 90, elem_size: int = 2):
    """Every (kernel, config, ..., num_warps, num_stages) the adapter_block launchers can choose for ``arch`` and
    inputs of ``elem_size`` bytes; signatures in bf16 (_for_dtype swaps the pointer type)."""
    from fastbridge.kernels import adapter_block as K

    ptr = "*bf16"
    f32p = "*fp32"
    stages = K._num_stages(arch, elem_size)
    for block_r in (16, 32, 64, 128, 256):
        for d, has_ln in ((768, False), (4096, True)):
            bm, bd, warps = K._row_config(block_r, d, arch, elem_size)
            flags = dict(ACT=0, HAS_LN=has_ln, HAS_RES=False, HAS_S=True, BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=block_r,
                         DOT_PREC="ieee")
            cfg = f"r<={block_r} ln={int(has_ln)} BM={bm} BD={bd} warps={warps}"
            fwd_sig = dict(X=ptr, RES=ptr, Y=ptr, WD=ptr, BD=ptr, WU=ptr, BU=ptr, LNW=ptr, LNB=ptr, Z=ptr, MEAN=f32p,
                           RSTD=f32p, S=f32p, scale="fp32", eps="fp32", N="i32", D="i32", R="i32", stride_xm="i32",
                           stride_rm="i32", stride_ym="i32")
            fwd_c = dict(flags, HAS_LNB=has_ln, HAS_BD=True, HAS_BU=True)
            yield ("adapter_fwd", cfg, K._adapter_fwd_kernel, fwd_sig, fwd_c, warps, stages)
            rows_sig = dict(DY=ptr, X=ptr, DX=ptr, WD=ptr, WU=ptr, LNW=ptr, Z=ptr, MEAN=f32p, RSTD=f32p, S=f32p,
                            DZ=ptr, AG=f32p, scale="fp32", N="i32", D="i32", R="i32", stride_dym="i32",
                            stride_xm="i32", stride_dxm="i32")
            yield ("adapter_bwd_rows", cfg, K._adapter_bwd_rows_kernel, rows_sig, flags, warps, stages)
        for has_ln in (False, True):
            bn, bdw, r_tile, warps_w = K._weights_config(block_r, has_ln, arch)
            w_sig = dict(DY=ptr, X=ptr, Z=ptr, DZ=ptr, WD=ptr, LNW=ptr, LNB=ptr, MEAN=f32p, RSTD=f32p, DWU=f32p,
                         DWD=f32p, DBU=f32p, DBD=f32p, DLNW=f32p, DLNB=f32p, N="i32", D="i32", R="i32",
                         stride_dym="i32", stride_xm="i32", rows_per_split="i32")
            w_c = dict(ACT=0, HAS_LN=has_ln, HAS_LNB=has_ln, BLOCK_N=bn, BLOCK_D=bdw, BLOCK_R=r_tile, DOT_PREC="ieee")
            yield ("adapter_bwd_weights", f"r<={block_r} ln={int(has_ln)} BN={bn} BD={bdw} BR={r_tile} warps={warps_w}",
                   K._adapter_bwd_weights_kernel, w_sig, w_c, warps_w, stages)


def _i32(*names):
    return {n: "i32" for n in names}


_P, _F = "*bf16", "*fp32"
# Launch signatures of the gated-attention kernels in bf16 (kernels/gated_attention.py), by kernel; also
# used by benchmarks/sweep_tiles.py to compile other launch configurations of the same kernels.
GA_SIGNATURES = {
    "fwd": dict(Q=_P, K=_P, V=_P, PK=_P, PV=_P, G=_F, KPM="*u8", OUT=_P, LSE_M=_F, LSE_P=_F,
                **_i32("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "spkb", "spkh", "spkn",
                       "spvb", "spvh", "spvn", "sob", "soh", "som", "H", "GROUP", "Lq", "Lk", "P", "D"),
                qk_scale="fp32"),
    "fwd_split": dict(Q=_P, K=_P, V=_P, KPM="*u8", ACC_PART=_F, ML_PART=_F,
                      **_i32("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "H", "GROUP", "Lq",
                             "Lk", "D", "keys_per_split"), qk_scale="fp32"),
    "fwd_combine": dict(Q=_P, PK=_P, PV=_P, G=_F, ACC_PART=_F, ML_PART=_F, OUT=_P, LSE_M=_F, LSE_P=_F,
                        **_i32("sqb", "sqh", "sqm", "spkb", "spkh", "spkn", "spvb", "spvh", "spvn", "sob", "soh",
                               "som", "H", "GROUP", "Lq", "P", "D", "n_splits"), qk_scale="fp32"),
    "pre": dict(Q=_P, PK=_P, PV=_P, G=_F, OUT=_P, DO=_P, LSE_P=_F, DELTA_M=_F, DELTA_P=_F, DG_PART=_F,
                DPK_PART=_F, DPV_PART=_F,
                **_i32("sqb", "sqh", "sqm", "spkb", "spkh", "spkn", "spvb", "spvh", "spvn", "sob", "soh", "som",
                       "sdb", "sdh", "sdm", "H", "Lq", "P", "D", "rows_per_prog"), qk_scale="fp32"),
    "dkdv": dict(Q=_P, K=_P, V=_P, DO=_P, KPM="*u8", LSE_M=_F, DELTA_M=_F, DK=_P, DV=_P, DQ_ACC=_F,
                 **_i32("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sdb", "sdh", "sdm",
                        "sdkb", "sdkh", "sdkn", "sdvb", "sdvh", "sdvn", "H", "Hkv", "Lq", "Lk", "D"),
                 qk_scale="fp32"),
    "dq": dict(Q=_P, K=_P, V=_P, PK=_P, PV=_P, G=_F, DO=_P, KPM="*u8", LSE_M=_F, LSE_P=_F, DELTA_M=_F,
               DELTA_P=_F, DQ=_P, DQ_ACC=_F,
               **_i32("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "spkb", "spkh", "spkn",
                      "spvb", "spvh", "spvn", "sdb", "sdh", "sdm", "sdqb", "sdqh", "sdqm", "H", "GROUP", "Lq",
                      "Lk", "P", "D"), qk_scale="fp32"),
}


def gated_attention_configs(arch: int = 90, elem_size: int = 2):
    """Every (kernel, config) the gated_attention launchers pick for ``arch`` and inputs of ``elem_size`` bytes,
    per supported head dim; signatures in bf16. Lq: a long sequence, 64 (17 .. 64: one 64-row tile on sm_90)
    and decode (1)."""
    from fastbridge.kernels import gated_attention as K

    S = GA_SIGNATURES
    for D in (16, 32, 64, 128, 256):
        bd = K.pow2_at_least(D)
        bp = K._prefix_block(10)
        for Lq in (4096, 64, 1):
            bm, bn, warps, stages = K.fwd_config(D, Lq, arch, elem_size)
            c = dict(CAUSAL=True, HAS_KPM=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, BLOCK_D=bd, DOT_PREC="ieee")
            yield ("gated_attn_fwd", f"D={D} Lq={Lq} BM={bm} BN={bn} warps={warps}", K._gated_attn_fwd_kernel,
                   S["fwd"], c, warps, stages)
        bm, bn, warps, stages = K.fwd_config(D, 1, arch, elem_size)  # decode: split-K + combine
        c = dict(CAUSAL=True, HAS_KPM=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC="ieee")
        yield ("gated_attn_fwd_split", f"D={D} BM={bm} BN={bn} warps={warps}", K._gated_attn_fwd_split_kernel,
               S["fwd_split"], c, warps, stages)
        c = dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_D=bd, DOT_PREC="ieee")
        cw = K.combine_warps(bm, D)
        yield ("gated_attn_fwd_combine", f"D={D} BM={bm} warps={cw}", K._gated_attn_fwd_combine_kernel,
               S["fwd_combine"], c, cw, 1)
        bcfg = K.bwd_config(D, arch, elem_size)
        bm, bn, warps, stages = bcfg["pre"]
        c = dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_D=bd, DOT_PREC="ieee", GROUP=4)
        yield ("gated_attn_bwd_pre", f"D={D} BM={bm} warps={warps}", K._gated_attn_bwd_pre_kernel, S["pre"], c,
               warps, stages)
        bm, bn, warps, stages = bcfg["dkdv"]
        for atomic in (False, True):  # FASTBRIDGE_GA_DQ: separate / atomic
            c = dict(GROUP=4, CAUSAL=True, HAS_KPM=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC="ieee",
                     ATOMIC_DQ=atomic)
            yield ("gated_attn_bwd_dkdv" + ("_atomic" if atomic else ""), f"D={D} BM={bm} BN={bn} warps={warps}",
                   K._gated_attn_bwd_dkdv_kernel, S["dkdv"], c, warps, stages)
        bm, bn, warps, stages = bcfg["dq"]
        for from_acc in (False, True):
            c = dict(CAUSAL=True, HAS_KPM=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, BLOCK_D=bd, DOT_PREC="ieee",
                     MAIN_FROM_ACC=from_acc)
            yield ("gated_attn_bwd_dq" + ("_acc" if from_acc else ""), f"D={D} BM={bm} BN={bn} warps={warps}",
                   K._gated_attn_bwd_dq_kernel, S["dq"], c, warps, stages)


def all_configs(arch: int = 90, elem_size: int = 2):
    yield from adapter_block_configs(arch, elem_size)
    yield from gated_attention_configs(arch, elem_size)
    from fastbridge import sm90_gated_cross_attention  # its own table (issue 13)

    yield from sm90_gated_cross_attention.configs(arch, elem_size)


# --dtype: the pointer type the kernels are compiled for, the DOT_PREC its launch passes
# (kernels/_common.dot_precision) and its element size in bytes (the launchers' x / q.element_size()).
DTYPES = {"bf16": ("*bf16", "ieee", 2), "fp16": ("*fp16", "ieee", 2), "fp32": ("*fp32", "ieee", 4),
          "fp32-tf32": ("*fp32", "tf32", 4)}


def elem_size(dtype: str) -> int:
    return DTYPES[dtype][2]


def _for_dtype(sig: dict, consts: dict, dtype: str) -> tuple[dict, dict]:
    ptr, prec, _ = DTYPES[dtype]
    return {k: (ptr if v == _P else v) for k, v in sig.items()}, dict(consts, DOT_PREC=prec)


def _check_one(job) -> Resources:
    arch, index, dtype = job
    name, cfg, fn, sig, consts, warps, stages = list(all_configs(arch, elem_size(dtype)))[index]
    sig, consts = _for_dtype(sig, consts, dtype)
    return resources(name, cfg, compile_kernel(fn, sig, consts, warps, arch, stages))


def check_all(arch: int = 90, only: str | None = None, dtype: str = "bf16", jobs: int = 1) -> list[Resources]:
    """Compile every configuration of all_configs(arch) whose kernel name starts with ``only``; ``jobs``
    worker processes (1: in this one)."""
    work = [(arch, i, dtype) for i, (name, *_) in enumerate(all_configs(arch, elem_size(dtype)))
            if not only or name.startswith(only)]
    if jobs <= 1:
        return [_check_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_check_one, work))


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
        print(r.row() + (f" SHARED MEMORY > {limit}" if id(r) in over else ""))
    allowed = " (allowed)" if allow_spills else ""
    print(f"{len(rows)} configurations, {sum(r.spills for r in rows)} spilling{allowed}")
    if limit is None:
        print(f"shared memory: no per-block limit known for sm_{arch} (not checked)")
    else:
        print(f"shared memory: {len(over)} above sm_{arch}'s {limit} B per block "
              f"(largest {max((r.shared for r in rows), default=0)} B)")
    return sum((r.spills and not allow_spills) or id(r) in over for r in rows)


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
