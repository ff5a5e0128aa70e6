"""Cost models of the benchmarked ops: FLOPs, bytes moved, activation memory -- the one place for them.

    python benchmarks/floors.py                   # the floor tables of benchmarks/notes/adapter_block.md
    python benchmarks/floors.py gated_attention   # the tables of benchmarks/notes/gated_attention.md
    python benchmarks/floors.py all               # both

The adapter block comes first (below); the gated attention (LLaMA-Adapter) and the end-to-end PEFT
LLaMA-Adapter training step follow in their own section ("gated attention").

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

import sys
from dataclasses import dataclass

# H100 SXM5 (80 GB HBM3) datasheet numbers. The real bandwidth ceiling is the measured device-to-device
# copy bandwidth (typically 2.8-3.0 TB/s on H100 SXM) -- to be measured (on the first GPU run), not assumed.
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
def weights_grid(s: AdapterShape, sms: int = H100_SMS) -> tuple[int, int]:
    """(N splits, r tiles) of the weight-gradient kernel on an H100 (kernels/adapter_block.weights_grid)."""
    from fastbridge.kernels.adapter_block import weights_grid as launch_grid

    _, (_, splits, n_rtiles), _ = launch_grid(s.n, s.d, s.r, s.ln, sms)
    return splits, n_rtiles


def fused_bytes_as_written(s: AdapterShape, mode: str, sms: int = H100_SMS) -> int:
    """kernels/adapter_block.py's loads + stores, every re-read of a row tile counted as a DRAM read.

    fwd (one kernel): pass A (LN only) reads x; pass B reads x; pass C re-reads x as the residual;
        writes y, z (+ mean, rstd); W_down, W_up read once (they stay in L2 across programs).
    bwd rows kernel: loop 1 reads dy (g = dy·W_up); reads z, writes dz, a = act(z) and Σa·g (4 B/row);
        LN loop reads x (+ stats); the dx loop re-reads x (LN) and dy (residual = x), writes dx.
    bwd weights kernel (grid: d tiles × N splits × r tiles): reads dy, x, a, dz (+ stats) once per
        r tile (a, dz, stats re-reads across the d tiles of one N split counted once: they are small
        and shared in L2), writes fp32 partials (splits × (2·d·r + d + r) [+ splits × r tiles × 2d])
        that torch then sums (read) into the gradients (write).
    """
    X, Z, S, W = s.X, s.Z, s.S, s.W
    fwd = (3 if s.ln else 2) * X + X + Z + S + W
    rows = 2 * X + (2 * X + S if s.ln else 0) + X + Z + Z + Z + 4 * s.n + W
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


# ================================================================================= gated attention
# LLaMA-Adapter split-softmax gated attention (fastbridge.ops.gated_attention, kernels/gated_attention.py):
#     out = softmax(q kᵀ·s + causal mask) v + g · softmax(q pkᵀ·s) pv
# q (B, H, Lq, D); k, v (B, Hkv, Lk, D); pk, pv (1, Hkv, P, D): one prompt shared by the batch; e bytes
# per element. Used by benchmarks/test_bench_gated_attention.py (``tflops`` / ``gbps``), by
# benchmarks/test_bench_llama_adapter_e2e.py (e2e_flops) and by benchmarks/notes/gated_attention.md.
#
# Model FLOPs (the ``tflops`` field, counted the same for every provider of one shape):
#   fwd      4·B·H·D·(V + Lq·P), V = visible (query, main key) pairs: Lq·(Lq+1)/2 causal with Lq = Lk
#            (FlashAttention's benchmarks count Lq²/2: 0.2 % less at L = 512), Lq·Lk for decode (Lq = 1)
#            -- two matmuls (q kᵀ and p v) of 2·D FLOPs per visible pair, the prefix branch likewise.
#   bwd      2.5 × fwd: FlashAttention-2's convention -- five matmuls per visible pair (the recomputed
#            S = q kᵀ, dV = Pᵀ dO, dP = dO vᵀ, dQ = dS k, dK = dSᵀ q) against the forward's two; the
#            recomputation is counted, as FA2 counts it.
#   fwd_bwd  3.5 × fwd.
#   Masked-out pairs are never counted: the eager composition, which multiplies the full L×L score
#   matrix, does twice the matmul work of these numbers and gets no credit for it.
#   sdpa_noprompt (SDPA causal alone) is credited with its own work: P = 0.
# Bytes (the ``gbps`` field, ga_min_bytes): each tensor the op cannot avoid touching, once:
#   fwd      read q, k, v, pk, pv; write out, lse_main, lse_prefix (fp32, B·H·Lq each; the kernel
#            writes them for backward, inference included)
#   bwd      read q, k, v, pk, pv, out, dout, the two lse; write dq, dk, dv, dpk, dpv (dg: 4·H bytes)
#   sdpa_noprompt: no prompt, one lse.

GA_H = 32        # LLaMA-7B: 32 heads of D = 128 (hidden 4096)
GA_D = 128
GA_P = 10        # adapter_len of PEFT's LLaMA-Adapter example / the paper
GA_TOKENS = 16384                      # prefill / training grid: B = GA_TOKENS // L ("batch filling the GPU")
GA_L = (512, 1024, 2048, 4096, 8192)
GA_L_QUICK = (2048,)
GA_GQA_HKV = 8                         # one grouped-query case (LLaMA-2-70B / Mistral-style 4:1 grouping)
GA_GQA_L = (2048,)
GA_DECODE_LK = 4096                    # decode: one new query against a 4k KV cache
GA_DECODE_B = (1, 8, 32)
GA_DECODE_B_QUICK = (8,)
# CPU grid (reference fallback vs eager / sdpa: a code-path smoke test, not a kernel measurement).
GA_CPU = dict(h=4, hkv=(4, 2), d=32, p=10, b=2, l=128, decode_b=2, decode_lk=256)


@dataclass(frozen=True)
class AttnShape:
    b: int
    h: int
    hkv: int
    lq: int
    lk: int
    d: int = GA_D
    p: int = GA_P
    e: int = 2
    causal: bool = True
    bp: int = 1  # prompt batch: 1 = one prompt shared by the batch (read by stride 0, never copied)

    @property
    def group(self) -> int:
        return self.h // self.hkv

    @property
    def Q(self) -> int:
        """Bytes of one (B, H, Lq, D) tensor: q, out, dout, dq."""
        return self.b * self.h * self.lq * self.d * self.e

    @property
    def KV(self) -> int:
        """Bytes of one of k, v (dk, dv): (B, Hkv, Lk, D)."""
        return self.b * self.hkv * self.lk * self.d * self.e

    @property
    def PR(self) -> int:
        """Bytes of one of pk, pv: (Bp, Hkv, P, D)."""
        return self.bp * self.hkv * self.p * self.d * self.e

    @property
    def LSE(self) -> int:
        """Bytes of one fp32 (B, H, Lq) row statistic (lse, Δ)."""
        return 4 * self.b * self.h * self.lq

    @property
    def scores(self) -> int:
        """Elements of the dense (B, H, Lq, Lk) score matrix the eager composition materialises."""
        return self.b * self.h * self.lq * self.lk

    @property
    def label(self) -> str:
        if self.lq == self.lk:
            return f"Hkv={self.hkv} B={self.b} L={self.lq}"
        return f"Hkv={self.hkv} B={self.b} Lq={self.lq} Lk={self.lk}"


def ga_prefill_shapes(quick: bool = False, e: int = 2) -> list[AttnShape]:
    """The CUDA training / prefill grid: L in GA_L with B·L = 16k tokens, MHA, plus the GQA case(s)."""
    ls = GA_L_QUICK if quick else GA_L
    out = [AttnShape(b=GA_TOKENS // n, h=GA_H, hkv=GA_H, lq=n, lk=n, e=e) for n in ls]
    out += [AttnShape(b=GA_TOKENS // n, h=GA_H, hkv=GA_GQA_HKV, lq=n, lk=n, e=e) for n in GA_GQA_L
            if not quick or n in ls]
    return out


def ga_decode_shapes(quick: bool = False, e: int = 2) -> list[AttnShape]:
    """The CUDA decode grid: Lq = 1 against a GA_DECODE_LK cache, B in GA_DECODE_B (forward only)."""
    return [AttnShape(b=b, h=GA_H, hkv=GA_H, lq=1, lk=GA_DECODE_LK, e=e)
            for b in (GA_DECODE_B_QUICK if quick else GA_DECODE_B)]


def visible_pairs(lq: int, lk: int, causal: bool = True) -> int:
    """(query, main key) pairs the bottom-right causal mask leaves visible: query i sees keys
    j <= i + (Lk - Lq), i.e. min(Lk, max(0, i + Lk - Lq + 1)) keys; Lq·Lk without the mask."""
    if not causal:
        return lq * lk
    off = lk - lq
    lo = min(lq, max(0, -off))              # rows before lo see no key
    full = max(lo, min(lq, lk - off - 1))   # rows from `full` on see all lk keys
    # rows lo .. full-1 see i + off + 1 keys: an arithmetic run
    run = (full - lo) * ((lo + off + 1) + (full - 1 + off + 1)) // 2
    return run + (lq - full) * lk


def ga_flops(s: AttnShape, mode: str, prompt: bool = True) -> int:
    """Model FLOPs: fwd 4·B·H·D·(visible pairs + Lq·P); bwd 2.5 × fwd; fwd_bwd 3.5 × fwd (FA2 convention)."""
    fwd = 4 * s.b * s.h * s.d * (visible_pairs(s.lq, s.lk, s.causal) + (s.lq * s.p if prompt else 0))
    return {"fwd": fwd, "bwd": fwd * 5 // 2, "fwd_bwd": fwd * 7 // 2}[mode]


def ga_min_bytes(s: AttnShape, mode: str, prompt: bool = True) -> int:
    """Bytes no implementation can avoid (module comment): fwd Q + 2KV + 2PR + Q + 2 LSE;
    bwd 4Q + 4KV + 4PR + 2 LSE (q, out, dout read, dq written; k, v read, dk, dv written; same for the prompt)."""
    pr = 2 * s.PR if prompt else 0
    lse = (2 if prompt else 1) * s.LSE
    fwd = 2 * s.Q + 2 * s.KV + pr + lse
    bwd = 4 * s.Q + 4 * s.KV + 2 * pr + lse
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


# ------------------------------------------------------------------- fastbridge kernel, as written
def _tile_pairs(lq: int, lk: int, bm: int, bn: int, causal: bool = True) -> int:
    """(query row, key) pairs a kernel with BM-row query tiles and BN-key blocks computes (diagonal and
    ragged blocks computed whole, masked in registers)."""
    off = lk - lq
    total = 0
    for start in range(0, lq, bm):
        hi = max(0, min(lk, start + bm + off)) if causal else lk
        total += min(bm, lq - start) * (-(-hi // bn) * bn)
    return total


def _kv_tile_pairs(lq: int, lk: int, bm: int, bn: int, causal: bool = True) -> int:
    """(query row, key) pairs of a key-tile-major loop (dkdv): each BN-key tile visits the query rows from
    the first one that sees it, rounded down to a BM-row tile, to the end."""
    off = lk - lq
    total = 0
    for n0 in range(0, lk, bn):
        lo = (max(0, n0 - off) // bm * bm) if causal else 0
        total += max(0, lq - lo) * bn
    return total


def ga_kernel_flops(s: AttnShape, mode: str, dq: str = "separate") -> int:
    """FLOPs kernels/gated_attention.py executes (tensor-core work, whole blocks):
    fwd  2 matmuls per (row, key) pair over 128-row x 64-key tiles (diagonal and ragged blocks whole) and
         2 per prompt key padded to BLOCK_P = 16: +25 % over the model count at L = 512, +1.6 % at 8192.
    bwd  7 matmuls per pair, not FA2's 5: dkdv (per key tile, 32-row query tiles) recomputes S = q kᵀ and
         does dV += Pᵀ dO, dP = dO vᵀ, dK += dSᵀ q (4); dq (per 64-row query tile) recomputes S and dP
         again and does dQ += dS k (3) -- FA2 computes dQ in the same pass with fp32 atomics instead. Prompt:
         pre (q pkᵀ, P pv, Pᵀ dO, dO pvᵀ, dSᵀ q) + dq (q pkᵀ, dO pvᵀ, dS pk) = 8 per prompt key (padded to 16).
    So the executed backward is ≈ 1.4x the 2.5x-forward convention of ga_flops.
    dq="atomic" (FASTBRIDGE_GA_DQ=atomic): dkdv also does dQ += dS k with fp32 atomics (5 per pair over its
    tiles) and the dq kernel only the prompt part."""
    bm_f = 16 if s.lq <= 16 else (128 if s.lq > 64 and s.d <= 128 else 64)
    bn = 64 if s.d <= 128 else 32
    bp = max(16, 1 << (min(s.p, 64) - 1).bit_length())
    unit = 2 * s.b * s.h * s.d                     # one matmul over one (row, key) pair, all heads
    fwd = unit * (2 * _tile_pairs(s.lq, s.lk, bm_f, bn, s.causal) + 2 * s.lq * bp)
    if dq == "atomic":
        main = 5 * _kv_tile_pairs(s.lq, s.lk, 32, 64, s.causal)
    else:
        main = 4 * _kv_tile_pairs(s.lq, s.lk, 32, 64, s.causal) + 3 * _tile_pairs(s.lq, s.lk, 64, 64, s.causal)
    bwd = unit * (main + 8 * s.lq * bp)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def ga_decode_splits(s: AttnShape, sms: int = H100_SMS) -> int:
    """Key splits of the decode forward: mirrors kernels/gated_attention.py decode_splits (split-K when one
    16-row query tile covers Lq and B·H programs would leave the GPU idle; >= 4 key blocks per split)."""
    bm, bn = (16 if s.lq <= 16 else 64), 64
    if s.lq > bm or s.lk <= 4 * bn:
        return 1
    want = -(-2 * sms // (s.b * s.h))
    splits = max(1, min(want, s.lk // (4 * bn)))
    keys_per_split = -(-(-(-s.lk // splits)) // bn) * bn
    return -(-s.lk // keys_per_split)


# ------------------------------------------------------------------------------ eager and sdpa
def _peft_prefix_kernels(s: AttnShape) -> tuple[list, list]:
    """(fwd, bwd) kernels of PEFT's prompt branch alone (AdaptedAttention.forward after the wrapped
    attention): the prompt repeated over the batch (and the GQA groups), q·pkᵀ, /√D, fp32 softmax, cast,
    ·gate, ·pv, added to the main output; and its autograd backward."""
    e, Sp = s.e, s.b * s.h * s.lq * s.p
    PRr = s.b * s.h * s.p * s.d * e        # a prompt repeated over the batch and heads
    mmp = 2 * Sp * s.d
    fwd = [
        ("prompt repeat (batch, groups)", 2 * (2 * s.PR + 2 * PRr), 0),
        ("matmul q·pkᵀ", s.Q + PRr + Sp * e, mmp),
        ("div /√D, softmax fp32, cast, ·gate", (2 + 2 + 2 + 4 + 4 + 2 + 2 + 2) * Sp, 0),
        ("matmul Pp·pv", Sp * e + PRr + s.Q, mmp),
        ("add main + prefix", 3 * s.Q, 0),
    ]
    bwd = [
        ("prefix: matmul bwd (dPp, dpv)", 2 * s.Q + 2 * Sp * e + 2 * PRr, 2 * mmp),
        ("prefix: ·gate, cast, softmax, /√D bwd", 24 * Sp, 0),
        ("prefix: matmul bwd (dq_p, dpk)", 2 * Sp * e + 2 * s.Q + 2 * PRr, 2 * mmp),
        ("prompt repeat bwd (sums)", 4 * PRr, 0),
        ("add dq_main + dq_prefix", 3 * s.Q, 0),
    ]
    return fwd, bwd


def ga_eager_kernels(s: AttnShape, mode: str) -> list[tuple[str, int, int]]:
    """(kernel, bytes, FLOPs) of PEFT's math (benchmarks/test_bench_gated_attention.py peft_eager_gated_attention):
    HF eager attention for the main branch -- repeat_kv, q·kᵀ (bf16 out), ·scale, + additive mask,
    softmax in fp32, cast back, ·v -- and PEFT's prompt branch (_peft_prefix_kernels), then main + prefix.
    S = B·H·Lq·Lk score elements: fwd moves 24 bytes per score (2 write, 2+2 scale, 2+2 mask, 2+4 softmax,
    4+2 cast, 2 read by ·v); bwd 28 (dP 2 written, P re-read 2 for dV, cast 2+4, softmax bwd 4+4+2, scale
    2+2, dS read twice for dq and dk 2+2). Matmuls over the full L×L (no causal skipping)."""
    e, S = s.e, s.scores
    KVr = s.KV * s.group                   # k or v repeated to H heads (a copy only when group > 1)
    mask = s.lq * s.lk * e
    mm = 2 * S * s.d                       # one dense L×L×D matmul
    pf, pb = _peft_prefix_kernels(s)
    fwd = [("repeat_kv k, v", 2 * (s.KV + KVr), 0)] if s.group > 1 else []
    fwd += [
        ("matmul q·kᵀ", s.Q + KVr + S * e, mm),
        ("mul ·scale", 2 * S * e, 0),
        ("add mask", 2 * S * e + mask, 0),
        ("softmax fp32", S * e + 4 * S, 0),
        ("cast to bf16", 4 * S + S * e, 0),
        ("matmul P·v", S * e + KVr + s.Q, mm),
    ] + pf
    bwd = pb[:-1] + [
        ("matmul bwd dP = dO·vᵀ", s.Q + KVr + S * e, mm),
        ("matmul bwd dV = Pᵀ·dO", S * e + s.Q + KVr, mm),
        ("cast bwd (to fp32)", S * e + 4 * S, 0),
        ("softmax bwd", 8 * S + S * e, 0),
        ("mul ·scale bwd", 2 * S * e, 0),
        ("matmul bwd dq = dS·k", S * e + KVr + s.Q, mm),
        ("matmul bwd dk = dSᵀ·q", S * e + s.Q + KVr, mm),
    ] + pb[-1:]
    if s.group > 1:
        bwd.append(("repeat_kv bwd (sum over groups)", 2 * (KVr + s.KV), 0))
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def _kernels_ms(kernels, bw: float, tflops: float) -> float:
    """Σ over (name, bytes, FLOPs) kernels of max(bytes ÷ bandwidth, FLOPs ÷ rate), in ms."""
    return sum(max(b / bw, f / (tflops * 1e12)) for _, b, f in kernels) * 1e3


def ga_eager_bytes(s: AttnShape, mode: str) -> int:
    return sum(b for _, b, _ in ga_eager_kernels(s, mode))


def ga_sdpa_glue_kernels(s: AttnShape, mode: str) -> list[tuple[str, int]]:
    """(kernel, bytes) the sdpa composition adds to SDPA-causal alone (sdpa_noprompt):
    fwd: a second flash call over q for the prompt (reads q, writes out_p + lse), g·out_p, main + that;
    bwd: g·dy and dg = Σ dy·out_p (mul backward), the prompt's flash backward (Δ_p from out_p and dout_p,
    re-reads q, FA2's fp32 dq accumulator written and read, dq_p written, per-batch dpk/dpv summed by
    expand's backward), and dq = dq_main + dq_prefix."""
    Q, LSE = s.Q, s.LSE
    pr_b = 2 * s.b * s.hkv * s.p * s.d * s.e       # dpk, dpv per batch element (expand's grad), then summed
    fwd = [("flash fwd, prompt", 2 * Q + 2 * s.PR + LSE), ("mul g·out_p", 2 * Q), ("add", 3 * Q)]
    bwd = [("mul bwd g·dy", 2 * Q), ("mul bwd dg = Σ dy·out_p", 3 * Q),
           ("flash bwd prompt: Δ_p", 2 * Q + LSE),
           ("flash bwd prompt: dq (q, dout_p read; fp32 dq_accum w+r; dq_p)", 2 * Q + 4 * Q + Q + 2 * pr_b),
           ("expand bwd: Σ_b dpk, dpv", pr_b + 2 * s.PR), ("add dq_main + dq_prefix", 3 * Q)]
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def ga_sdpa_glue_bytes(s: AttnShape, mode: str) -> int:
    return sum(b for _, b in ga_sdpa_glue_kernels(s, mode))


# ------------------------------------------------------------------------------------ peak memory
def ga_peak_bytes(s: AttnShape, provider: str, mode: str) -> int:
    """Predicted ``peak_mb`` of the harness (absolute torch.cuda.max_memory_allocated over one call),
    in bytes. Resident in every mode: q, k, v, pk, pv, gate and the harness's dy (one Q); the eager
    composition's additive mask (Lq·Lk·e). bwd keeps the graph (retain_graph) and the output alive.
      fastbridge  fwd: + out + 2 lse.  bwd / fwd_bwd: + out, 2 lse (saved) + dq, dk, dv, dpk, dpv
                  + Δm, Δp + fp32 dprompt partials (chunks·B·H·P·D·4 each).
      sdpa_noprompt fwd: + out + lse.  bwd: + out, lse + FA2's fp32 dq accumulator (2Q) + dq, dk, dv
                  + softmax_d (+ dk, dv expanded to H heads when Hkv < H).
      sdpa        fwd: out_m, out_p, g·out_p and out alive at the add (4Q) + 2 lse.
                  bwd: out_m, out_p, out (3Q) kept + dq_p + (main flash bwd) fp32 dq accumulator 2Q + dq_m
                  + dk, dv: ≈ 7Q + 2KV beyond the resident tensors.
      eager       fwd: 6 bytes per score kept for backward (softmax's fp32 output, the bf16 P) + 3Q.
                  fwd_bwd: 10 bytes per score at the softmax backward (saved fp32 P, fp32 grad of the
                  cast, bf16 dS) -- 12 with bwd's retained graph (bf16 P still held).
    torch.compile: not modelled (inductor decides what it saves and recomputes)."""
    Q, KV, LSE = s.Q, s.KV, s.LSE
    resident = Q + 2 * KV + 2 * s.PR + Q
    if provider == "fastbridge":
        if mode == "fwd":
            splits = ga_decode_splits(s)
            part = 0 if splits == 1 else splits * s.b * s.h * 16 * (max(16, s.d) * 4 + 8)
            return resident + Q + 2 * LSE + part
        chunks = max(1, min(-(-s.lq // 32), -(-4 * H100_SMS // (s.b * s.h))))
        part = 2 * chunks * s.b * s.h * s.p * s.d * 4
        return resident + Q + 2 * LSE + Q + 2 * KV + 2 * s.PR + 2 * LSE + part
    if provider == "sdpa_noprompt":
        if mode == "fwd":
            return resident + Q + LSE
        gqa = 2 * KV * s.group if s.group > 1 else 0
        return resident + Q + LSE + 2 * Q + Q + 2 * KV + LSE + gqa
    if provider == "sdpa":
        if mode == "fwd":
            return resident + 4 * Q + 2 * LSE
        gqa = 2 * KV * s.group if s.group > 1 else 0
        return resident + 3 * Q + 2 * LSE + Q + 2 * Q + Q + 2 * KV + 2 * LSE + gqa
    if provider == "eager":
        resident += s.lq * s.lk * s.e
        reps = 2 * KV * s.group if s.group > 1 else 0
        per_score = {"fwd": 6, "bwd": 12, "fwd_bwd": 10}[mode]
        extra = 3 * Q if mode == "fwd" else 2 * Q + KV * s.group
        return resident + per_score * s.scores + extra + reps
    raise ValueError(provider)


# ------------------------------------------------------------------------------ predictions
# Assumptions behind the predicted times (not measurements; benchmarks/notes/gated_attention.md argues
# each one). Rates are model FLOPs per second as the FA2 / FA3 papers count them.
GA_ASSUME = {
    "hbm_tbps": 2.9,       # streaming bandwidth a good kernel reaches (copy-like), vs 3.35 nominal
    "cublas_tflops": 600.0,  # bf16 cuBLAS GEMMs with K = D = 128 (the eager L×L matmuls)
    # SDPA's default flash backend on sm_90 is FlashAttention-2 (mma.sync code, no wgmma): causal,
    # D = 128, B·L = 16k, H100 SXM, forward / backward -- read off FA3 paper (Shah et al. 2024)
    # Figs. 5-6 approximately.
    "fa2_fwd_tflops": {512: 200.0, 1024: 250.0, 2048: 290.0, 4096: 315.0, 8192: 330.0},
    "fa2_bwd_tflops": {512: 170.0, 1024: 220.0, 2048: 260.0, 4096: 285.0, 8192: 300.0},
    # fastbridge's Triton kernels (FA2-style, wgmma through tl.dot, no TMA / warp specialisation),
    # on the executed FLOPs (ga_kernel_flops: the backward executes 7 matmuls per pair, not 5): a low and
    # a high case.
    "fb_fwd_tflops": (350.0, 550.0),
    "fb_bwd_tflops": (200.0, 320.0),
    # decode: bytes one program streams per second (4 warps, 2 stages, 64-key K + V tiles = 32 KB per
    # step in flight; ~0.6-1 µs HBM latency under load)
    "cta_gbps": (30.0, 60.0),
    "launch_us": 3.0,      # GPU time of a tiny extra kernel (launch + tail)
}


def _rate(table: dict, n: int) -> float:
    keys = sorted(table)
    if n <= keys[0]:
        return table[keys[0]]
    for a, b in zip(keys, keys[1:]):
        if n <= b:
            return table[a] + (table[b] - table[a]) * (n - a) / (b - a)
    return table[keys[-1]]


def ga_predict_ms(s: AttnShape, provider: str, mode: str) -> tuple[float, float]:
    """(optimistic, pessimistic) predicted time in ms from GA_ASSUME; decode (Lq = 1) is forward only.
    eager: Σ over its kernels of max(bytes ÷ hbm, FLOPs ÷ cuBLAS) -- at these sizes each kernel is one or
    the other; both ends equal."""
    A = GA_ASSUME
    bw = A["hbm_tbps"] * 1e12
    if s.lq == 1:
        kv = 2 * s.KV
        if provider == "fastbridge" or provider == "fastbridge-nosplit":
            splits = 1 if provider == "fastbridge-nosplit" else ga_decode_splits(s)
            progs = s.b * s.h * splits
            part = 0 if splits == 1 else 2 * splits * s.b * s.h * 16 * (s.d * 4 + 8)
            kernels = 1 if splits == 1 else 2
            return tuple((kv + part) / min(bw, progs * r * 1e9) * 1e3 + kernels * A["launch_us"] * 1e-3
                         for r in reversed(A["cta_gbps"]))
        if provider in ("sdpa", "sdpa_noprompt"):
            n = 1 if provider == "sdpa_noprompt" else 4  # + prompt flash call, mul, add
            t = kv / bw * 1e3 + n * A["launch_us"] * 1e-3
            return t, t + n * A["launch_us"] * 1e-3
        if provider == "eager":
            ks = ga_eager_kernels(s, "fwd")
            t = _kernels_ms(ks, bw, A["cublas_tflops"])
            return t + len(ks) * A["launch_us"] * 1e-3, t + 2 * len(ks) * A["launch_us"] * 1e-3
        raise ValueError(provider)

    def fa2(m: str, prompt: bool = False) -> float:
        fl = ga_flops(s, "fwd", prompt)
        t = 0.0
        if m in ("fwd", "fwd_bwd"):
            t += fl / (_rate(A["fa2_fwd_tflops"], s.lq) * 1e12)
        if m in ("bwd", "fwd_bwd"):
            t += 2.5 * fl / (_rate(A["fa2_bwd_tflops"], s.lq) * 1e12)
        return t * 1e3

    if provider == "sdpa_noprompt":
        t = fa2(mode)
        return t, t
    if provider == "sdpa":
        glue = ga_sdpa_glue_kernels(s, mode)
        t = fa2(mode) + ga_sdpa_glue_bytes(s, mode) / bw * 1e3 + len(glue) * A["launch_us"] * 1e-3
        return t, t
    if provider in ("fastbridge", "fastbridge-atomicdq"):
        dq = "atomic" if provider == "fastbridge-atomicdq" else "separate"
        out = []
        for i in (1, 0):
            t = 0.0
            if mode in ("fwd", "fwd_bwd"):  # a forward is never faster than its floor bytes
                t += max(ga_kernel_flops(s, "fwd") / (A["fb_fwd_tflops"][i] * 1e12), ga_min_bytes(s, "fwd") / bw)
            if mode in ("bwd", "fwd_bwd"):
                pre = 3 * s.Q + 4 * s.LSE            # the "pre" kernel reads q, dout, out; writes Δm, Δp
                if dq == "atomic":  # the fp32 dQ accumulator: zero-filled, then read by the dq kernel
                    pre += 2 * s.Q * 4 // s.e        # (L2 atomic throughput itself is not modelled)
                t += max(ga_kernel_flops(s, "bwd", dq) / (A["fb_bwd_tflops"][i] * 1e12),
                         (ga_min_bytes(s, "bwd") - 2 * s.LSE) / bw) + pre / bw
            out.append(t * 1e3)
        return out[0], out[1]
    if provider == "eager":
        t = _kernels_ms(ga_eager_kernels(s, mode), bw, A["cublas_tflops"])
        return t, t
    raise ValueError(provider)


# ------------------------------------------------------------------------------ end to end
# PEFT LLaMA-Adapter training step on LLaMA-7B-shaped layers (benchmarks/test_bench_llama_adapter_e2e.py).
E2E = dict(d=4096, h=32, hkv=32, f=11008, v=32000, p=10, layers=4, tokens=16384, L=(512, 2048, 4096),
           attn=("sdpa", "eager"))
E2E_QUICK = dict(L=(2048,), attn=("sdpa",))
E2E_CPU = dict(d=64, h=4, hkv=4, f=172, v=256, p=10, layers=2, b=2, l=64, attn=("sdpa", "eager"))


@dataclass(frozen=True)
class LlamaStepShape:
    layers: int
    d: int
    h: int
    hkv: int
    f: int
    v: int
    p: int
    b: int
    l: int

    @property
    def n(self) -> int:
        return self.b * self.l

    @property
    def attn(self) -> AttnShape:
        return AttnShape(b=self.b, h=self.h, hkv=self.hkv, lq=self.l, lk=self.l, d=self.d // self.h, p=self.p)

    @property
    def layer_params(self) -> int:
        dh = self.d // self.h
        return 2 * self.d * self.d + 2 * self.d * self.hkv * dh + 3 * self.d * self.f


def e2e_flops(s: LlamaStepShape, mode: str) -> int:
    """Model FLOPs of one step, counted once (the patched model's work): per layer the seven projections
    (2·N·params) and the gated attention (ga_flops), plus the LM head (2·N·d·V). The base model is frozen,
    so the backward computes activation gradients only (no dW): 1× the projections' and the head's forward
    FLOPs, 2.5× the attention's. PEFT's own overhead -- q_proj and RoPE recomputed for the prompt branch, a
    second o_proj on the prompt output -- is not credited (≈ +8·N·d² per layer, fwd + bwd)."""
    lin = 2 * s.n * s.layer_params
    att = ga_flops(s.attn, "fwd")
    head = 2 * s.n * s.d * s.v
    fwd = s.layers * (lin + att) + head
    bwd = s.layers * (lin + att * 5 // 2) + head
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def e2e_peft_extra_flops(s: LlamaStepShape, mode: str) -> int:
    """FLOPs unpatched PEFT adds: q_proj recomputed for the prompt branch and the prompt output's own
    o_proj, each 2·N·d² forward and again for its input gradient in backward."""
    fwd = s.layers * 2 * (2 * s.n * s.d * s.d)
    return {"fwd": fwd, "bwd": fwd, "fwd_bwd": 2 * fwd}[mode]


def e2e_predict_ms(s: LlamaStepShape, attn: str, patched: bool) -> tuple[float, float]:
    """(optimistic, pessimistic) ms of one training step (fwd_bwd) from GA_ASSUME: the projections and the
    LM head at cuBLAS's rate, plus per layer the attention --
      patched      fastbridge's gated attention (ga_predict_ms);
      unpatched    attn="sdpa": SDPA causal (FA2) + PEFT's eager prompt branch (_peft_prefix_kernels) and
                   its recomputed q_proj / second o_proj (e2e_peft_extra_flops); attn="eager": HF eager
                   attention + the same PEFT branch (ga_eager_kernels).
    RMSNorm, RoPE, SiLU·up, residuals and the loss are not modelled (they cost both the same and only
    lower the ratio)."""
    A = GA_ASSUME
    bw, rate = A["hbm_tbps"] * 1e12, A["cublas_tflops"] * 1e12
    a = s.attn
    common = (2 * s.layers * 2 * s.n * s.layer_params + 2 * 2 * s.n * s.d * s.v) / rate * 1e3
    if patched:
        lo, hi = ga_predict_ms(a, "fastbridge", "fwd_bwd")
        return common + s.layers * lo, common + s.layers * hi
    extra = e2e_peft_extra_flops(s, "fwd_bwd") / rate * 1e3
    if attn == "eager":
        per = ga_predict_ms(a, "eager", "fwd_bwd")[0]
    else:
        pf, pb = _peft_prefix_kernels(a)
        per = ga_predict_ms(a, "sdpa_noprompt", "fwd_bwd")[0] + _kernels_ms(pf + pb, bw, A["cublas_tflops"])
    t = common + extra + s.layers * per
    return t, t


def e2e_cuda_shapes(quick: bool = False, layers: int | None = None) -> list[LlamaStepShape]:
    ls = E2E_QUICK["L"] if quick else E2E["L"]
    return [LlamaStepShape(layers=layers or E2E["layers"], d=E2E["d"], h=E2E["h"], hkv=E2E["hkv"], f=E2E["f"],
                           v=E2E["v"], p=E2E["p"], b=E2E["tokens"] // n, l=n) for n in ls]


# ------------------------------------------------------------------------------------ GA tables
def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.2f}"


def _gf(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def ga_table_floors() -> list[str]:
    out = ["| shape | mode | GFLOP | floor MB | FLOP/B | FLOP µs | bytes µs | floor µs | bound by | "
           "executed GFLOP (kernel) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for s in ga_prefill_shapes():
        for mode in ("fwd", "bwd", "fwd_bwd"):
            fl, by = ga_flops(s, mode), ga_min_bytes(s, mode)
            tf, tb = _flop_us(fl), _us(by)
            out.append(f"| {s.label} | {mode} | {_gf(fl)} | {_mb(by)} | {fl / by:,.0f} | {tf:,.1f} | {tb:,.1f} | "
                       f"{max(tf, tb):,.1f} | {'compute' if tf > tb else 'memory'} | "
                       f"{_gf(ga_kernel_flops(s, mode))} |")
    return out


def ga_table_predict() -> list[str]:
    provs = ("fastbridge", "fastbridge-atomicdq", "sdpa", "sdpa_noprompt", "eager")
    out = ["| shape | mode | fastbridge ms | sdpa ms | sdpa_noprompt ms | eager ms | vs sdpa | vs eager | "
           "fb fwd ≤ noprompt fwd? | atomic dQ ms | atomic vs sdpa |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for s in ga_prefill_shapes():
        for mode in ("fwd", "fwd_bwd"):
            p = {k: ga_predict_ms(s, k, mode) for k in provs}
            fb = p["fastbridge"]
            vs_sdpa = f"{p['sdpa'][0] / fb[1]:.2f}-{p['sdpa'][0] / fb[0]:.2f}×"
            vs_eager = f"{p['eager'][0] / fb[1]:.1f}-{p['eager'][0] / fb[0]:.1f}×"
            le = ""
            if mode == "fwd":
                np_ = p["sdpa_noprompt"][0]
                le = "yes" if fb[1] <= np_ else ("if high case" if fb[0] <= np_ else "no")
            a = p["fastbridge-atomicdq"]
            at = (" | " if mode == "fwd" else
                  f"{a[0]:.3f}-{a[1]:.3f} | {p['sdpa'][0] / a[1]:.2f}-{p['sdpa'][0] / a[0]:.2f}×")
            out.append(f"| {s.label} | {mode} | {fb[0]:.3f}-{fb[1]:.3f} | {p['sdpa'][0]:.3f} | "
                       f"{p['sdpa_noprompt'][0]:.3f} | {p['eager'][0]:.2f} | {vs_sdpa} | {vs_eager} | {le} | {at} |")
    return out


def ga_table_memory() -> list[str]:
    provs = ("fastbridge", "sdpa", "sdpa_noprompt", "eager")
    out = ["| shape | mode | " + " | ".join(f"{p} GB" for p in provs) + " | fb ÷ sdpa | fb ÷ noprompt | "
           "eager: scores GB (S·2 B) |",
           "|---|---|" + "---:|" * (len(provs) + 3)]
    for s in ga_prefill_shapes():
        for mode in ("fwd", "fwd_bwd"):
            pk = {p: ga_peak_bytes(s, p, mode) for p in provs}
            out.append(f"| {s.label} | {mode} | " + " | ".join(_gb(pk[p]) for p in provs) +
                       f" | {pk['fastbridge'] / pk['sdpa']:.2f} | {pk['fastbridge'] / pk['sdpa_noprompt']:.2f} | "
                       f"{_gb(2 * s.scores)} |")
    return out


def ga_table_decode() -> list[str]:
    out = ["| B | Lk | K+V MB | floor µs | FLOP µs | programs (no split) | splits | programs (split) | "
           "fb no-split µs | fb split µs | sdpa µs | eager µs |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in ga_decode_shapes():
        by = ga_min_bytes(s, "fwd")
        sp = ga_decode_splits(s)
        ns = ga_predict_ms(s, "fastbridge-nosplit", "fwd")
        ws = ga_predict_ms(s, "fastbridge", "fwd")
        sd = ga_predict_ms(s, "sdpa", "fwd")
        ea = ga_predict_ms(s, "eager", "fwd")
        out.append(f"| {s.b} | {s.lk} | {_mb(2 * s.KV)} | {_us(by):,.1f} | {_flop_us(ga_flops(s, 'fwd')):,.2f} | "
                   f"{s.b * s.h} | {sp} | {s.b * s.h * sp} | {ns[0] * 1e3:,.0f}-{ns[1] * 1e3:,.0f} | "
                   f"{ws[0] * 1e3:,.0f}-{ws[1] * 1e3:,.0f} | {sd[0] * 1e3:,.0f}-{sd[1] * 1e3:,.0f} | "
                   f"{ea[0] * 1e3:,.0f}-{ea[1] * 1e3:,.0f} |")
    return out


def ga_eager_breakdown(s: AttnShape) -> list[str]:
    out = [f"Eager kernels, {s.label} (MB; GFLOP where a matmul):", ""]
    for mode in ("fwd", "bwd"):
        parts = ", ".join(f"{k} {_mb(b)}" + (f" ({_gf(f)} GFLOP)" if f else "")
                          for k, b, f in ga_eager_kernels(s, mode))
        out.append(f"- {mode}: {parts} -- total {_mb(ga_eager_bytes(s, mode))} MB "
                   f"(floor {_mb(ga_min_bytes(s, mode))} MB)")
    return out


def ga_sdpa_breakdown(s: AttnShape) -> list[str]:
    out = [f"sdpa composition beyond SDPA-causal, {s.label} (MB):", ""]
    for mode in ("fwd", "bwd"):
        parts = ", ".join(f"{k} {_mb(b)}" for k, b in ga_sdpa_glue_kernels(s, mode))
        out.append(f"- {mode}: {parts} -- total {_mb(ga_sdpa_glue_bytes(s, mode))} MB = "
                   f"{_us(ga_sdpa_glue_bytes(s, mode), GA_ASSUME['hbm_tbps']):,.0f} µs at "
                   f"{GA_ASSUME['hbm_tbps']} TB/s")
    return out


def e2e_table() -> list[str]:
    out = ["| attn | layers | B | L | step TFLOP (model) | at 989 TFLOP/s ms | attention FLOP share | "
           "PEFT extra TFLOP | unpatched pred. ms | patched pred. ms | pred. speed-up |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for attn in E2E["attn"]:
        for s in e2e_cuda_shapes():
            fl = e2e_flops(s, "fwd_bwd")
            att = s.layers * ga_flops(s.attn, "fwd_bwd")
            un = e2e_predict_ms(s, attn, patched=False)[0]
            lo, hi = e2e_predict_ms(s, attn, patched=True)
            out.append(f"| {attn} | {s.layers} | {s.b} | {s.l} | {fl / 1e12:,.1f} | {_flop_us(fl) / 1e3:,.1f} | "
                       f"{att / fl:.1%} | {e2e_peft_extra_flops(s, 'fwd_bwd') / 1e12:,.2f} | {un:,.0f} | "
                       f"{lo:,.0f}-{hi:,.0f} | {un / hi:.2f}-{un / lo:.2f}× |")
    return out


def ga_lines() -> list[str]:
    A = GA_ASSUME
    ridge = BF16_DENSE_TFLOPS / HBM_TBPS
    return [
        f"Assumed peaks (H100 SXM datasheet): HBM3 {HBM_TBPS} TB/s, bf16 dense {BF16_DENSE_TFLOPS:.0f} TFLOP/s "
        f"(ridge {ridge:.0f} FLOP/B); floors use these nominal numbers. bf16, H = {GA_H}, D = {GA_D}, P = {GA_P}, "
        f"prompt shared by the batch; prefill B·L = {GA_TOKENS} tokens. MB = 10^6 bytes, GB = 10^9.",
        "",
        "Columns: GFLOP = model FLOPs (ga_flops: fwd 4·B·H·D·(L(L+1)/2 + L·P), bwd 2.5×, fwd_bwd 3.5×); "
        "floor MB = ga_min_bytes; FLOP µs = FLOPs ÷ peak; bytes µs = floor bytes ÷ HBM; floor µs = the larger; "
        "executed GFLOP = what kernels/gated_attention.py computes (whole diagonal blocks, prompt padded to 16 "
        "keys).",
        "",
        "### Floors, training / prefill (B·L = 16k)",
        "",
        *ga_table_floors(),
        "",
        "### Predicted times (assumptions: GA_ASSUME in floors.py; not measurements)",
        "",
        f"fastbridge: executed FLOPs at {A['fb_fwd_tflops'][1]:.0f}–{A['fb_fwd_tflops'][0]:.0f} TFLOP/s forward, "
        f"{A['fb_bwd_tflops'][1]:.0f}–{A['fb_bwd_tflops'][0]:.0f} backward (+ the pre kernel's bytes); "
        "sdpa_noprompt: FA2 rates by L (FA3 paper's H100 numbers for FA2, approximate); sdpa: that + the glue "
        f"kernels' bytes at {A['hbm_tbps']} TB/s + {A['launch_us']:.0f} µs per glue kernel; eager: Σ max(bytes ÷ "
        f"{A['hbm_tbps']} TB/s, FLOPs ÷ {A['cublas_tflops']:.0f} TFLOP/s) over its kernels. 'vs' columns: "
        "predicted speed-up of fastbridge (low-high case). atomic dQ: the provider fastbridge-atomicdq "
        "(FASTBRIDGE_GA_DQ=atomic: 5 instead of 7 backward matmuls per pair, + the fp32 dQ accumulator's zero-fill "
        "and read; the L2 atomics' own throughput not modelled).",
        "",
        *ga_table_predict(),
        "",
        "### Predicted peak memory (harness peak_mb: resident inputs + dy + what the call allocates; "
        "ga_peak_bytes)",
        "",
        *ga_table_memory(),
        "",
        f"### Decode (Lq = 1, Lk = {GA_DECODE_LK}; forward only, no autograd)",
        "",
        f"programs = B·H forward programs without split-K; splits / programs (split) = ga_decode_splits (mirrors "
        f"kernels/gated_attention.py: ⌈2·{H100_SMS}/(B·H)⌉ capped at Lk/256, rounded to whole 64-key blocks); "
        f"fb µs = (K+V bytes [+ fp32 partials]) ÷ min({A['hbm_tbps']} TB/s, programs × {A['cta_gbps'][0]:.0f}–"
        f"{A['cta_gbps'][1]:.0f} GB/s per program) + {A['launch_us']:.0f} µs per kernel; sdpa: FA2 with its "
        "split-KV at the bandwidth + 3 glue kernels; eager: its kernels at the bandwidth + launch gaps.",
        "",
        *ga_table_decode(),
        "",
        "### Where eager's and the sdpa composition's bytes go",
        "",
        *ga_eager_breakdown(AttnShape(b=8, h=GA_H, hkv=GA_H, lq=2048, lk=2048)),
        "",
        *ga_sdpa_breakdown(AttnShape(b=8, h=GA_H, hkv=GA_H, lq=2048, lk=2048)),
        "",
        "### End to end: PEFT LLaMA-Adapter training step, LLaMA-7B layers (d 4096, 32 heads, FFN 11008, "
        "vocab 32000), 16k tokens",
        "",
        *e2e_table(),
    ]


def adapter_lines() -> list[str]:
    return [
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


def main(argv: list[str] | None = None) -> int:
    """No argument: the adapter_block tables (as before); ``gated_attention``: the gated-attention and
    end-to-end tables; ``all``: both."""
    argv = list(argv or [])
    which = argv[0] if argv else "adapter_block"
    if len(argv) > 1 or which not in ("adapter_block", "gated_attention", "all"):
        print("usage: python benchmarks/floors.py [adapter_block | gated_attention | all]", file=sys.stderr)
        return 2
    lines = []
    if which in ("adapter_block", "all"):
        lines += adapter_lines()
    if which == "all":
        lines += ["", ""]
    if which in ("gated_attention", "all"):
        lines += ga_lines()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
