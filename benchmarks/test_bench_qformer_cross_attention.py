"""qformer_cross_attention benchmarks: the op at the transformers attention-interface level, and a whole
Q-Former training step (BENCHMARKS.md).

Op "qformer_cross_attention" -- one attention call as a BLIP-2 / InstructBLIP Q-Former layer makes it:
q, k, v are Linear outputs viewed (B, L, H, D) and transposed to (B, H, L, D) (non-contiguous, as HF
passes them), H = 12, D = 64, dropout 0.1 (training), the output transposed back to (B, L, H, D).
Providers, all through transformers' attention-function signature (module, q, k, v, mask, ...):
  CUDA  fastbridge      fastbridge.integrations.transformers.fastbridge_attention_forward (the CUDA
                        kernels, backend "kernel").
        eager           transformers.models.blip_2.modeling_blip_2.eager_attention_forward: the HF eager
                        Q-Former math (matmul · scaling + mask, softmax, dropout, matmul).
        sdpa            transformers' sdpa_attention_forward, PyTorch choosing the SDPA backend.
        sdpa-flash / sdpa-efficient / sdpa-cudnn  the same with one SDPA backend forced
                        (torch.nn.attention.sdpa_kernel); skipped where that backend refuses the inputs.
                        "SDPA's best backend" = the fastest of the sdpa* records of a case.
        compile         torch.compile(eager, dynamic=False), compiled once per shape.
  CPU   fastbridge (the C++ kernel), eager, sdpa -- the same functions on CPU tensors (fp32).
Shapes: B in {32, 128, 256} (CUDA) / {32} (CPU), Lq in {32 (BLIP-2 queries), 96 (InstructBLIP: 32 queries
+ 64 instruction tokens)}, Lk in {257 (EVA ViT-g at 224 px), 677 (364 px)}; CPU also Lq = Lk = 96 (the
InstructBLIP self-attention shape) and dropout 0 vs 0.1. dtypes: ``--fb-dtypes bf16,fp32`` (CUDA; the
Q-Former runs fp32 when the model is loaded in fp16 -- ``_keep_in_fp32_modules`` -- and bf16 in bf16),
``--fb-cpu-dtypes fp32``. Modes fwd / bwd / fwd_bwd; ``tflops`` counts the model's matmul FLOPs
(fwd 4·N, bwd 8·N, N = B·H·Lq·Lk·D: the backward's recomputation of QKᵀ is not credited), ``gbps`` the
bytes no implementation can avoid (q, k, v, out (+ lse) in fwd; q, k, v, out, dout, lse, dq, dk, dv in bwd).

Op "qformer_train_step" -- forward + backward of a ``Blip2QFormerModel`` with BLIP-2's Q-Former config
(hidden 768, 12 layers, 12 heads, cross-attention every 2nd layer to encoder width 1408), random init,
train mode (dropout 0.1), query_embeds (B, 32, 768) from a learned (1, 32, 768) parameter expanded over the
batch as Blip2Model does, frozen image features (B, Lk, 1408). Providers: hf-sdpa (HF's default), hf-eager,
fastbridge (``fastbridge.patch``: Q-Former attention on the CUDA kernels + batched K/V projections).
CUDA: B in {32, 128, 256}, Lk in {257, 677}, fp32 and bf16 (the model cast). CPU: a smoke-size step (B = 2).

    python benchmarks/test_bench_qformer_cross_attention.py     # the floor tables of notes/qformer_cross_attention.md
"""
from __future__ import annotations

import gc
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

H, D = 12, 64
DROPOUT = 0.1
CUDA_B = (32, 128, 256)
CUDA_LQ = (32, 96)
CUDA_LK = (257, 677)
CPU_SHAPES = ((32, 32, 257, 0.0), (32, 32, 677, 0.0), (32, 96, 96, 0.0), (32, 32, 257, DROPOUT))  # B, Lq, Lk, p
MODES = ("fwd", "bwd", "fwd_bwd")
CUDA_PROVIDERS = ("fastbridge", "eager", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "compile")
CPU_PROVIDERS = ("fastbridge", "eager", "sdpa")
STEP_B = (32, 128, 256)
STEP_LK = (257, 677)
STEP_PROVIDERS = ("fastbridge", "hf-sdpa", "hf-eager")
STEP_CPU = dict(B=2, Lk=257)
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OP = "qformer_cross_attention"
OP_STEP = "qformer_train_step"
OP_STEP_CPU = "qformer_train_step_cpu_smoke"

# H100 SXM5 datasheet peaks (benchmarks/floors.py holds the same numbers for the other ops)
HBM_TBPS = 3.35
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7}  # fp32: TF32 tensor cores (dense)


# ------------------------------------------------------------------------------------ cost model
def n_pairs(B, Lq, Lk) -> int:
    return B * H * Lq * Lk * D


def model_flops(B, Lq, Lk, mode) -> int:
    n = n_pairs(B, Lq, Lk)
    return {"fwd": 4 * n, "bwd": 8 * n, "fwd_bwd": 12 * n}[mode]


def min_bytes(B, Lq, Lk, mode, e) -> int:
    q = B * H * Lq * D * e
    kv = 2 * B * H * Lk * D * e
    lse = B * H * Lq * 4
    fwd = q + kv + q + lse  # read q, k, v; write out, lse
    bwd = 3 * q + kv + lse + q + kv  # read q, out, dout, k, v, lse; write dq, dk, dv
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def eager_bytes(B, Lq, Lk, mode, e) -> int:
    """Memory traffic of HF's eager composition, kernel by kernel (S = B·H·Lq·Lk scores in the dtype)."""
    s = B * H * Lq * Lk * e
    q, kv = B * H * Lq * D * e, B * H * Lk * D * e
    mask = B * H * Lq * Lk  # dropout keep mask (bool)
    fwd = (q + kv + s) + 2 * s + 2 * s + (2 * s + mask) + (s + kv + q) + 2 * q  # qk, ·scale, softmax, dropout, pv, transpose
    bwd = (2 * q) + (q + kv + s) + (s + q + kv) + (2 * s + mask) + 3 * s + 2 * s + (s + kv + q) + (s + q + kv)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def floor_rows(dtype="bf16"):
    e = ELEMENT_BYTES[dtype]
    for Lq in CUDA_LQ:
        for Lk in CUDA_LK:
            for B in CUDA_B:
                for mode in ("fwd", "fwd_bwd"):
                    nb, fl = min_bytes(B, Lq, Lk, mode, e), model_flops(B, Lq, Lk, mode)
                    yield dict(B=B, Lq=Lq, Lk=Lk, mode=mode, mb=nb / 1e6, mem_us=nb / (HBM_TBPS * 1e12) * 1e6,
                               flop_us=fl / (PEAK_TFLOPS[dtype] * 1e12) * 1e6, intensity=fl / nb,
                               eager_mb=eager_bytes(B, Lq, Lk, mode, e) / 1e6)


def print_floors():
    for dtype in ("bf16", "fp32"):
        print(f"\n### {dtype}: floors on H100 SXM (HBM {HBM_TBPS} TB/s, {PEAK_TFLOPS[dtype]:.0f} TFLOP/s dense)\n")
        print("| B | Lq | Lk | mode | floor MB | floor µs (bytes) | floor µs (FLOPs) | FLOP/B | eager MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in floor_rows(dtype):
            print(f"| {r['B']} | {r['Lq']} | {r['Lk']} | {r['mode']} | {r['mb']:.1f} | {r['mem_us']:.1f} | "
                  f"{r['flop_us']:.1f} | {r['intensity']:.0f} | {r['eager_mb']:.0f} |")


# ------------------------------------------------------------------------------------- providers
class _AttnModule(torch.nn.Module):
    """Stands for Blip2QFormerMultiHeadAttention in the attention-function call (training mode)."""

    def __init__(self):
        super().__init__()
        self.is_causal = False
        self.attention_dropout = DROPOUT


def mask_for(provider: str, mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The mask each implementation receives from transformers: eager gets the additive float mask
    (0 / finfo(dtype).min, masking_utils.eager_mask), the others the boolean one."""
    if mask is None or provider not in ("eager", "compile"):
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def provider_fn(provider: str):
    """The attention function of a provider: f(module, q, k, v, mask, dropout, scaling) -> (B, L, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward

    from fastbridge.integrations.transformers import fastbridge_attention_forward

    if provider == "fastbridge":
        return lambda m, q, k, v, mask, p, s: fastbridge_attention_forward(m, q, k, v, mask, dropout=p, scaling=s)[0]
    if provider in ("eager", "compile"):
        return lambda m, q, k, v, mask, p, s: eager_attention_forward(m, q, k, v, mask, dropout=p, scaling=s)[0]
    if provider.startswith("sdpa"):
        return lambda m, q, k, v, mask, p, s: sdpa_attention_forward(m, q, k, v, mask, dropout=p, scaling=s)[0]
    raise ValueError(provider)


def sdpa_backend(provider: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}.get(provider)


def hf_inputs(B, Lq, Lk, dtype, device, mask: bool, seed=0):
    """q, k, v as the Q-Former passes them: Linear outputs (B, L, H·D) viewed and transposed; the mask as
    transformers builds it for SDPA-style implementations (bool, True = attend)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda L: torch.randn(B, L, H * D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = (t.view(B, -1, H, D).transpose(1, 2).requires_grad_(True) for t in (mk(Lq), mk(Lk), mk(Lk)))
    attn_mask = None
    if mask:  # an InstructBLIP padding mask as transformers builds it: bool (B, 1, Lq, Lk), query dim broadcast
        keep = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        keep[: B // 2, ..., Lk - Lk // 4:] = False
        attn_mask = keep.to(device).expand(B, 1, Lq, Lk)
    return q, k, v, attn_mask


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    B: int
    Lq: int
    Lk: int
    p: float
    provider: str
    mode: str

    @property
    def mask(self) -> bool:
        return self.Lq == self.Lk  # the self-attention shape carries the instruction padding mask

    @property
    def shape(self) -> dict:
        return {"B": self.B, "H": H, "Lq": self.Lq, "Lk": self.Lk, "D": D, "p": self.p, "mask": self.mask}

    @property
    def id(self) -> str:
        return f"{self.dtype}-B{self.B}-Lq{self.Lq}-Lk{self.Lk}-p{self.p:g}-{self.provider}-{self.mode}"

    @property
    def key(self) -> tuple:
        return (self.device, self.dtype, self.B, self.Lq, self.Lk, self.p)


@dataclass(frozen=True)
class StepCase:
    device: str
    dtype: str
    B: int
    Lk: int
    provider: str
    mode: str = "fwd_bwd"

    @property
    def shape(self) -> dict:
        return {"B": self.B, "Lq": 32, "Lk": self.Lk, "hidden": 768, "layers": 12, "encoder_hidden": 1408}

    @property
    def id(self) -> str:
        return f"{self.dtype}-B{self.B}-Lk{self.Lk}-{self.provider}-{self.mode}"


def _cuda_reason() -> Optional[str]:
    from _harness import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None and os.environ.get("TRITON_INTERPRET", "0") == "1":
        reason = "TRITON_INTERPRET=1 is set: GPU timings are taken without it"
    return reason


def _transformers_reason() -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"transformers is not installed ({e})"
    return None


def pytest_generate_tests(metafunc):
    from _harness import dtype_names

    cfg = metafunc.config
    skip_tf = _transformers_reason()
    if "qf_cuda_case" in metafunc.fixturenames:
        reason = skip_tf or _cuda_reason()
        cases = [Case("cuda", dt, B, Lq, Lk, DROPOUT, p, m) for dt in dtype_names(cfg, "fb_dtypes")
                 for Lq in CUDA_LQ for Lk in CUDA_LK for B in CUDA_B for p in CUDA_PROVIDERS for m in MODES]
        metafunc.parametrize("qf_cuda_case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=reason)]
                                                           if reason else []) for c in cases])
    if "qf_cpu_case" in metafunc.fixturenames:
        cases = [Case("cpu", dt, B, Lq, Lk, p, prov, m) for dt in dtype_names(cfg, "fb_cpu_dtypes")
                 for (B, Lq, Lk, p) in CPU_SHAPES for prov in CPU_PROVIDERS for m in MODES]
        metafunc.parametrize("qf_cpu_case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=skip_tf)]
                                                          if skip_tf else []) for c in cases])
    if "step_cuda_case" in metafunc.fixturenames:
        reason = skip_tf or _cuda_reason()
        dts = [d for d in dtype_names(cfg, "fb_dtypes")] + ([] if "fp32" in dtype_names(cfg, "fb_dtypes") else ["fp32"])
        cases = [StepCase("cuda", dt, B, Lk, p) for dt in dts for Lk in STEP_LK for B in STEP_B for p in STEP_PROVIDERS]
        metafunc.parametrize("step_cuda_case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=reason)]
                                                             if reason else []) for c in cases])
    if "step_cpu_case" in metafunc.fixturenames:
        cases = [StepCase("cpu", "fp32", STEP_CPU["B"], STEP_CPU["Lk"], p) for p in STEP_PROVIDERS]
        metafunc.parametrize("step_cpu_case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=skip_tf)]
                                                            if skip_tf else []) for c in cases])


# ------------------------------------------------------------------------------------------- op runs
_CACHE: dict = {}


def _compiled():
    if "compiled" not in _CACHE:
        _CACHE["compiled"] = torch.compile(provider_fn("eager"), dynamic=False)
    return _CACHE["compiled"]


def _run_op(fb_bench, c: Case) -> None:
    import fastbridge
    from _harness import DTYPES

    if _CACHE.get("key") != c.key:
        _CACHE.clear()
        torch._dynamo.reset()
        gc.collect()
        if c.device == "cuda":
            torch.cuda.empty_cache()
        _CACHE["key"] = c.key
    dtype = DTYPES[c.dtype]
    module = _AttnModule().train()
    q, k, v, mask = hf_inputs(c.B, c.Lq, c.Lk, dtype, c.device, c.mask)
    mask = mask_for(c.provider, mask, dtype)
    scaling = D ** -0.5
    fn = _compiled() if c.provider == "compile" else provider_fn(c.provider)
    backend = sdpa_backend(c.provider)
    e = ELEMENT_BYTES[c.dtype]

    def call():
        return fn(module, q, k, v, mask, c.p, scaling)

    import contextlib

    ctx = contextlib.ExitStack()
    if backend is not None:
        from torch.nn.attention import sdpa_kernel

        ctx.enter_context(sdpa_kernel([backend]))
    ctx.enter_context(fastbridge.use_backend("kernel" if c.provider == "fastbridge" else "reference"))
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except (RuntimeError, torch.OutOfMemoryError) as err:  # a forced SDPA backend refusing the inputs, OOM
            if backend is None and not isinstance(err, torch.OutOfMemoryError):
                raise
            pytest.skip(f"{c.provider}: {str(err).splitlines()[0][:200]}")
        fb_bench.run(op=OP, provider=c.provider, mode=c.mode, dtype=c.dtype, shape=c.shape, fn=call,
                     device=c.device, flops=model_flops(c.B, c.Lq, c.Lk, c.mode),
                     nbytes=min_bytes(c.B, c.Lq, c.Lk, c.mode, e))


def test_qformer_attention_cuda(fb_bench, qf_cuda_case):
    _run_op(fb_bench, qf_cuda_case)


def test_qformer_attention_cpu(fb_bench, qf_cpu_case):
    _run_op(fb_bench, qf_cpu_case)


# ----------------------------------------------------------------------------------- training step
def build_qformer(c: StepCase):
    import transformers

    import fastbridge
    from _harness import DTYPES

    torch.manual_seed(0)
    attn = "eager" if c.provider == "hf-eager" else "sdpa"
    cfg = transformers.Blip2QFormerConfig(encoder_hidden_size=1408)  # BLIP-2's Q-Former (its defaults)
    cfg._attn_implementation = attn
    model = transformers.Blip2QFormerModel(cfg).to(device=c.device, dtype=DTYPES[c.dtype]).train()
    if c.provider == "fastbridge":
        fastbridge.patch(model)
        assert model.config._attn_implementation == "fastbridge", "the patch did not switch the Q-Former"
    query_tokens = torch.nn.Parameter(torch.randn(1, 32, 768, device=c.device, dtype=DTYPES[c.dtype]) * 0.02)
    feats = torch.randn(c.B, c.Lk, 1408, device=c.device, dtype=DTYPES[c.dtype])
    return model, query_tokens, feats


def _run_step(fb_bench, c: StepCase) -> None:
    import fastbridge

    _CACHE.clear()
    gc.collect()
    if c.device == "cuda":
        torch.cuda.empty_cache()
    try:
        model, query_tokens, feats = build_qformer(c)
    except torch.OutOfMemoryError as err:
        pytest.skip(f"out of memory building the model: {err}")

    def step():
        out = model(query_embeds=query_tokens.expand(feats.shape[0], -1, -1), encoder_hidden_states=feats)
        return out.last_hidden_state

    backend = "kernel" if c.provider == "fastbridge" and c.device == "cuda" else "auto"
    with fastbridge.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            step()
        except torch.OutOfMemoryError as err:
            pytest.skip(f"out of memory: {err}")
        n = 2 * c.B * (32 * 768 * 3072 * 2 * 12 + 32 * 768 * 768 * 4 * 12 + c.Lk * 1408 * 768 * 2 * 6
                       + 32 * 768 * 768 * 2 * 6)  # matmul FLOPs of one forward (+ attention)
        n += 4 * c.B * 12 * 32 * (32 * 12 + c.Lk * 6) * 64
        fb_bench.run(op=OP_STEP if c.device == "cuda" else OP_STEP_CPU, provider=c.provider, mode=c.mode,
                     dtype=c.dtype, shape=c.shape, fn=step, device=c.device, flops=3 * n)
    del model
    _CACHE.clear()


def test_qformer_train_step_cuda(fb_bench, step_cuda_case):
    _run_step(fb_bench, step_cuda_case)


def test_qformer_train_step_cpu(fb_bench, step_cpu_case):
    _run_step(fb_bench, step_cpu_case)


def test_providers_agree_cpu():
    """Guard against benchmarking the wrong thing: every CPU provider computes the same attention.

    Not a benchmark: runs under plain ``pytest benchmarks/``, skipped by --benchmark-only."""
    pytest.importorskip("transformers")
    import fastbridge

    module = _AttnModule().eval()
    q, k, v, mask = hf_inputs(2, 32, 96, torch.float32, "cpu", mask=True)
    outs = {}
    for p in CPU_PROVIDERS:
        with fastbridge.use_backend("kernel" if p == "fastbridge" else "reference"):
            outs[p] = provider_fn(p)(module, q, k, v, mask_for(p, mask, q.dtype), 0.0, D ** -0.5)
    for p in CPU_PROVIDERS:
        torch.testing.assert_close(outs[p], outs["eager"], rtol=1e-4, atol=1e-5, msg=f"{p} disagrees with eager")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(print_floors())
