"""End to end: one training step of a PEFT LLaMA-Adapter model, fastbridge-patched vs unpatched.

Model: transformers ``LlamaForCausalLM`` with LLaMA-7B layer shapes (hidden 4096, 32 heads, 32 KV heads,
FFN 11008, vocab 32000, rms_norm_eps 1e-5, untied head), ``E2E["layers"]`` layers (default 4; override with
FASTBRIDGE_BENCH_E2E_LAYERS), random init on the device, no download; attn_implementation "sdpa" (HF's
default) or "eager"; wrapped by ``peft.get_peft_model(model, AdaptionPromptConfig(adapter_len=10,
adapter_layers=<all layers>, task_type="CAUSAL_LM"))`` -- the base model frozen, the prompts and gates trained.
Step: ``model(input_ids, attention_mask=ones, labels=input_ids).loss`` (fwd) and its ``.backward()``
(fwd_bwd), B·L = 16k tokens, L in E2E["L"] (benchmarks/floors.py); model in train mode.

Providers
  CUDA  peft        the PEFT model as is (PEFT's AdaptedAttention.forward around LlamaAttention).
        fastbridge  the same model after ``fastbridge.patch(model)`` (kernel backend). Measured only when the
                    patch really replaced every PEFT AdaptedAttention (``model.fastbridge_report``) and a
                    forward takes the fused path (fastbridge.integrations.peft.stats, no
                    FastbridgeFallbackWarning); otherwise skipped with the reason -- an unpatched model is never
                    recorded under the fastbridge label.
  CPU   "llama_adapter_e2e_cpu_smoke": the same code path on a tiny config (hidden 64, 4 heads, 2 layers,
        vocab 256, B = 2, L = 64; E2E_CPU) with providers peft and fastbridge-reference (patched, reference
        backend). A smoke test that the real PEFT model builds, patches and trains -- not a measurement.
Records: op "llama_adapter_e2e" (CUDA) / "llama_adapter_e2e_cpu_smoke" (CPU), modes fwd and fwd_bwd, ``tflops``
from floors.e2e_flops (model FLOPs counted once, PEFT's recomputation not credited), ``peak_mb`` (weights
included), ``saved_mb`` (activations kept for backward), and ``tokens_per_s`` = B·L ÷ p50 time.
CUDA timings use at least E2E_MIN_REP_MS of repetitions (a step takes ~0.1-0.3 s).
"""
from __future__ import annotations

import gc
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import floors as F
from _harness import DTYPES, cuda_unavailable_reason, dtype_names

import fastbridge
from fastbridge import _backend
from fastbridge.patch import is_patched

OP = "llama_adapter_e2e"
OP_SMOKE = "llama_adapter_e2e_cpu_smoke"
CUDA_PROVIDERS = ("peft", "fastbridge")
CPU_PROVIDERS = ("peft", "fastbridge-reference")
MODES = ("fwd", "fwd_bwd")
E2E_MIN_REP_MS = 1000.0
LAYERS_ENV = "FASTBRIDGE_BENCH_E2E_LAYERS"


def _peft_unavailable() -> Optional[str]:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import problem is a skip reason
        return f"the end-to-end benchmark needs transformers and peft (AdaptionPrompt): {type(e).__name__}: {e}"
    return None


@dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    attn: str
    step: F.LlamaStepShape  # the model and batch shape (benchmarks/floors.py: FLOPs and predictions)
    provider: str
    mode: str

    @property
    def op(self) -> str:
        return OP if self.device == "cuda" else OP_SMOKE

    @property
    def id(self) -> str:
        tag = "" if self.device == "cuda" else "smoke-"
        s = self.step
        return f"{tag}{self.dtype}-{self.attn}-layers{s.layers}-B{s.b}-L{s.l}-{self.provider}-{self.mode}"

    @property
    def model_key(self) -> tuple:
        s = self.step
        return (self.device, self.dtype, self.attn, s.layers, s.d, s.h, s.hkv, s.f, s.v, s.p)

    @property
    def shape(self) -> dict:
        s = self.step
        return {"attn": self.attn, "layers": s.layers, "d": s.d, "H": s.h, "Hkv": s.hkv, "F": s.f, "V": s.v,
                "P": s.p, "B": s.b, "L": s.l}


def _layers() -> int:
    raw = os.environ.get(LAYERS_ENV, "").strip()
    if not raw:
        return F.E2E["layers"]
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"{LAYERS_ENV}: expected a positive integer, got {raw!r}")
    return int(raw)


def _cuda_cases(dtypes, quick: bool) -> list[Case]:
    attns = F.E2E_QUICK["attn"] if quick else F.E2E["attn"]
    # attn-major, then provider, then L: one model per attn, patched once (no patch / unpatch flip-flop).
    return [Case("cuda", dt, a, s, prov, m)
            for dt in dtypes for a in attns for prov in CUDA_PROVIDERS
            for s in F.e2e_cuda_shapes(quick, _layers()) for m in MODES]


def _cpu_cases(dtypes) -> list[Case]:
    c = F.E2E_CPU
    step = F.LlamaStepShape(**{k: v for k, v in c.items() if k != "attn"})
    return [Case("cpu", dt, a, step, prov, m) for dt in dtypes for a in c["attn"] for prov in CPU_PROVIDERS
            for m in MODES]


def _skip_reason(c: Case) -> Optional[str]:
    reason = _peft_unavailable()
    if reason is None and c.device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is None and c.provider == "fastbridge":
            if _backend.triton_interpret():
                reason = "TRITON_INTERPRET=1: the kernels would run in the Triton interpreter, not on the GPU"
            else:
                reason = _backend.triton_unavailable_reason(torch.device("cuda"))
    return reason


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    grids = {"e2e_cuda_case": lambda: _cuda_cases(dtype_names(cfg, "fb_dtypes"), cfg.getoption("fb_quick")),
             "e2e_cpu_case": lambda: _cpu_cases(dtype_names(cfg, "fb_cpu_dtypes"))}
    for name, cases in grids.items():
        if name in metafunc.fixturenames:
            params = []
            for c in cases():
                reason = _skip_reason(c)
                params.append(pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=reason)] if reason else []))
            metafunc.parametrize(name, params)


# ------------------------------------------------------------------------------------ the model
def build_peft_llama(c: Case):
    """LlamaForCausalLM (random init, on c.device, c.dtype) wrapped by PEFT AdaptionPrompt on every layer."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    s = c.step
    cfg = LlamaConfig(hidden_size=s.d, num_attention_heads=s.h, num_key_value_heads=s.hkv, intermediate_size=s.f,
                      num_hidden_layers=s.layers, vocab_size=s.v, max_position_embeddings=max(4096, s.l),
                      rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0, use_cache=False,
                      attn_implementation=c.attn)
    torch.manual_seed(0)
    with torch.device(c.device):
        model = LlamaForCausalLM(cfg)
    model.to(DTYPES[c.dtype])  # before PEFT: the prompts and gates take q_proj's dtype
    if model.config._attn_implementation != c.attn:
        raise RuntimeError(f"asked for attn_implementation={c.attn!r}, transformers chose "
                           f"{model.config._attn_implementation!r}")
    pm = get_peft_model(model, adaption_prompt_config(c))
    pm.train()
    return pm


def adaption_prompt_config(c: Case):
    """PEFT's LLaMA-Adapter config: a P-token prompt and a zero-init gate in every layer."""
    from peft import AdaptionPromptConfig

    return AdaptionPromptConfig(adapter_len=c.step.p, adapter_layers=c.step.layers, task_type="CAUSAL_LM")


def adapted_modules(model) -> list[str]:
    """Names of PEFT's adapted attention modules (AdaptedAttention and its siblings)."""
    from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention

    return [n for n, m in model.named_modules() if isinstance(m, _BaseAdaptedAttention)]


def step_inputs(c: Case, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, c.step.v, (c.step.b, c.step.l), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _peft_integration_stats() -> Optional[Counter]:
    mod = sys.modules.get("fastbridge.integrations.peft")
    stats = getattr(mod, "stats", None)
    return stats if isinstance(stats, Counter) else None


def patch_problem(model, inputs: dict) -> Optional[str]:
    """fastbridge.patch(model), then None if every PEFT adapted attention is patched and a forward on
    ``inputs`` takes the fused path; else why not."""
    adapted = adapted_modules(model)
    if not adapted:
        return "the model has no PEFT AdaptedAttention module to patch"
    fastbridge.patch(model)
    rep = getattr(model, "fastbridge_report", None)
    if rep is None:
        return "fastbridge.patch left no fastbridge_report on the model"
    done = {**rep.patched, **rep.already}
    missing = [n for n in adapted if n not in done]
    if missing:
        return (f"fastbridge.patch replaced {len(adapted) - len(missing)} of the {len(adapted)} PEFT AdaptedAttention "
                f"modules ({rep}); the PEFT AdaptionPrompt integration (fastbridge/integrations/peft.py) is missing or "
                f"does not match them")
    stats = _peft_integration_stats()
    before = Counter(stats) if stats is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", _backend.FastbridgeFallbackWarning)
        with torch.no_grad():
            model(**inputs)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, _backend.FastbridgeFallbackWarning)]
    if stats is not None:
        delta = Counter(stats)
        delta.subtract(before)
        fallbacks += [f"{k} x{n}" for k, n in delta.items() if n > 0 and k != "fused"]
        if delta.get("fused", 0) < len(adapted) and not fallbacks:
            fallbacks.append(f"{delta.get('fused', 0)} fused calls for {len(adapted)} adapted layers")
    if fallbacks:
        return "the patched model runs PEFT's original forward instead of the fused one: " + "; ".join(fallbacks)
    return None


# --------------------------------------------------------------------------------------- running
_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _release_cache():
    yield
    _drop_cache()


def _drop_cache() -> None:
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model(c: Case):
    if _CACHE.get("key") != c.model_key:
        _drop_cache()
        _CACHE.update(key=c.model_key, model=build_peft_llama(c), checked={})
    return _CACHE["model"]


def _inputs(c: Case) -> dict:
    if _CACHE.get("inputs_key") != (c.step.b, c.step.l):
        _CACHE.pop("inputs", None)
        _CACHE.update(inputs_key=(c.step.b, c.step.l), inputs=step_inputs(c, c.device))
    return _CACHE["inputs"]


def _prepare(c: Case):
    """(model, inputs) in the state the provider needs, or pytest.skip with the reason."""
    model = _model(c)
    inputs = _inputs(c)
    if c.provider == "peft":
        if any(is_patched(m) for m in model.modules()):
            fastbridge.unpatch(model)
        if any(is_patched(m) for m in model.modules()):
            pytest.skip("fastbridge.unpatch left patched modules: the unpatched baseline cannot be measured")
        return model, inputs
    key = (c.step.b, c.step.l)
    if key not in _CACHE["checked"]:
        with fastbridge.use_backend(_backend_of(c)):
            _CACHE["checked"][key] = patch_problem(model, inputs)
    if _CACHE["checked"][key] is not None:
        pytest.skip(f"{c.provider}: {_CACHE['checked'][key]} -- not measuring PEFT's own forward under this label")
    return model, inputs


def _backend_of(c: Case) -> str:
    return "reference" if c.provider == "fastbridge-reference" else ("kernel" if c.provider == "fastbridge" else "auto")


def _run(fb_bench, c: Case) -> None:
    model, inputs = _prepare(c)
    if c.device == "cuda":
        fb_bench.rep_ms = max(fb_bench.rep_ms, E2E_MIN_REP_MS)

    def step():
        return model(**inputs).loss

    rec, oom = None, None
    try:
        with fastbridge.use_backend(_backend_of(c)):
            rec = fb_bench.run(op=c.op, provider=c.provider, mode=c.mode, dtype=c.dtype, shape=c.shape, fn=step,
                               device=c.device, flops=F.e2e_flops(c.step, c.mode))
    except torch.OutOfMemoryError as e:
        oom = str(e).splitlines()[0]
    if oom is not None:
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{c.id}: out of GPU memory: {oom}")
    if rec is not None:
        tps = c.step.b * c.step.l / (rec.ms["p50"] / 1e3)
        rec.extra["tokens_per_s"] = round(tps, 1)
        fb_bench.benchmark.extra_info["tokens_per_s"] = round(tps, 1)
        if c.provider != "peft":
            rep = model.fastbridge_report
            rec.extra["patched_modules"] = len(rep.patched) + len(rep.already)


def test_llama_adapter_e2e_cuda(fb_bench, e2e_cuda_case):
    _run(fb_bench, e2e_cuda_case)


def test_llama_adapter_e2e_smoke_cpu(fb_bench, e2e_cpu_case):
    _run(fb_bench, e2e_cpu_case)


# --------------------------------------------------------------- guard (not a benchmark; plain pytest)
def test_e2e_smoke_model_is_peft_cpu():
    """The CPU smoke model is the real thing: a PeftModel whose every layer's attention is PEFT's
    AdaptedAttention, only the prompts and gates train; and -- when the patch takes the fused path --
    patched and unpatched agree on the loss and the prompt gradients (gates non-zero)."""
    reason = _peft_unavailable()
    if reason:
        pytest.skip(reason)
    from peft import PeftModel

    c = _cpu_cases(["fp32"])[0]
    model = build_peft_llama(c)
    assert isinstance(model, PeftModel)
    assert len(adapted_modules(model)) == c.step.layers
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adaption_prompt", "adaption_gate"}, trainable
    for n, p in model.named_parameters():
        if n.endswith("adaption_gate"):
            p.data.fill_(0.5)
    inputs = step_inputs(c, "cpu")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    with fastbridge.use_backend("reference"):
        problem = patch_problem(model, inputs)
        if problem is not None:
            fastbridge.unpatch(model)
            pytest.skip(f"patched comparison skipped: {problem}")
        loss, grads = loss_and_grads()
    fastbridge.unpatch(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-5, msg=f"d{n}")
