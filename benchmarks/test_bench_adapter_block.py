"""adapter_block benchmarks: y = x + s · up(act(down(LN?(x)))) (API.md), fwd / bwd / fwd_bwd.

Providers
  CUDA  fastbridge   BottleneckAdapter (fused) -> fastbridge.ops.adapter_block, backend "kernel"
                     (Triton: one forward kernel, two backward kernels).
        eager        the same module with ``.fused = False``: the plain nn.Linear / LayerNorm / activation
                     composition users run today (AdapterHub / BLIP adapter math).
        compile      ``torch.compile(eager module, dynamic=False)``, default mode (inductor; cuBLAS for
                     the matmuls). Compiled once per shape, outside the timing.
  CPU   fastbridge-reference  backend "reference": the eager fp32-accumulating reference fastbridge
                     falls back to on CPU (fastbridge.reference.adapter_block) -- not a fused kernel.
        eager        as on CUDA.
Shapes: benchmarks/floors.py (CONFIGS, CUDA_* and CPU_* grids), which also holds the FLOP and byte
formulas behind the ``tflops`` / ``gbps`` fields. Parameters live in the activation dtype, biases on,
scale 1.0, residual = x; x is (N, d) with requires_grad (adapters sit in every layer, so dx is needed).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import floors as F
from _harness import DTYPES, cuda_unavailable_reason, dtype_names

import fastbridge
from fastbridge import _backend
from fastbridge.modules.adapter import BottleneckAdapter

OP = "adapter_block"
CUDA_PROVIDERS = ("fastbridge", "eager", "compile")
CPU_PROVIDERS = ("fastbridge-reference", "eager")


@dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    cfg: str
    d: int
    r: int
    n: int
    provider: str
    mode: str

    @property
    def id(self) -> str:
        return f"{self.dtype}-{self.cfg}-d{self.d}-r{self.r}-N{self.n}-{self.provider}-{self.mode}"

    @property
    def shape_key(self) -> tuple:
        return (self.device, self.dtype, self.cfg, self.d, self.r, self.n)

    @property
    def model(self) -> F.AdapterShape:
        kw = F.CONFIGS[self.cfg]
        return F.AdapterShape(n=self.n, d=self.d, r=self.r, ln=kw["ln"], act=kw["act"],
                              e=F.ELEMENT_BYTES[self.dtype])

    @property
    def shape(self) -> dict:
        kw = F.CONFIGS[self.cfg]
        return {"cfg": self.cfg, "d": self.d, "r": self.r, "N": self.n, "ln": kw["ln"], "act": kw["act"]}


def _cases(device, dtypes, ds, rs, ns, providers):
    # Shape-major order: the providers and modes of one shape run back to back (one compile per shape).
    return [Case(device, dt, cfg, d, r, n, p, m) for dt in dtypes for cfg in F.CONFIGS for d in ds for r in rs
            for n in ns for p in providers for m in F.MODES]


def _cuda_skip_reason(provider: str):
    reason = cuda_unavailable_reason()
    if reason is None and provider == "fastbridge":
        if _backend.triton_interpret():
            reason = "TRITON_INTERPRET=1: the kernels would run in the Triton interpreter, not on the GPU"
        else:
            reason = _backend.triton_unavailable_reason(torch.device("cuda"))
    return reason


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    if "cuda_case" in metafunc.fixturenames:
        ns = F.CUDA_N_QUICK if cfg.getoption("fb_quick") else F.CUDA_N
        cases = _cases("cuda", dtype_names(cfg, "fb_dtypes"), F.CUDA_D, F.CUDA_R, ns, CUDA_PROVIDERS)
        params = []
        for c in cases:
            reason = _cuda_skip_reason(c.provider)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(c, id=c.id, marks=marks))
        metafunc.parametrize("cuda_case", params)
    if "cpu_case" in metafunc.fixturenames:
        cases = _cases("cpu", dtype_names(cfg, "fb_cpu_dtypes"), F.CPU_D, F.CPU_R, F.CPU_N, CPU_PROVIDERS)
        metafunc.parametrize("cpu_case", [pytest.param(c, id=c.id) for c in cases])


# One module (and its compiled wrapper) per shape, reused by that shape's providers and modes; a new
# shape drops the old one and resets dynamo, so no compile cache limit is ever reached.
_CACHE: dict = {}


def _module(c: Case) -> BottleneckAdapter:
    if _CACHE.get("key") != c.shape_key:
        _CACHE.clear()
        torch._dynamo.reset()
        torch.manual_seed(0)
        kw = F.CONFIGS[c.cfg]
        mod = BottleneckAdapter(c.d, c.r, activation=kw["act"], layer_norm=kw["ln"], init="bert",
                                device=c.device, dtype=DTYPES[c.dtype])
        _CACHE.update(key=c.shape_key, mod=mod)
    return _CACHE["mod"]


def _compiled(mod: BottleneckAdapter):
    if "compiled" not in _CACHE:
        _CACHE["compiled"] = torch.compile(mod, dynamic=False)
    return _CACHE["compiled"]


def _run(fb_bench, c: Case) -> None:
    mod = _module(c)
    x = torch.randn(c.n, c.d, device=c.device, dtype=DTYPES[c.dtype], requires_grad=True)
    backend = "reference"
    if c.provider in ("fastbridge", "fastbridge-reference"):
        mod.fused = True
        backend = "kernel" if c.provider == "fastbridge" else "reference"
        fn = lambda: mod(x)  # noqa: E731
    elif c.provider == "eager":
        mod.fused = False
        fn = lambda: mod(x)  # noqa: E731
    elif c.provider == "compile":
        mod.fused = False
        cm = _compiled(mod)
        fn = lambda: cm(x)  # noqa: E731
    else:  # pragma: no cover - the grids above name every provider
        raise ValueError(c.provider)
    s = c.model
    with fastbridge.use_backend(backend):
        fb_bench.run(op=OP, provider=c.provider, mode=c.mode, dtype=c.dtype, shape=c.shape, fn=fn,
                     device=c.device, flops=F.model_flops(s, c.mode), nbytes=F.min_bytes(s, c.mode))


def test_adapter_block_cuda(fb_bench, cuda_case):
    _run(fb_bench, cuda_case)


def test_adapter_block_cpu(fb_bench, cpu_case):
    _run(fb_bench, cpu_case)


def test_providers_agree_cpu():
    """Guard against benchmarking the wrong thing: fastbridge-reference and eager give the same y.

    Not a benchmark: runs under plain ``pytest benchmarks/``, skipped by --benchmark-only."""
    for cfg, kw in F.CONFIGS.items():
        torch.manual_seed(0)
        mod = BottleneckAdapter(64, 8, activation=kw["act"], layer_norm=kw["ln"], init="bert")
        x = torch.randn(16, 64)
        mod.fused = False
        ye = mod(x)
        mod.fused = True
        with fastbridge.use_backend("reference"):
            yr = mod(x)
        torch.testing.assert_close(yr, ye, rtol=1e-5, atol=1e-5, msg=f"{cfg}: providers disagree")
