"""Cost model of the adapter block: FLOPs, bytes moved, activation memory -- the one place for them.

    python benchmarks/floors.py            # prints the floor tables of benchmarks/notes/adapter_block.md

Used by benchmarks/test_bench_adapter_block.py for the ``tflops`` / ``gbps`` fields of the results
(importable as ``floors`` because pytest puts benchmarks/ on sys.path), and by the notes. No torch
needed: plain arithmetic on the shapes.

Notation (one adapter call): N rows (tokens), width d, bottleneck r, e bytes per activation element
(bf16: 2); the LayerNorm statistics mean / rstd are fp32 (8 bytes per row).
  X = N·d·e  (x, y, dy, dx, and every N×d intermediate of the eager composition)
  Z = N·r·e  (z = down(h), a = act(z), dz)
  S = 8·N    (mean, rstd) when the adapter has a LayerNorm, else 0
  W = weights (W_down r×d, W_up d×r, biases, LayerNorm γ/β), e bytes each.

Model FLOPs (the metric's ``tflops``, counted the same for every provider): the two matmuls,
fwd 2·N·d·r each = 4·N·d·r; bwd dA = dU·W_up, dW_up, dH = dZ·W_down, dW_down = 8·N·d·r;
fwd_bwd 12·N·d·r. Element-wise work (LayerNorm, activation, residual) is not counted.

Bytes (the metric's ``gbps`` = ``min_bytes`` / time, the same count for every provider, so it reads as
"effective bandwidth against the traffic the op cannot avoid"):
  fwd  read x, write y, write the saved z (+ mean/rstd), read W:            2X + Z + S + W
  bwd  read dy, x (dW_down needs h, i.e. x), z (+ stats), W; write dx, dW:  3X + Z + S + 2W
``fused_bytes_as_written`` counts what kernels/adapter_block.py loads and stores if no re-read of a
row tile hits in L2 (an upper bound on its DRAM traffic); ``eager_bytes`` counts the separate kernels
of the plain PyTorch composition (BottleneckAdapter with .fused = False) one by one.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

# H100 SXM5 (80 GB HBM3) datasheet numbers. The real bandwidth ceiling is the measured device-to-device
# copy bandwidth (typically 2.8-3.0 TB/s on H100 SXM) -- to be measured (issue 6), not assumed.
HBM_TBPS = 3.35
BF16_DENSE_TFLOPS = 989.0
H100_SMS = 132

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Adapter configurations benchmarked (API.md adapter_block arguments).
#   blip:        the BLIP adapter study's residual bottleneck: no LayerNorm, GELU (erf), biases.
#   pfeiffer-ln: AdapterHub Pfeiffer activation (ReLU) with a LayerNorm on the adapter input (ln_before).
CONFIGS = {
    "blip": dict(ln=False, act="gelu"),
    "pfeiffer-ln": dict(ln=True, act="relu"),
}

# The CUDA benchmark grid (BENCHMARKS.md: d in {768, 1408, 4096}, r in {16, 64}, up to 64k tokens).
CUDA_D = (768, 1408, 4096)
CUDA_R = (16, 64)
CUDA_N = (4096, 16384, 65536)
CUDA_N_QUICK = (16384,)
# The CPU grid (reference fallback vs eager): small, so the CPU part stays well under a minute.
CPU_D = (768,)
CPU_R = (16, 64)
CPU_N = (256, 1024)

MODES = ("fwd", "bwd", "fwd_bwd")


@dataclass(frozen=True)
class AdapterShape:
    n: int
    d: int
    r: int
    ln: bool = False
    act: str = "gelu"
    e: int = 2  # bytes per activation / weight element
    bias: bool = True

    @property
    def X(self) -> int:
        return self.n * self.d * self.e

    @property
    def Z(self) -> int:
        return self.n * self.r * self.e

    @property
    def S(self) -> int:
        return 8 * self.n if self.ln else 0

    @property
    def W(self) -> int:
        elems = 2 * self.r * self.d
        if self.bias:
            elems += self.r + self.d
        if self.ln:
            elems += 2 * self.d
        return elems * self.e


def model_flops(s: AdapterShape, mode: str) -> int:
    """Matmul FLOPs: 4·N·d·r (fwd), 8·N·d·r (bwd), 12·N·d·r (fwd_bwd)."""
    per = {"fwd": 4, "bwd": 8, "fwd_bwd": 12}[mode]
    return per * s.n * s.d * s.r


def min_bytes(s: AdapterShape, mode: str) -> int:
    """Traffic any implementation that saves only z (+ LayerNorm stats) must move (the floor)."""
    fwd = 2 * s.X + s.Z + s.S + s.W
    bwd = 3 * s.X + s.Z + s.S + 2 * s.W
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


# ---------------------------------------------------------------------------- fused, as written
def _block_r(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def weights_grid(s: AdapterShape, sms: int = H100_SMS) -> tuple[int, int]:
    """(N splits, r tiles) of the weight-gradient kernel: mirrors _weights_config / adapter_backward in
    kernels/adapter_block.py (r is tiled by 128 only with LayerNorm and r > 128)."""
    br = _block_r(s.r)
    if br <= 64:
        block_n, block_d, r_tile = 64, 64, br
    elif not s.ln:
        block_n, block_d, r_tile = (64, 32, br) if br <= 128 else (32, 32, br)
    else:
        block_n, block_d, r_tile = 64, 32, 128
    n_rtiles = math.ceil(s.r / r_tile)
    n_dtiles = math.ceil(s.d / block_d)
    n_chunks = max(1, math.ceil(s.n / block_n))
    splits = max(1, min(n_chunks, math.ceil(2 * sms / (n_dtiles * n_rtiles))))
    rows_per_split = math.ceil(n_chunks / splits) * block_n
    return max(1, math.ceil(s.n / rows_per_split)), n_rtiles


def fused_bytes_as_written(s: AdapterShape, mode: str, sms: int = H100_SMS) -> int:
    """kernels/adapter_block.py's loads + stores, every re-read of a row tile counted as a DRAM read.

    fwd (one kernel): pass A (LN only) reads x; pass B reads x; pass C re-reads x as the residual;
        writes y, z (+ mean, rstd); W_down, W_up read once (they stay in L2 across programs).
    bwd rows kernel: loop 1 reads dy (g = dy·W_up); reads z, writes dz and Σa·g (4 B/row);
        LN loop reads x (+ stats); the dx loop re-reads x (LN) and dy (residual = x), writes dx.
    bwd weights kernel (grid: d tiles × N splits × r tiles): reads dy, x, z, dz (+ stats) once per
        r tile (z, dz, stats re-reads across the d tiles of one N split counted once: they are small
        and shared in L2), writes fp32 partials (splits × (2·d·r + d + r) [+ splits × r tiles × 2d])
        that torch then sums (read) into the gradients (write).
    """
    X, Z, S, W = s.X, s.Z, s.S, s.W
    fwd = (3 if s.ln else 2) * X + X + Z + S + W
    rows = 2 * X + (2 * X + S if s.ln else 0) + X + Z + Z + 4 * s.n + W
    splits, rt = weights_grid(s, sms)
    part = (splits * (2 * s.d * s.r + s.d + s.r) + (splits * rt * 2 * s.d if s.ln else 0)) * 4
    weights = rt * (2 * X + 2 * Z + S) + W + part + part + W
    bwd = rows + weights
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def fused_flops_as_written(s: AdapterShape, mode: str) -> int:
    """The fused backward recomputes dh = dz·W_down: twice in the rows kernel with LN (the statistics
    pass and the dx pass) and once more in the weights kernel (for dγ): 12·N·d·r with LN, else 8."""
    fwd = 4 * s.n * s.d * s.r
    bwd = (12 if s.ln else 8) * s.n * s.d * s.r
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


# ---------------------------------------------------------------------------------------- eager
def eager_kernels(s: AdapterShape, mode: str) -> list[tuple[str, int]]:
    """(kernel, bytes) for the plain composition (BottleneckAdapter._eager), scale a Python float.

    fwd: [layer_norm] -> addmm(down, bias in the cuBLAS epilogue) -> act -> addmm(up) -> s·u -> x + s·u.
    bwd (autograd): du = s·dy; dA = du·W_up; dW_up = duᵀa; db_up = Σdu; act backward;
        dh = dz·W_down; dW_down = dzᵀh; db_down = Σdz; [layer_norm backward: dx and dγ/dβ kernels];
        x.grad = dy + dh (the two paths into x are summed by autograd, out of place).
    """
    X, Z, S, W = s.X, s.Z, s.S, s.W
    wd = wu = s.r * s.d * s.e
    fwd, bwd = [], []
    if s.ln:
        fwd.append(("layer_norm", X + X + S + 2 * s.d * s.e))
    fwd += [
        ("addmm down", X + wd + Z),
        (f"{s.act}", 2 * Z),
        ("addmm up", Z + wu + X),
        ("mul s·u", 2 * X),
        ("add x + s·u", 3 * X),
    ]
    bwd += [
        ("mul s·dy", 2 * X),
        ("mm dA = du·W_up", X + wu + Z),
        ("mm dW_up = duᵀa", X + Z + wu),
        ("sum db_up", X),
        (f"{s.act} backward", 3 * Z),
        ("mm dh = dz·W_down", Z + wd + X),
        ("mm dW_down = dzᵀh", Z + X + wd),
        ("sum db_down", Z),
    ]
    if s.ln:
        # CUDA layer_norm backward: one kernel for dx (reads dh, x, stats, γ; writes dx) and one for
        # dγ, dβ (reads dh, x, stats again).
        bwd.append(("layer_norm backward dx", 3 * X + S))
        bwd.append(("layer_norm backward dγ,dβ", 2 * X + S))
    bwd.append(("add dx = dy + dh", 3 * X))
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def eager_bytes(s: AdapterShape, mode: str) -> int:
    return sum(b for _, b in eager_kernels(s, mode))


# ---------------------------------------------------------------------------- activation memory
def saved_bytes(s: AdapterShape, provider: str) -> int:
    """Bytes autograd keeps for backward beyond the inputs and parameters (which are alive anyway).

    eager: the activation's saved tensor (gelu / silu save their input z; relu saves its output a)
        and addmm(up)'s input a; with LayerNorm also h (addmm(down)'s input) and mean / rstd.
    fused: z (+ mean / rstd) -- O(N·r), never O(N·d).
    """
    if provider == "fused":
        return s.Z + s.S
    if provider == "eager":
        act = s.Z if s.act == "relu" else 2 * s.Z  # relu's saved output is addmm(up)'s saved input
        return act + ((s.X + s.S) if s.ln else 0)
    raise ValueError(provider)


def transient_fwd_bytes(s: AdapterShape, provider: str) -> int:
    """Extra N×d buffers alive at the forward's peak besides y: eager holds u and s·u together."""
    return 2 * s.X if provider == "eager" else 0


# ------------------------------------------------------------------------------------------ tables
def cuda_shapes(dtype: str = "bf16"):
    for cfg, kw in CONFIGS.items():
        for d in CUDA_D:
            for r in CUDA_R:
                for n in CUDA_N:
                    yield cfg, AdapterShape(n=n, d=d, r=r, ln=kw["ln"], act=kw["act"], e=ELEMENT_BYTES[dtype])


def _us(nbytes: float, tbps: float = HBM_TBPS) -> float:
    return nbytes / (tbps * 1e12) * 1e6


def _flop_us(flops: float) -> float:
    return flops / (BF16_DENSE_TFLOPS * 1e12) * 1e6


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f}"


def _table(mode: str) -> list[str]:
    """Floor table for ``mode`` ("fwd" or "fwd_bwd"); fwd_bwd adds the saved-activation columns."""
    saved = mode == "fwd_bwd"
    out = ["| cfg | d | r | N | floor MB | as-written MB | floor µs | FLOP µs | FLOP/B | eager MB | "
           "pred. speed-up |" + (" saved: eager MB | saved: fused MB |" if saved else ""),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if saved else "")]
    for cfg, s in cuda_shapes():
        lo, hi = min_bytes(s, mode), fused_bytes_as_written(s, mode)
        eb = eager_bytes(s, mode)
        row = (f"| {cfg} | {s.d} | {s.r} | {s.n} | {_mb(lo)} | {_mb(hi)} | {_us(lo):,.1f} | "
               f"{_flop_us(model_flops(s, mode)):,.1f} | {model_flops(s, mode) / lo:,.0f} | {_mb(eb)} | "
               f"{eb / hi:.1f}-{eb / lo:.1f}× |")
        if saved:
            row += f" {_mb(saved_bytes(s, 'eager'))} | {_mb(saved_bytes(s, 'fused'))} |"
        out.append(row)
    return out


def table_fwd() -> list[str]:
    return _table("fwd")


def table_fwd_bwd() -> list[str]:
    return _table("fwd_bwd")


def table_intensity() -> list[str]:
    ridge = BF16_DENSE_TFLOPS / HBM_TBPS
    out = [f"Nominal ridge point: {BF16_DENSE_TFLOPS:.0f} TFLOP/s ÷ {HBM_TBPS} TB/s = {ridge:.0f} FLOP/B "
           "(bf16, d = 4096, N = 65536, no LN; floor traffic):", "",
           "| r | fwd FLOP/B | fwd_bwd FLOP/B | fwd bound by |", "|---:|---:|---:|---|"]
    for r in (16, 64, 128, 256):
        s = AdapterShape(n=65536, d=4096, r=r)
        f = model_flops(s, "fwd") / min_bytes(s, "fwd")
        fb = model_flops(s, "fwd_bwd") / min_bytes(s, "fwd_bwd")
        out.append(f"| {r} | {f:.0f} | {fb:.0f} | {'memory' if f < ridge else 'compute'} |")
    return out


def eager_breakdown(s: AdapterShape) -> list[str]:
    out = [f"Eager kernels, d={s.d}, r={s.r}, N={s.n}, ln={s.ln}, {s.act} (MB):", ""]
    for mode in ("fwd", "bwd"):
        parts = ", ".join(f"{k} {_mb(b)}" for k, b in eager_kernels(s, mode))
        out.append(f"- {mode}: {parts} -- total {_mb(eager_bytes(s, mode))} MB "
                   f"(fused floor {_mb(min_bytes(s, mode))}, as written {_mb(fused_bytes_as_written(s, mode))})")
    return out


def main(argv: list[str] | None = None) -> int:
    lines = [
        f"Assumed peaks (H100 SXM datasheet): HBM3 {HBM_TBPS} TB/s, bf16 dense {BF16_DENSE_TFLOPS:.0f} TFLOP/s; "
        "µs columns use these nominal numbers (a measured copy bandwidth of ~2.8-3.0 TB/s would make every "
        "memory floor ~12-20% longer). bf16, biases on, MB = 10^6 bytes.",
        "",
        "Columns: floor MB = min_bytes (the traffic no implementation saving only z + stats can avoid); "
        "as-written MB = fused_bytes_as_written (kernels/adapter_block.py, no L2 reuse of re-read tiles); "
        "floor µs = floor bytes ÷ HBM bandwidth; FLOP µs = model FLOPs ÷ bf16 peak; FLOP/B = model FLOPs ÷ "
        "floor bytes; eager MB = eager_bytes (the separate kernels of the plain composition); pred. speed-up "
        "= eager MB ÷ as-written MB – eager MB ÷ floor MB (bandwidth-bound regime only); saved MB = "
        "activation bytes kept for backward beyond inputs and parameters (saved_bytes).",
        "",
        "### Forward",
        "",
        *table_fwd(),
        "",
        "### Forward + backward (and activation memory saved for backward)",
        "",
        *table_fwd_bwd(),
        "",
        "### Arithmetic intensity vs r",
        "",
        *table_intensity(),
        "",
        "### Where eager's bytes go",
        "",
        *eager_breakdown(AdapterShape(n=65536, d=4096, r=64, ln=False, act="gelu")),
        "",
        *eager_breakdown(AdapterShape(n=65536, d=4096, r=64, ln=True, act="relu")),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
