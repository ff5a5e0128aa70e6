"""Launch-configuration sweep of the gated-attention kernels (kernels/gated_attention.py).

Finds the best (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim D, in two steps:

    python benchmarks/sweep_tiles.py check [--d 64,128] [--kernels ...] [--out DIR] [--jobs N] [--interpret]
    python benchmarks/sweep_tiles.py run [--candidates FILE] [--d 128] [--shapes 4096x4,1024x16] [--out DIR]
                                         [--max-per-kernel 12] [--kernels ...]

check (no GPU needed)
    Enumerates a candidate grid per kernel and D (GRID; the launchers' current defaults always included),
    skips those whose register tiles cannot fit (prune_reason), compiles the rest for sm_90 with
    fastbridge.sm90_check (Triton's bundled ptxas, bf16) in two specialisations -- that check's constexprs
    and the ones `run` times (VARIANTS) -- and keeps those without spills (stack 0) and within the H100's
    227 KB of shared memory per block in both. Writes DIR/sweep_candidates.json (default DIR
    /tmp/fastbridge-sweep): registers / shared memory / wgmma of every survivor, the reason of every
    rejection. About 1 s per compile; --jobs processes (default: all CPUs).
    --interpret then runs the survivors in the Triton interpreter (a subprocess with TRITON_INTERPRET=1, the
    `interpret` subcommand) on a small odd-sized fp32 problem (INTERPRET_SHAPE) against the float64
    reference -- forward and every gradient, in the candidate's dQ mode, outputs poisoned with NaN -- and
    rejects any that computes wrong. The interpreter ignores num_warps and num_stages, so one run per
    distinct (kernel, D, BLOCK_M, BLOCK_N) stands for all its warps / stages variants.

run (CUDA GPU; exits with code 2 without one)
    Per kernel and D, times the whole launcher with only that kernel's configuration replaced (they read
    fwd_config / bwd_config as module globals at call time; override() swaps and restores them): the
    forward launcher for "fwd", the backward launcher on the default forward's out / lse for the backward
    kernels, the other backward kernels at their defaults. Before it is timed, every candidate's outputs
    are compared with the default configuration's (bf16 tolerance, outputs poisoned with NaN): a mismatch
    is reported, never timed. Candidates: the survivors in --candidates FILE (a check's JSON; copy it where
    the GPU machine can read it), else the grid is compiled and filtered first, as check does (no
    interpreter step). At most --max-per-kernel per kernel and D: first one per (BLOCK_M, BLOCK_N) tile
    (the warps / stages variant nearest the default's), then the other variants of the fastest tiles.
    Timing: triton.testing.do_bench medians at the H100 shapes (default L=4096 B=4 and L=1024 B=16, H=32,
    D=128, P=10, bf16, causal, MHA). Writes DIR/sweep_results.json (device, versions, date, ms and TFLOP/s
    of every candidate) and DIR/sweep_results.md, the printed table: per kernel and D the default, the
    best candidate (by geometric-mean speed-up over the shapes), their times and the speed-up. About 2-3 s
    per candidate (compile, check, time): the defaults take about 3 minutes on an H100. --write-table: the
    fwd / dkdv / dq winners (>= 2 % faster than the built-in default, else the default) go into this GPU's
    per-arch default table, kernels/tuned/sm<arch>.json, which the launchers read (kernels/_autotune.py);
    commit it after `python -m fastbridge.sm90_check --arch <arch>` passes (it compiles the table's entries).

Kernels (names in the JSON and --kernels): fwd (the training / prefill forward; the decode split and
combine kernels are not swept), pre, dkdv, dq (backward, FASTBRIDGE_GA_DQ=separate), dkdv_atomic and
dq_atomic (FASTBRIDGE_GA_DQ=atomic: dkdv also accumulates dQ; dq only adds the prefix part, so its BLOCK_N
is unused). "pre" has no key tile: BLOCK_M, num_warps and num_stages are swept there.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fastbridge.kernels import gated_attention as GA
from fastbridge.kernels._common import H100_ARCH, SMEM_PER_BLOCK
from fastbridge.sm90_check import GA_SIGNATURES

DEFAULT_OUT = Path("/tmp/fastbridge-sweep")
TABLE_DIR = Path(__file__).resolve().parent.parent / "kernels" / "tuned"  # per-arch tables (kernels/_autotune.py)
CANDIDATES_FILE = "sweep_candidates.json"
RESULTS_FILE = "sweep_results.json"
SMEM_LIMIT = SMEM_PER_BLOCK[H100_ARCH]  # H100: maximum dynamic shared memory per block (bytes)
HEAD_DIMS = (64, 128, 256)
TRAIN_LQ = 4096  # fwd_config depends on Lq only below 65 rows (decode); any training length gives the default
PREFIX_LEN = 10  # P of the H100 shapes (benchmarks/notes/gated_attention.md); sets BLOCK_P = 16

# Candidate grid per kernel; an axis left out stays at the default configuration's value.
_BWD_AXES = dict(block_m=(32, 64, 128), block_n=(32, 64, 128), warps=(4, 8), stages=(1, 2, 3))
GRID = {
    "fwd": dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8), stages=(2, 3, 4)),
    "pre": dict(block_m=(32, 64, 128), warps=(4, 8), stages=(1, 2)),
    "dkdv": _BWD_AXES,
    "dkdv_atomic": _BWD_AXES,
    "dq": _BWD_AXES,
    "dq_atomic": dict(block_m=(32, 64, 128), warps=(4, 8), stages=(1, 2, 3)),
}
KERNELS = tuple(GRID)
# Configuration fields a kernel ignores: "pre" has no key tile; the atomic-mode dq kernel only adds the
# prefix part (no main-key loop, no BLOCK_N).
UNUSED = {"pre": ("block_n",), "dq_atomic": ("block_n",)}
# bwd_config entry and FASTBRIDGE_GA_DQ mode of each backward kernel.
BWD_ENTRY = {"pre": "pre", "dkdv": "dkdv", "dkdv_atomic": "dkdv", "dq": "dq", "dq_atomic": "dq"}
DQ_MODE = {"fwd": "separate", "pre": "separate", "dkdv": "separate", "dq": "separate", "dkdv_atomic": "atomic",
           "dq_atomic": "atomic"}
# fp32 values of register tiles per thread (prune_reason) above which a candidate is not compiled: in a
# full compile of the grid (D 64, 128, 256) every candidate above it spilled, and those compile slowest.
MAX_ACC_PER_THREAD = 160

_FWD_DEFAULT = GA.fwd_config
_BWD_DEFAULT = GA.bwd_config


# ------------------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Candidate:
    kernel: str
    d: int
    block_m: int
    block_n: int
    warps: int
    stages: int

    @property
    def config(self) -> tuple[int, int, int, int]:
        """The launcher's tuple: (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
        return self.block_m, self.block_n, self.warps, self.stages

    @property
    def tile(self) -> tuple[int, int]:
        return self.block_m, self.block_n

    @property
    def label(self) -> str:
        """The swept values; "-" for a field the kernel ignores (see UNUSED)."""
        unused = UNUSED.get(self.kernel, ())
        bn = "-" if "block_n" in unused else self.block_n
        stages = "-" if "stages" in unused else self.stages
        return f"BM={self.block_m} BN={bn} w={self.warps} s={stages}"

    @property
    def is_default(self) -> bool:
        return self.config == default_config(self.kernel, self.d)


def default_config(kernel: str, d: int) -> tuple[int, int, int, int]:
    """The launchers' current configuration of ``kernel`` at head dim ``d`` (training lengths)."""
    if kernel == "fwd":
        return tuple(_FWD_DEFAULT(d, TRAIN_LQ))
    return tuple(_BWD_DEFAULT(d)[BWD_ENTRY[kernel]])


def prune_reason(c: Candidate) -> str | None:
    """Why a candidate is not worth compiling (None: compile it). Register tiles per thread: the forward
    and dq hold a BM×D accumulator and a BM×BN score tile; dkdv holds dk, dv (2·BN×D) plus scores and dP
    (2·BM×BN); pre and dq_atomic only BM×D tiles (always small enough). The threshold is set from a full
    compile of the grid (MAX_ACC_PER_THREAD)."""
    dkdv = 2 * c.block_n * c.d + 2 * c.block_m * c.block_n
    tiles = {
        "fwd": c.block_m * c.d + c.block_m * c.block_n,
        "dkdv": dkdv,
        "dkdv_atomic": dkdv,
        "dq": c.block_m * c.d + c.block_m * c.block_n,
    }.get(c.kernel)
    if tiles is not None and not c.is_default and tiles / (32 * c.warps) > MAX_ACC_PER_THREAD:
        return f"{tiles // (32 * c.warps)} fp32 accumulator values per thread > {MAX_ACC_PER_THREAD}"
    return None


def enumerate_candidates(kernels=KERNELS, head_dims=HEAD_DIMS) -> list[Candidate]:
    """The grid of every kernel and D, the default first, without duplicates (unpruned)."""
    out = []
    for kernel in kernels:
        axes = GRID[kernel]
        for d in head_dims:
            bm, bn, warps, stages = default_config(kernel, d)
            default = Candidate(kernel, d, bm, bn, warps, stages)
            seen = {default}
            out.append(default)
            names = list(axes)
            for values in itertools.product(*(axes[n] for n in names)):
                c = replace(default, **dict(zip(names, values)))
                if c not in seen:
                    seen.add(c)
                    out.append(c)
    return out


# -------------------------------------------------------------------------------- sm_90 compile check
_JIT = {"fwd": GA._gated_attn_fwd_kernel, "pre": GA._gated_attn_bwd_pre_kernel,
        "dkdv": GA._gated_attn_bwd_dkdv_kernel, "dq": GA._gated_attn_bwd_dq_kernel}


# Specialisations compiled per candidate: fastbridge.sm90_check's (causal, key padding mask, GQA group 4)
# and the one `run` times (causal, no padding mask, MHA). ptxas allocates them differently -- some
# configurations spill in only one -- so a candidate must fit in both.
VARIANTS = {"padded-gqa4": dict(HAS_KPM=True, GROUP=4), "plain-mha": dict(HAS_KPM=False, GROUP=1)}


def compile_args(c: Candidate, variant: str):
    """(jit function, signature, constexprs, num_warps, num_stages) of ``c`` in one of VARIANTS, as
    fastbridge.sm90_check compiles the kernels: bf16, causal, the H100 prompt's BLOCK_P."""
    base = c.kernel.removesuffix("_atomic")
    atomic = c.kernel.endswith("_atomic")
    flags = VARIANTS[variant]
    block_d, block_p = GA.pow2_at_least(c.d), GA._prefix_block(PREFIX_LEN)
    tiles = dict(BLOCK_M=c.block_m, BLOCK_D=block_d, DOT_PREC="ieee")
    if base != "pre":
        tiles["BLOCK_N"] = c.block_n
    if base != "dkdv":
        tiles["BLOCK_P"] = block_p
    mask = dict(CAUSAL=True, HAS_KPM=flags["HAS_KPM"])
    constexprs = {
        "fwd": dict(mask, **tiles, PACK=False),  # training / prefill: not the decode pack-GQA tile
        "pre": dict(tiles, GROUP=flags["GROUP"]),
        "dkdv": dict(mask, **tiles, GROUP=flags["GROUP"], ATOMIC_DQ=atomic),
        "dq": dict(mask, **tiles, MAIN_FROM_ACC=atomic),
    }[base]
    return _JIT[base], GA_SIGNATURES[base], constexprs, c.warps, c.stages


@dataclass
class Checked:
    """A candidate with its sm_90 resources (the larger over VARIANTS; wgmma: in both), or the reason it
    was rejected."""
    candidate: Candidate
    registers: int | None = None
    stack: int | None = None
    shared: int | None = None
    wgmma: bool | None = None
    compile_s: float | None = None
    rejected: str | None = None
    interpret: str | None = None  # after --interpret: "ok", "wrong: <mismatches>" or "error: <exception>"

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(out.pop("candidate"))
        out["default"] = self.candidate.is_default
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> "Checked":
        cand = Candidate(**{f: d[f] for f in Candidate.__dataclass_fields__})
        return cls(cand, **{f: d.get(f) for f in cls.__dataclass_fields__ if f != "candidate"})


def compile_check(c: Candidate, arch: int = 90) -> Checked:
    """Compile ``c`` for ``arch`` in each of VARIANTS (stopping at the first failure) and judge it: no stack
    frame (spills), shared memory within SMEM_LIMIT. Runs without a GPU; needs real @triton.jit
    functions, i.e. TRITON_INTERPRET unset."""
    from fastbridge.sm90_check import compile_kernel, resources

    reason = prune_reason(c)
    if reason is not None:
        return Checked(c, rejected=f"pruned: {reason}")
    checked = Checked(c, registers=0, stack=0, shared=0, wgmma=True)
    t0 = time.perf_counter()
    for variant in VARIANTS:
        fn, sig, constexprs, warps, stages = compile_args(c, variant)
        try:
            r = resources(c.kernel, c.label, compile_kernel(fn, sig, constexprs, warps, arch, stages))
        except Exception as e:  # noqa: BLE001 - e.g. OutOfResources at compile time: a rejection, with the reason
            checked.rejected = f"compile ({variant}): {type(e).__name__}: {e}"[:300]
            break
        checked.registers = max(checked.registers, r.registers)
        checked.stack = max(checked.stack, r.stack)
        checked.shared = max(checked.shared, r.shared)
        checked.wgmma = checked.wgmma and r.wgmma
        if r.shared > SMEM_LIMIT:  # first: a launch would fail outright (and such a tile often spills too)
            checked.rejected = f"shared memory ({variant}) {r.shared} B > {SMEM_LIMIT} B"
        elif r.spills:
            checked.rejected = f"spills ({variant}: stack {r.stack} B, {r.registers} registers)"
        if checked.rejected:
            break
    checked.compile_s = time.perf_counter() - t0
    return checked


def check_candidates(candidates: list[Candidate], jobs: int, log=print) -> list[Checked]:
    """compile_check every candidate in ``jobs`` worker processes (without TRITON_INTERPRET), in order."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compiling for sm_90 needs real @triton.jit functions: unset TRITON_INTERPRET")
    out = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, checked in enumerate(pool.map(compile_check, candidates), 1):
            out.append(checked)
            c = checked.candidate
            verdict = "ok" if checked.rejected is None else f"rejected: {checked.rejected}"
            res = "" if checked.registers is None else (f" regs={checked.registers} smem={checked.shared} "
                                                       f"wgmma={'yes' if checked.wgmma else 'no'}")
            log(f"[{i}/{len(candidates)} {time.perf_counter() - t0:5.0f}s] {c.kernel:11s} D={c.d:3d} "
                f"{c.label:24s}{res} {verdict}")
    return out


# ------------------------------------------------------------------------------------------- numerics
FWD_OUTPUTS = ("out", "lse_m", "lse_p")
GRADS = ("dq", "dk", "dv", "dpk", "dpv", "dg")
# Relative-to-max tolerances, as tests/conftest.py: fp32 kernels against the float64 reference (check
# --interpret); bf16 candidates against the default configuration's bf16 outputs (run).
TOL = {"fp32": (1e-4, 1e-5), "bf16": (6e-2, 1e-2)}


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the block (the launchers read FASTBRIDGE_GA_DQ / _POISON per call)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def override(c: Candidate):
    """Launch ``c``'s kernel with its configuration at head dim c.d, everything else as by default, in
    its dQ mode. Swaps kernels.gated_attention's fwd_config / bwd_config; restores them on exit. The per-arch
    table and FASTBRIDGE_AUTOTUNE are off meanwhile (the launch takes exactly these configurations)."""
    if c.kernel == "fwd":
        def fwd_config(D, Lq, arch=H100_ARCH, elem_size=2):
            return c.config if D == c.d and Lq > 64 else _FWD_DEFAULT(D, Lq, arch, elem_size)

        GA.fwd_config = fwd_config
    else:
        def bwd_config(D, arch=H100_ARCH, elem_size=2):
            cfg = _BWD_DEFAULT(D, arch, elem_size)
            return {**cfg, BWD_ENTRY[c.kernel]: c.config} if D == c.d else cfg

        GA.bwd_config = bwd_config
    table = GA._autotune.table
    GA._autotune.table = lambda arch: {}
    try:
        with _env(**{GA.DQ_ENV: DQ_MODE[c.kernel], GA._autotune.ENV: "0"}):
            yield
    finally:
        GA.fwd_config, GA.bwd_config = _FWD_DEFAULT, _BWD_DEFAULT
        GA._autotune.table = table


def mismatches(got: dict, want: dict, precision: str) -> list[str]:
    """One line per tensor of ``want`` that ``got`` misses: max |got - want| (entries equal in both, infinities
    included, count 0; a NaN always counts) above TOL[precision]·max |finite want| + atol."""
    tol, atol = TOL[precision]
    bad = []
    for name, expected in want.items():
        a, e = got[name].detach().double().cpu(), expected.detach().double().cpu()
        finite = e[torch.isfinite(e)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        if a.shape != e.shape:
            bad.append(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
            continue
        worst = torch.where(a == e, 0.0, (a - e).abs()).max().item() if e.numel() else 0.0
        if not worst <= tol * scale + atol:  # NaN fails too
            bad.append(f"{name}: max error {worst:.2e} = {worst / max(scale, 1e-12):.2e} of max |expected| "
                       f"> {tol:.0e} (+{atol:.0e} absolute)")
    return bad


@dataclass
class Problem:
    """One causal problem without padding mask, the prompt shared by the batch: inputs and the launchers."""
    b: int
    seqlen: int
    h: int
    hkv: int
    d: int
    p: int
    tensors: dict = field(repr=False)  # q, k, v, pk, pv, g (per-head gate value, fp32), dout

    @classmethod
    def make(cls, b, seqlen, h, hkv, d, p, dtype, device, seed=0) -> "Problem":
        gen = torch.Generator(device).manual_seed(seed)

        def rnd(*shape, dt=dtype):
            return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dt)

        t = dict(q=rnd(b, h, seqlen, d), k=rnd(b, hkv, seqlen, d), v=rnd(b, hkv, seqlen, d),
                 pk=rnd(1, hkv, p, d), pv=rnd(1, hkv, p, d), g=rnd(h, dt=torch.float32) * 0.7,
                 dout=rnd(b, h, seqlen, d))
        return cls(b, seqlen, h, hkv, d, p, t)

    @property
    def label(self) -> str:
        return f"L={self.seqlen} B={self.b}"

    @property
    def scale(self) -> float:
        return self.d ** -0.5

    def forward(self) -> dict:
        t = self.tensors
        outs = GA.gated_attention_forward(t["q"], t["k"], t["v"], t["pk"], t["pv"], t["g"], True, self.scale, None)
        return dict(zip(FWD_OUTPUTS, outs))

    def backward(self, fwd: dict) -> dict:
        t = self.tensors
        grads = GA.gated_attention_backward(t["dout"], t["q"], t["k"], t["v"], t["pk"], t["pv"], t["g"], fwd["out"],
                                            fwd["lse_m"], fwd["lse_p"], True, self.scale, None)
        return dict(zip(GRADS, grads))

    def reference(self) -> dict:
        """float64 out and gradients (fastbridge.reference, gate_fn="identity": g is the gate value)."""
        from fastbridge import reference as R

        t = self.tensors
        leaves = [t[n].detach().double().requires_grad_(True) for n in ("q", "k", "v", "pk", "pv", "g")]
        out = R.gated_attention(*leaves, causal=True, scale=self.scale, gate_fn="identity")
        grads = torch.autograd.grad(out, leaves, t["dout"].double())
        return {"out": out.detach(), **dict(zip(GRADS, grads))}


# ----------------------------------------------------------------------------- interpreter check
INTERPRET_SHAPE = dict(b=1, seqlen=147, h=2, hkv=1, p=3)  # odd length: ragged tiles; GQA group 2


def interpret_check(c: Candidate, problem: Problem, expected: dict) -> list[str]:
    """Run forward and backward with ``c`` (in its dQ mode; every output poisoned with NaN before the
    kernels write it) and return the mismatches against the float64 ``expected`` (fp32 tolerance)."""
    with override(c), _env(FASTBRIDGE_POISON="1"):
        fwd = problem.forward()
        got = {"out": fwd["out"], **problem.backward(fwd)}
    return mismatches(got, expected, "fp32")


def interpret_all(checked: list[Checked], log=print) -> None:
    """Set .interpret of every compiled survivor: one fp32 interpreter run per distinct (kernel, D,
    BLOCK_M, BLOCK_N) -- the interpreter ignores num_warps / num_stages -- shared by its variants."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the interpreter check needs TRITON_INTERPRET=1 set before Python starts")
    groups: dict[tuple, list[Checked]] = {}
    for ch in checked:
        if ch.rejected is None:
            c = ch.candidate
            groups.setdefault((c.kernel, c.d, c.block_m, c.block_n), []).append(ch)
    problems: dict[int, tuple[Problem, dict]] = {}
    t0 = time.perf_counter()
    for i, ((kernel, d, bm, bn), members) in enumerate(groups.items(), 1):
        if d not in problems:
            p = Problem.make(**INTERPRET_SHAPE, d=d, dtype=torch.float32, device="cpu")
            problems[d] = (p, p.reference())
        p, expected = problems[d]
        try:
            bad = interpret_check(members[0].candidate, p, expected)
            verdict = "ok" if not bad else "wrong: " + "; ".join(bad)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is rejected with the reason
            verdict = f"error: {type(e).__name__}: {e}"[:300]
        for ch in members:
            ch.interpret = verdict
            if verdict != "ok":
                ch.rejected = f"interpreter: {verdict}"
        log(f"[{i}/{len(groups)} {time.perf_counter() - t0:5.0f}s] {kernel:11s} D={d:3d} BM={bm} BN={bn} "
            f"({len(members)} variants): {verdict}")


# ------------------------------------------------------------------------------------------------ run
@dataclass
class Timed:
    """A candidate's median ms per problem (label -> ms), or why it was not timed."""
    candidate: Candidate
    ms: dict = field(default_factory=dict)
    error: str | None = None


class Runner:
    """Times candidates on a set of problems (one head dim), checking each against the default first."""

    def __init__(self, problems: list[Problem], bench, log=print):
        self.problems = problems
        self.bench = bench  # bench(fn) -> median ms of fn()
        self.log = log
        self._saved = {}     # problem index -> the default forward's outputs (the backward's inputs)
        self._expected = {}  # ("fwd" or the backward's dQ mode, problem index) -> the defaults' outputs

    def _call(self, kernel: str, i: int):
        p = self.problems[i]
        if kernel == "fwd":
            return p.forward
        if i not in self._saved:
            self._saved[i] = p.forward()
        saved = self._saved[i]
        return lambda: p.backward(saved)

    def _reference(self, kernel: str, i: int) -> dict:
        """The default configurations' outputs of ``kernel``'s launcher, in its dQ mode."""
        key = ("fwd" if kernel == "fwd" else DQ_MODE[kernel], i)
        if key not in self._expected:
            with _env(**{GA.DQ_ENV: DQ_MODE[kernel]}, FASTBRIDGE_POISON="1"):
                self._expected[key] = self._call(kernel, i)()
        return self._expected[key]

    def time(self, c: Candidate) -> Timed:
        """Verify ``c`` on every problem (outputs poisoned before the kernels write them), then time it."""
        timed = Timed(c)
        try:
            with override(c):
                for i, p in enumerate(self.problems):
                    with _env(FASTBRIDGE_POISON="1"):
                        got = self._call(c.kernel, i)()
                    bad = mismatches(got, self._reference(c.kernel, i), "bf16")
                    if bad:
                        timed.error = f"wrong at {p.label}: " + "; ".join(bad)
                        return timed
                for i, p in enumerate(self.problems):
                    timed.ms[p.label] = self.bench(self._call(c.kernel, i))
        except Exception as e:  # noqa: BLE001 - a launch failure (e.g. out of resources) is reported, not fatal
            timed.error = f"{type(e).__name__}: {e}"[:300]
            self.log(traceback.format_exc())
        finally:
            verdict = timed.error or "  ".join(f"{k}: {v:.3f} ms" for k, v in timed.ms.items())
            self.log(f"  {c.kernel:11s} D={c.d:3d} {c.label:24s}{' (default)' if c.is_default else ''}  {verdict}")
        return timed

    def sweep(self, candidates: list[Candidate], budget: int) -> list[Timed]:
        """Time at most ``budget`` of one kernel's candidates (the default always, first): one per
        (BLOCK_M, BLOCK_N) tile -- its warps / stages variant nearest the default's -- then the other
        variants of the tiles, fastest tile first (none of a tile whose first candidate failed)."""
        default = next(c for c in candidates if c.is_default)
        _, _, dw, ds = default.config

        def nearness(c):
            return c.warps != dw, abs(c.stages - ds), c.stages, c.warps

        tiles: dict[tuple, list[Candidate]] = {default.tile: [default]}
        for c in sorted(candidates, key=nearness):
            if c != default:
                tiles.setdefault(c.tile, []).append(c)
        timed = [self.time(variants[0]) for variants in list(tiles.values())[:budget]]
        base = timed[0]
        if base.error:
            raise RuntimeError(f"the default configuration of {default.kernel} D={default.d} failed: {base.error}")
        ranked = sorted(timed, key=lambda t: speedup(base, t), reverse=True)
        for t in ranked:
            if t.error:
                continue
            for c in tiles[t.candidate.tile][1:]:
                if len(timed) >= budget:
                    return timed
                timed.append(self.time(c))
        return timed


def speedup(base: Timed, t: Timed) -> float:
    """Geometric mean over the problems of default ms / candidate ms (0 for a failed candidate)."""
    if t.error or not t.ms:
        return 0.0
    return math.exp(sum(math.log(base.ms[k] / t.ms[k]) for k in base.ms) / len(base.ms))


def do_bench_median(warmup_ms: float, rep_ms: float):
    from triton.testing import do_bench

    return lambda fn: float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4,1024x16' -> [(L 4096, B 4), (L 1024, B 16)]."""
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected LxB[,LxB...] (e.g. 4096x4,1024x16), got {text!r}")
    return shapes


def _tflops(kernel: str, p: Problem, ms: float) -> float:
    import floors

    shape = floors.AttnShape(b=p.b, h=p.h, hkv=p.hkv, lq=p.seqlen, lk=p.seqlen, d=p.d, p=p.p)
    return floors.ga_flops(shape, "fwd" if kernel == "fwd" else "bwd") / (ms * 1e-3) / 1e12


def results_json(timed: dict, problems: dict, env: dict, args: dict) -> dict:
    """timed: (kernel, d) -> [Timed] (default first); problems: d -> [Problem]."""
    records = []
    for (kernel, d), ts in timed.items():
        for t in ts:
            rec = dict(asdict(t.candidate), default=t.candidate.is_default, ms=t.ms,
                       tflops={p.label: float(f"{_tflops(kernel, p, t.ms[p.label]):.4g}") for p in problems[d]
                               if p.label in t.ms},
                       speedup=round(speedup(ts[0], t), 4))
            if t.error:
                rec["error"] = t.error
            records.append(rec)
    return dict(env, sweep=args, records=records)


def markdown_table(timed: dict, problems: dict) -> str:
    """Per kernel and D: default and best configuration, their ms per problem, the speed-up."""
    labels = list(dict.fromkeys(p.label for ps in problems.values() for p in ps))
    head = ["kernel", "D", "default", "best"] + [f"{lb} ms (default → best)" for lb in labels] + \
           ["speed-up", "timed", "wrong / failed"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, d), ts in timed.items():
        base = ts[0]
        best = max(ts, key=lambda t: speedup(base, t))
        cells = [f"{base.ms[lb]:.3f} → {best.ms[lb]:.3f}" if lb in base.ms else "" for lb in labels]
        failed = [t for t in ts if t.error]
        rows.append("| " + " | ".join([kernel, str(d), base.candidate.label, best.candidate.label, *cells,
                                       f"{speedup(base, best):.3f}×", str(len(ts)), str(len(failed))]) + " |")
    return "\n".join(rows)


TABLE_KERNELS = ("fwd", "dkdv", "dq")  # the kernels whose launch reads the per-arch table (kernels/_autotune.py)
TABLE_MIN_GAIN = 1.02  # a winner replaces the built-in default only if at least this much faster (geomean)


def default_table(timed: dict, min_gain: float = TABLE_MIN_GAIN) -> dict:
    """The per-arch default table (kernels/tuned/sm<arch>.json) from a run's timings: per table kernel and head
    dim, the best correct candidate where it beats the default by min_gain or more; else the default (written
    too, so the table records what was measured)."""
    out: dict = {}
    for (kernel, d), ts in timed.items():
        if kernel not in TABLE_KERNELS or not ts or ts[0].error:
            continue
        base = ts[0]
        best = max(ts, key=lambda t: speedup(base, t))
        pick = best if speedup(base, best) >= min_gain else base
        out.setdefault(kernel, {})[str(GA.pow2_at_least(d))] = list(pick.candidate.config)
    return out


def write_table(path: Path, table: dict) -> None:
    """Merge ``table`` into the JSON at ``path`` (other kernels / head dims kept)."""
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        old = {}
    for kernel, per_d in table.items():
        old.setdefault(kernel, {}).update(per_d)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ CLI
def _env_info() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_candidates(path: Path, checked: list[Checked], interpreted: bool) -> None:
    doc = dict(_env_info(), arch=90, smem_limit=SMEM_LIMIT, grid=GRID, max_acc_per_thread=MAX_ACC_PER_THREAD,
               interpret_shape=INTERPRET_SHAPE if interpreted else None,
               candidates=[ch.to_json() for ch in checked])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def read_candidates(path: Path) -> list[Checked]:
    try:
        doc = json.loads(path.read_text())
        return [Checked.from_json(d) for d in doc["candidates"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"sweep_tiles.py: cannot read candidates from {path}: {e}") from e


def summary(checked: list[Checked]) -> str:
    """Counts per kernel and D: grid size, pruned, compiled and rejected, surviving."""
    rows = ["| kernel | D | grid | pruned | spills | smem or compile error | interpreter | survive | default |",
            "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Checked]] = {}
    for ch in checked:
        groups.setdefault((ch.candidate.kernel, ch.candidate.d), []).append(ch)
    for (kernel, d), chs in groups.items():
        def count(prefix):
            return sum(1 for ch in chs if (ch.rejected or "").startswith(prefix))

        default = next(ch for ch in chs if ch.candidate.is_default)
        rows.append(f"| {kernel} | {d} | {len(chs)} | {count('pruned')} | {count('spills')} | "
                    f"{count('shared') + count('compile')} | {count('interpreter')} | "
                    f"{sum(ch.rejected is None for ch in chs)} | {'ok' if default.rejected is None else 'REJECTED'} |")
    return "\n".join(rows)


def cmd_check(a) -> int:
    t0 = time.perf_counter()
    candidates = enumerate_candidates(a.kernels, a.d)
    print(f"compiling {len(candidates)} candidates for sm_90 with {a.jobs} processes "
          f"(kernels {','.join(a.kernels)}; D {','.join(map(str, a.d))})")
    checked = check_candidates(candidates, a.jobs)
    path = a.out / CANDIDATES_FILE
    write_candidates(path, checked, interpreted=False)
    t_compile = time.perf_counter() - t0
    if a.interpret:
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, __file__, "interpret", str(path)], env=env)
        if proc.returncode != 0:
            print(f"sweep_tiles.py check: the interpreter check failed (exit code {proc.returncode})", file=sys.stderr)
            return proc.returncode
        checked = read_candidates(path)
    print(summary(checked))
    survivors = sum(ch.rejected is None for ch in checked)
    print(f"{survivors} of {len(checked)} candidates survive; compile {t_compile:.0f} s, total "
          f"{time.perf_counter() - t0:.0f} s; written to {path}")
    bad_defaults = [ch for ch in checked if ch.candidate.is_default and ch.rejected]
    for ch in bad_defaults:
        print(f"warning: the default {ch.candidate.kernel} D={ch.candidate.d} {ch.candidate.label} is rejected: "
              f"{ch.rejected}", file=sys.stderr)
    return 1 if bad_defaults else 0


def cmd_interpret(a) -> int:
    checked = read_candidates(a.candidates)
    t0 = time.perf_counter()
    interpret_all(checked)
    write_candidates(a.candidates, checked, interpreted=True)
    print(f"interpreter check: {time.perf_counter() - t0:.0f} s")
    return 0


def _load_run_candidates(a) -> list[Candidate]:
    """Survivors of the check (from --candidates, else compiled and filtered now) for --kernels / --d, each
    kernel's default always included."""
    if a.candidates is not None:
        checked = read_candidates(a.candidates)
    else:
        checked = check_candidates(enumerate_candidates(a.kernels, a.d), a.jobs)
    keep = [ch.candidate for ch in checked
            if ch.rejected is None and ch.candidate.kernel in a.kernels and ch.candidate.d in a.d]
    for kernel in a.kernels:
        for d in a.d:
            default = Candidate(kernel, d, *default_config(kernel, d))
            if default not in keep:
                keep.insert(0, default)
    return keep


def gpu_unavailable_reason() -> str | None:
    """Why `run` cannot time kernels on a GPU here (None: it can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set; the kernels must run on the GPU: unset it"
    if not torch.cuda.is_available():
        return (f"no CUDA device visible to torch {torch.__version__} "
                f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'}); nothing to time")
    return None


def cmd_run(a) -> int:
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"sweep_tiles.py run: {reason}", file=sys.stderr)
        return 2
    import _harness

    t0 = time.perf_counter()
    candidates = _load_run_candidates(a)
    bench = do_bench_median(a.warmup_ms, a.rep_ms)
    hkv = a.kv_heads or a.heads
    timed, problems = {}, {}
    for d in a.d:
        problems[d] = [Problem.make(b, seqlen, a.heads, hkv, d, a.prefix, torch.bfloat16, "cuda")
                       for seqlen, b in a.shapes]
        runner = Runner(problems[d], bench)
        for kernel in a.kernels:
            cands = [c for c in candidates if c.kernel == kernel and c.d == d]
            print(f"[{time.perf_counter() - t0:5.0f}s] {kernel} D={d}: timing up to {a.max_per_kernel} of "
                  f"{len(cands)} candidates")
            timed[(kernel, d)] = runner.sweep(cands, a.max_per_kernel)
        for p in problems[d]:
            p.tensors.clear()  # free the inputs before the next head dim
    args = dict(shapes=[dict(L=seqlen, B=b) for seqlen, b in a.shapes], heads=a.heads, kv_heads=hkv,
                prefix=a.prefix, dtype="bf16", causal=True, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms,
                max_per_kernel=a.max_per_kernel, candidates=str(a.candidates) if a.candidates else None)
    doc = results_json(timed, problems, _harness.environment("cuda"), args)
    table = markdown_table(timed, problems)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / RESULTS_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / RESULTS_FILE.replace(".json", ".md")).write_text(table + "\n")
    print(table)
    if a.write_table:
        major, minor = torch.cuda.get_device_capability()
        path = TABLE_DIR / f"sm{10 * major + minor}.json"
        write_table(path, default_table(timed))
        print(f"per-arch default table: {path} (commit it after `python -m fastbridge.sm90_check --arch "
              f"{10 * major + minor}` passes: it compiles the table's entries)")
    print(f"sweep: {time.perf_counter() - t0:.0f} s; results in {a.out / RESULTS_FILE}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _kernels(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in KERNELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"kernels: expected some of {','.join(KERNELS)}, got {text!r}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kernels", type=_kernels, default=KERNELS, help=f"comma-separated, among {','.join(KERNELS)}")
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    common.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")

    pc = sub.add_parser("check", parents=[common], help="compile the grid for sm_90; keep what fits (no GPU)")
    pc.add_argument("--d", type=_ints, default=(64, 128), help="head dims (default 64,128; 256 is supported)")
    pc.add_argument("--interpret", action="store_true",
                    help="also run the survivors in the Triton interpreter against the float64 reference")
    pc.set_defaults(fn=cmd_check)

    pi = sub.add_parser("interpret", help="the interpreter step of check --interpret (needs TRITON_INTERPRET=1); "
                                          "updates the candidates file in place")
    pi.add_argument("candidates", type=Path)
    pi.set_defaults(fn=cmd_interpret)

    pr = sub.add_parser("run", parents=[common], help="time the candidates on a CUDA GPU")
    pr.add_argument("--candidates", type=Path, default=None,
                    help=f"a check's {CANDIDATES_FILE} (default: compile and filter the grid first)")
    pr.add_argument("--d", type=_ints, default=(128,), help="head dims (default 128)")
    pr.add_argument("--shapes", type=parse_shapes, default=parse_shapes("4096x4,1024x16"),
                    help="LxB,... with Lq = Lk = L (default 4096x4,1024x16)")
    pr.add_argument("--heads", type=int, default=32)
    pr.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    pr.add_argument("--prefix", type=int, default=PREFIX_LEN, help=f"prompt length P (default {PREFIX_LEN})")
    pr.add_argument("--max-per-kernel", type=_positive, default=12,
                    help="timed candidates per kernel and D, the default included (default 12)")
    pr.add_argument("--warmup-ms", type=float, default=25.0)
    pr.add_argument("--rep-ms", type=float, default=100.0)
    pr.add_argument("--write-table", action="store_true",
                    help="write the winners (>= 2 %% faster than the default) of fwd / dkdv / dq into this GPU's "
                         "per-arch default table, kernels/tuned/sm<arch>.json")
    pr.set_defaults(fn=cmd_run)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
