"""gated_attention benchmarks: out = softmax(q kᵀ·s + causal) v + g · softmax(q pkᵀ·s) pv (API.md).

Providers (one op-level call each; q (B, H, Lq, D), k, v (B, Hkv, Lk, D), pk, pv (1, Hkv, P, D), gate (1,)
in the activation dtype, g = gate as in PEFT, i.e. gate_fn="identity")
  CUDA  fastbridge     fastbridge.ops.gated_attention, backend "kernel" (Triton: one forward kernel -- split +
                       combine kernels for decode -- and the pre / dkdv / dq backward kernels).
        eager          peft_eager_gated_attention below: PEFT's AdaptedAttention math at the op level (what
                       LLaMA-Adapter users run today with attn_implementation="eager").
        sdpa           the best stock composition: SDPA(causal) + g · SDPA(prompt expanded over the batch).
        sdpa_noprompt  SDPA(causal) alone: the target "forward no slower than SDPA without any prompt".
        compile        torch.compile(peft_eager_gated_attention, dynamic=False), compiled once per shape.
        fastbridge-nosplit  (decode only) fastbridge with the split-K decode path turned off (its
                       decode_splits forced to 1): measures what split-K buys.
        fastbridge-atomicdq (prefill bwd / fwd_bwd only) fastbridge with FASTBRIDGE_GA_DQ=atomic: dQ
                       accumulated by the dkdv kernel with fp32 atomics (FA2's single pass) instead of
                       the separate dq kernel; measures which backward wins.
  CPU   fastbridge-reference (fastbridge's eager fp32 reference fallback), eager, sdpa, sdpa_noprompt at a
        tiny shape: a code-path smoke test of every provider function, not a kernel measurement.
Ops / shapes (benchmarks/floors.py: GA_*; formulas for ``tflops`` / ``gbps`` there too):
  "gated_attention"         training / prefill: Lq = Lk = L in {512 ... 8192}, B = 16384 // L, H = 32,
                            Hkv = 32 (and Hkv = 8 at L = 2048), D = 128, P = 10; fwd, bwd, fwd_bwd.
  "gated_attention_decode"  Lq = 1 against a Lk = 4096 cache, B in {1, 8, 32}; fwd only, no autograd.
dtype: bf16 on CUDA (``--fb-dtypes bf16,fp16`` adds fp16), fp32 on CPU (``--fb-cpu-dtypes``). A provider that
runs out of GPU memory is skipped with the reason (and floors.ga_peak_bytes' prediction), never recorded.
Run the CUDA part in pieces under 10 minutes each (benchmarks/notes/gated_attention.md lists them), e.g.
  pytest benchmarks/test_bench_gated_attention.py --benchmark-only -k "cuda and (L512- or L1024- or L2048-)"
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as TF

import floors as F
from _harness import DTYPES, cuda_unavailable_reason, dtype_names

import fastbridge
from fastbridge import _backend
from fastbridge.ops import gated_attention

OP = "gated_attention"
OP_DECODE = "gated_attention_decode"
CUDA_PROVIDERS = ("fastbridge", "fastbridge-atomicdq", "eager", "sdpa", "sdpa_noprompt", "compile")
CUDA_DECODE_PROVIDERS = ("fastbridge", "fastbridge-nosplit", "eager", "sdpa", "sdpa_noprompt", "compile")
CPU_PROVIDERS = ("fastbridge-reference", "eager", "sdpa", "sdpa_noprompt")
GATE_VALUE = 0.25  # PEFT initialises the gate at 0; any value times the same


# ------------------------------------------------------------------------------------ providers
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers.models.llama.modeling_llama.repeat_kv, verbatim (transformers 5.x)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def peft_eager_gated_attention(q, k, v, prefix_k, prefix_v, gate, mask):
    """PEFT's LLaMA-Adapter attention math at the op level, mirroring line by line:

    main branch   transformers/models/llama/modeling_llama.py ``eager_attention_forward`` (what
                  LlamaAttention runs with attn_implementation="eager"): repeat_kv, bf16 q·kᵀ · scaling,
                  + the additive causal mask, softmax in fp32 cast back to q's dtype, · v.
    prompt branch peft/tuners/adaption_prompt/layer.py ``AdaptedAttention.forward`` (peft 0.21): the prompt's
                  keys / values ``.repeat(bsz, 1, 1, 1)`` over the batch and ``repeat_interleave`` over the
                  GQA groups, q·pkᵀ / sqrt(head_dim), ``adaption_gate * softmax(fp32).to(dtype)``, · pv,
                  added to the main output.
    Left out (not attention): PEFT's q_proj + RoPE recomputation, the prompt's k_proj / v_proj, the o_proj
    of each branch, HF's transpose of the output to (B, L, H, D). ``mask`` is HF's additive float mask
    (0 / finfo.min), (1, 1, Lq, Lk), bottom-right aligned like a KV cache's.
    """
    bsz, num_heads, q_len, head_dim = q.shape
    factor = num_heads // k.shape[1]
    # transformers eager_attention_forward
    key_states = repeat_kv(k, factor)
    value_states = repeat_kv(v, factor)
    attn_weights = torch.matmul(q, key_states.transpose(2, 3)) * head_dim ** -0.5
    attn_weights = attn_weights + mask
    attn_weights = TF.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    output = torch.matmul(attn_weights, value_states)
    # peft AdaptedAttention.forward
    adapter_k = prefix_k.repeat(bsz, 1, 1, 1)
    adapter_v = prefix_v.repeat(bsz, 1, 1, 1)
    adapter_k = torch.repeat_interleave(adapter_k, repeats=factor, dim=1)
    adapter_v = torch.repeat_interleave(adapter_v, repeats=factor, dim=1)
    previous_dtype = q.dtype
    scores = torch.matmul(q, adapter_k.transpose(2, 3).to(previous_dtype)) / math.sqrt(head_dim)
    scores = gate * TF.softmax(scores, dim=-1, dtype=torch.float32).to(previous_dtype)
    adapter_output = torch.matmul(scores, adapter_v)
    return output + adapter_output


def _sdpa_causal(lq: int, lk: int) -> bool:
    # SDPA's is_causal is top-left aligned: the same as the bottom-right mask when Lq == Lk; a single
    # decoding query sees the whole cache (no mask). The grids use nothing else.
    if lq not in (1, lk):
        raise ValueError(f"sdpa providers: Lq must be 1 or Lk, got Lq={lq}, Lk={lk}")
    return lq == lk


def sdpa_gated_attention(q, k, v, prefix_k, prefix_v, gate):
    """SDPA(causal) + g · SDPA(prompt): the best composition of stock ops (BENCHMARKS.md)."""
    B = q.shape[0]
    main = TF.scaled_dot_product_attention(q, k, v, is_causal=_sdpa_causal(q.shape[2], k.shape[2]), enable_gqa=True)
    pref = TF.scaled_dot_product_attention(q, prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1),
                                           enable_gqa=True)
    return main + gate * pref


def sdpa_noprompt(q, k, v):
    return TF.scaled_dot_product_attention(q, k, v, is_causal=_sdpa_causal(q.shape[2], k.shape[2]), enable_gqa=True)


def additive_causal_mask(lq: int, lk: int, dtype, device) -> torch.Tensor:
    """HF's eager 4D mask: 0 where visible, finfo(dtype).min elsewhere; query i sees j <= i + Lk - Lq."""
    i = torch.arange(lq, device=device).view(lq, 1)
    j = torch.arange(lk, device=device).view(1, lk)
    mask = torch.zeros(lq, lk, dtype=dtype, device=device)
    return mask.masked_fill(j > i + (lk - lq), torch.finfo(dtype).min).view(1, 1, lq, lk)


# ----------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    b: int
    h: int
    hkv: int
    lq: int
    lk: int
    d: int
    p: int
    provider: str
    mode: str

    @property
    def decode(self) -> bool:
        return self.lq == 1 and self.lk > 1

    @property
    def op(self) -> str:
        return OP_DECODE if self.decode else OP

    @property
    def id(self) -> str:
        if self.decode:
            geo = f"decode-H{self.h}-Hkv{self.hkv}-D{self.d}-P{self.p}-Lk{self.lk}-B{self.b}"
        else:
            geo = f"H{self.h}-Hkv{self.hkv}-D{self.d}-P{self.p}-B{self.b}-L{self.lq}"
        return f"{self.dtype}-{geo}-{self.provider}-{self.mode}"

    @property
    def shape_key(self) -> tuple:
        return (self.device, self.dtype, self.b, self.h, self.hkv, self.lq, self.lk, self.d, self.p)

    @property
    def model(self) -> F.AttnShape:
        return F.AttnShape(b=self.b, h=self.h, hkv=self.hkv, lq=self.lq, lk=self.lk, d=self.d, p=self.p,
                           e=F.ELEMENT_BYTES[self.dtype])

    @property
    def shape(self) -> dict:
        if self.decode:
            return {"H": self.h, "Hkv": self.hkv, "D": self.d, "P": self.p, "Lq": self.lq, "Lk": self.lk,
                    "B": self.b}
        return {"H": self.h, "Hkv": self.hkv, "D": self.d, "P": self.p, "B": self.b, "L": self.lq}


def _cases(device, dtypes, shapes, providers, modes):
    # Shape-major: the providers and modes of one shape run back to back (one input set, one compile).
    return [Case(device, dt, s.b, s.h, s.hkv, s.lq, s.lk, s.d, s.p, p, m)
            for dt in dtypes for s in shapes for p in providers for m in modes
            if not (p == "fastbridge-atomicdq" and m == "fwd")]  # its forward is fastbridge's


def _cpu_shapes() -> list[F.AttnShape]:
    c = F.GA_CPU
    return [F.AttnShape(b=c["b"], h=c["h"], hkv=hkv, lq=c["l"], lk=c["l"], d=c["d"], p=c["p"]) for hkv in c["hkv"]]


def _cpu_decode_shapes() -> list[F.AttnShape]:
    c = F.GA_CPU
    return [F.AttnShape(b=c["decode_b"], h=c["h"], hkv=c["h"], lq=1, lk=c["decode_lk"], d=c["d"], p=c["p"])]


def _cuda_skip_reason(provider: str):
    reason = cuda_unavailable_reason()
    if reason is None and provider.startswith("fastbridge"):
        if _backend.triton_interpret():
            reason = "TRITON_INTERPRET=1: the kernels would run in the Triton interpreter, not on the GPU"
        else:
            reason = _backend.triton_unavailable_reason(torch.device("cuda"))
    return reason


def _params(cases):
    params = []
    for c in cases:
        reason = _cuda_skip_reason(c.provider) if c.device == "cuda" else None
        params.append(pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    quick = cfg.getoption("fb_quick")
    if "cuda_case" in metafunc.fixturenames:
        dts = dtype_names(cfg, "fb_dtypes")
        shapes = [F.AttnShape(b=s.b, h=s.h, hkv=s.hkv, lq=s.lq, lk=s.lk, d=s.d, p=s.p)
                  for s in F.ga_prefill_shapes(quick)]
        metafunc.parametrize("cuda_case", _params(_cases("cuda", dts, shapes, CUDA_PROVIDERS, F.MODES)))
    if "cuda_decode_case" in metafunc.fixturenames:
        dts = dtype_names(cfg, "fb_dtypes")
        shapes = F.ga_decode_shapes(quick)
        metafunc.parametrize("cuda_decode_case",
                             _params(_cases("cuda", dts, shapes, CUDA_DECODE_PROVIDERS, ("fwd",))))
    if "cpu_case" in metafunc.fixturenames:
        dts = dtype_names(cfg, "fb_cpu_dtypes")
        cases = (_cases("cpu", dts, _cpu_shapes(), CPU_PROVIDERS, F.MODES)
                 + _cases("cpu", dts, _cpu_decode_shapes(), CPU_PROVIDERS, ("fwd",)))
        metafunc.parametrize("cpu_case", _params(cases))


# ----------------------------------------------------------------------------------------- inputs
# One input set (and compiled function) per shape, reused by that shape's providers and modes; a new
# shape drops the old one and resets dynamo (no recompile limit is ever reached).
_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _release_cache():
    yield
    _CACHE.clear()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _inputs(c: Case) -> dict:
    if _CACHE.get("key") != c.shape_key:
        _CACHE.clear()
        torch._dynamo.reset()
        gc.collect()
        if c.device == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        dt, dev = DTYPES[c.dtype], c.device
        grad = not c.decode  # decode is inference: no autograd graph

        def t(*shape):
            return torch.randn(*shape, device=dev, dtype=dt).requires_grad_(grad)

        _CACHE.update(
            key=c.shape_key,
            q=t(c.b, c.h, c.lq, c.d), k=t(c.b, c.hkv, c.lk, c.d), v=t(c.b, c.hkv, c.lk, c.d),
            pk=t(1, c.hkv, c.p, c.d), pv=t(1, c.hkv, c.p, c.d),
            gate=torch.full((1,), GATE_VALUE, device=dev, dtype=dt).requires_grad_(grad),
            mask=additive_causal_mask(c.lq, c.lk, dt, dev),
        )
    return _CACHE


def _compiled():
    if "compiled" not in _CACHE:
        _CACHE["compiled"] = torch.compile(peft_eager_gated_attention, dynamic=False)
    return _CACHE["compiled"]


def provider_fn(c: Case, x: dict):
    """(forward callable, backend) of provider ``c.provider`` on the inputs ``x``."""
    q, k, v, pk, pv, gate, mask = (x[n] for n in ("q", "k", "v", "pk", "pv", "gate", "mask"))
    if c.provider in ("fastbridge", "fastbridge-nosplit", "fastbridge-atomicdq", "fastbridge-reference"):
        backend = "reference" if c.provider == "fastbridge-reference" else "kernel"
        return (lambda: gated_attention(q, k, v, pk, pv, gate, causal=True, gate_fn="identity")), backend
    if c.provider == "eager":
        return (lambda: peft_eager_gated_attention(q, k, v, pk, pv, gate, mask)), None
    if c.provider == "compile":
        cf = _compiled()
        return (lambda: cf(q, k, v, pk, pv, gate, mask)), None
    if c.provider == "sdpa":
        return (lambda: sdpa_gated_attention(q, k, v, pk, pv, gate)), None
    if c.provider == "sdpa_noprompt":
        return (lambda: sdpa_noprompt(q, k, v)), None
    raise ValueError(c.provider)  # pragma: no cover - the grids name every provider


class _NoSplit:
    """Turns the decode split-K path of kernels/gated_attention.py off while active (decode_splits -> 1)."""

    def __enter__(self):
        import fastbridge.kernels.gated_attention as kmod

        if not callable(getattr(kmod, "decode_splits", None)):
            pytest.skip("fastbridge-nosplit: fastbridge.kernels.gated_attention has no decode_splits to turn off")
        self.mod, self.orig = kmod, kmod.decode_splits
        kmod.decode_splits = lambda *a, **k: 1
        return self

    def __exit__(self, *exc):
        self.mod.decode_splits = self.orig
        return False


@contextlib.contextmanager
def _dq_env(mode: str):
    """FASTBRIDGE_GA_DQ=mode while active (kernels/gated_attention.py reads it at each backward)."""
    old = os.environ.get("FASTBRIDGE_GA_DQ")
    os.environ["FASTBRIDGE_GA_DQ"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTBRIDGE_GA_DQ"]
        else:
            os.environ["FASTBRIDGE_GA_DQ"] = old


def provider_context(provider: str):
    """What a provider variant changes while it runs (the same kernels, another path)."""
    if provider == "fastbridge-nosplit":
        return _NoSplit()
    if provider == "fastbridge-atomicdq":
        return _dq_env("atomic")
    if provider == "fastbridge":
        return _dq_env("separate")
    return contextlib.nullcontext()


def _run(fb_bench, c: Case) -> None:
    x = _inputs(c)
    fn, backend = provider_fn(c, x)
    s = c.model
    prompt = c.provider != "sdpa_noprompt"
    oom = None
    try:
        with fastbridge.use_backend(backend or "auto"), provider_context(c.provider):
            fb_bench.run(op=c.op, provider=c.provider, mode=c.mode, dtype=c.dtype, shape=c.shape, fn=fn,
                         device=c.device, flops=F.ga_flops(s, c.mode, prompt), nbytes=F.ga_min_bytes(s, c.mode, prompt))
    except torch.OutOfMemoryError as e:
        oom = str(e).splitlines()[0]
    if oom is not None:  # outside the except block: the traceback's frames (and their tensors) are gone
        fn = None
        _CACHE.pop("compiled", None)
        gc.collect()
        torch.cuda.empty_cache()
        pred = ""
        if c.provider in ("fastbridge", "eager", "sdpa", "sdpa_noprompt"):
            pred = f"; predicted peak {F.ga_peak_bytes(s, c.provider, c.mode) / 1e9:.1f} GB (floors.ga_peak_bytes)"
        pytest.skip(f"{c.provider} {c.mode} {c.id}: out of GPU memory{pred}: {oom}")


def test_gated_attention_cuda(fb_bench, cuda_case):
    _run(fb_bench, cuda_case)


def test_gated_attention_decode_cuda(fb_bench, cuda_decode_case):
    _run(fb_bench, cuda_decode_case)


def test_gated_attention_cpu(fb_bench, cpu_case):
    _run(fb_bench, cpu_case)


# -------------------------------------------------------------- guards (not benchmarks; plain pytest)
def _agree(device: str, dtype: torch.dtype, providers, atol: float, rtol: float) -> None:
    """Every provider computes the same op (output and, with autograd, every input's gradient) as
    fastbridge's reference in float64."""
    for hkv, lq, lk in ((4, 64, 64), (2, 64, 64), (4, 1, 96)):
        torch.manual_seed(0)
        b, h, d, p = 2, 4, 32, 10
        grad = lq > 1
        base = [torch.randn(*sh, device=device, dtype=torch.float64)
                for sh in ((b, h, lq, d), (b, hkv, lk, d), (b, hkv, lk, d), (1, hkv, p, d), (1, hkv, p, d))]
        base.append(torch.full((1,), GATE_VALUE, device=device, dtype=torch.float64))
        dy = torch.randn(b, h, lq, d, device=device, dtype=torch.float64)
        ref_in = [t.clone().requires_grad_(grad) for t in base]
        with fastbridge.use_backend("reference"):
            ref = gated_attention(*ref_in, causal=True, gate_fn="identity")
        if grad:
            ref.backward(dy)
        for prov in providers:
            xin = [t.to(dtype).requires_grad_(grad) for t in base]
            dt_name = next(n for n, t in DTYPES.items() if t == dtype)
            c = Case(device, dt_name, b, h, hkv, lq, lk, d, p, prov, "fwd")
            x = dict(zip(("q", "k", "v", "pk", "pv", "gate"), xin), mask=additive_causal_mask(lq, lk, dtype, device))
            fn, backend = provider_fn(c, x)
            with fastbridge.use_backend(backend or "auto"), provider_context(prov):
                y = fn()
                msg = f"{prov} disagrees with the reference (Hkv={hkv}, Lq={lq}, Lk={lk}, {dtype})"
                torch.testing.assert_close(y.double(), ref.detach(), atol=atol, rtol=rtol, msg=msg)
                if grad:
                    y.backward(dy.to(dtype))
            if grad:
                for name, a, r in zip(("q", "k", "v", "pk", "pv", "gate"), xin, ref_in):
                    torch.testing.assert_close(a.grad.double(), r.grad, atol=atol * 4, rtol=rtol,
                                               msg=f"{msg}: d{name}")
        _CACHE.clear()


def test_providers_agree_cpu():
    """Guard against benchmarking the wrong thing: every CPU provider computes the same op.

    Not a benchmark: runs under plain ``pytest benchmarks/``, skipped by --benchmark-only."""
    _agree("cpu", torch.float32, [p for p in CPU_PROVIDERS if p != "sdpa_noprompt"], atol=2e-5, rtol=1e-4)


def test_providers_agree_cuda():
    """The CUDA providers compute the same op (bf16 tolerance). Not a benchmark."""
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    provs = [p for p in CUDA_PROVIDERS if p != "sdpa_noprompt" and _cuda_skip_reason(p) is None]
    _agree("cuda", torch.bfloat16, provs, atol=3e-2, rtol=3e-2)
