"""The mixed-precision policy (fastbridge/ops/_autocast.py): under torch.autocast every fused op runs in the
dtype eager PyTorch would use -- the autocast dtype for its matmuls -- whatever dtype its inputs arrive in,
and what eager keeps in fp32 (an adapter's residual stream) stays fp32. Checked by recording the dtype that
reaches each op's kernel or reference, and against the eager composition under the same autocast.

CPU autocast in fp16: the Triton interpreter computes fp16 right (its bf16 dot is wrong), the Q-Former's
C++ kernel runs fp16; bf16 autocast runs on CUDA where present.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import fastbridge
from fastbridge import reference as ref

from conftest import HAS_CUDA, assert_close

pytestmark = pytest.mark.filterwarnings("ignore::fastbridge.FastbridgeFallbackWarning")

CASES = [("cpu", torch.float16)] + ([("cuda", torch.bfloat16), ("cuda", torch.float16)] if HAS_CUDA else [])


def _module(name):
    return sys.modules[f"fastbridge.ops.{name}"]


def _spy(monkeypatch, mod, names):
    seen = []
    for n in names:
        target = mod.ref if n.startswith("ref.") else mod
        attr = n.split(".")[-1]
        real = getattr(target, attr)

        def spy(*a, _real=real, **kw):
            seen.append(a[0].dtype)
            return _real(*a, **kw)

        monkeypatch.setattr(target, attr, spy)
    return seen


@pytest.mark.parametrize("device,amp", CASES)
def test_gated_attention_runs_in_the_autocast_dtype(monkeypatch, device, amp):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, P, D = 2, 4, 2, 9, 3, 16

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q = t(B, H, L, D)                         # fp32: RoPE's fp32 cos / sin promoted it
    k, v = t(B, Hkv, L, D), t(B, Hkv, L, D, dtype=amp)  # v straight from a projection under autocast
    pk, pv, gate = t(1, Hkv, P, D), t(1, Hkv, P, D), t(1)
    seen = _spy(monkeypatch, _module("gated_attention"), ["ref.gated_attention", "_gated_attention_op"])
    with torch.autocast(device, dtype=amp):
        out = fastbridge.ops.gated_attention(q, k, v, pk, pv, gate, gate_fn="identity")
    assert seen == [amp] and out.dtype == amp
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == amp and gate.grad is not None
    want = ref.gated_attention(*(x.detach().to(amp).double() for x in (q, k, v, pk, pv)), gate.detach().double(),
                               gate_fn="identity")
    assert_close(out, want, amp, "gated_attention under autocast")


@pytest.mark.parametrize("device,amp", CASES)
def test_adapter_block_keeps_the_fp32_residual(monkeypatch, device, amp):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 24, generator=g).to(device).requires_grad_()
    wd, wu = (torch.randn(8, 24, generator=g) * 0.2).to(device), (torch.randn(24, 8, generator=g) * 0.2).to(device)
    bd, bu, lw = torch.zeros(8, device=device), torch.zeros(24, device=device), torch.ones(24, device=device)
    seen = _spy(monkeypatch, _module("adapter_block"), ["ref.adapter_block", "_adapter_block_op"])
    with torch.autocast(device, dtype=amp):
        y = fastbridge.ops.adapter_block(x, wd, bd, wu, bu, ln_weight=lw, scale=0.5)
        # eager under the same autocast: LayerNorm in fp32, the linears in the autocast dtype, x + update in fp32
        h = F.layer_norm(x, (24,), lw)
        eager = x + 0.5 * F.linear(F.gelu(F.linear(h, wd, bd)), wu, bu)
    assert seen and all(d == amp for d in seen), seen
    assert y.dtype == eager.dtype == torch.float32
    # the residual is added unrounded: y - x is the update in the autocast dtype, not x rounded to it
    assert_close(y - x, eager - x, amp, "adapter update under autocast")
    y.sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("device,amp", CASES)
def test_qformer_cross_attention_runs_in_the_autocast_dtype(monkeypatch, device, amp):
    from fastbridge.ops.qformer_cross_attention import ensure_loaded

    ensure_loaded()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 5, 16, generator=g).to(device)
    k = torch.randn(2, 2, 11, 16, generator=g).to(device=device, dtype=amp)
    v = torch.randn(2, 2, 11, 16, generator=g).to(device)
    seen = []
    real = torch.ops.fastbridge.qformer_attn_fwd

    class _Ops:  # torch.ops.fastbridge is read-only: wrap the namespace the module calls through
        def __getattr__(self, name):
            if name == "qformer_attn_fwd":
                def fwd(q_, *a):
                    seen.append(q_.dtype)
                    return real(q_, *a)
                return fwd
            return getattr(torch.ops.fastbridge, name)

    mod = _module("qformer_cross_attention")
    monkeypatch.setattr(mod.torch, "ops", type("O", (), {"fastbridge": _Ops(), "__getattr__": lambda s, n: getattr(torch.ops, n)})())
    with torch.autocast(device, dtype=amp):
        out = fastbridge.ops.qformer_cross_attention(q, k, v)
        want = F.scaled_dot_product_attention(q, k, v)  # what HF's sdpa attention gives under autocast
    monkeypatch.undo()
    assert seen == [amp] and out.dtype == want.dtype == amp
    assert_close(out, want, amp, "qformer_cross_attention under autocast")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_integrations_under_autocast_match_eager():
    """A patched BLIP-2 (Q-Former op) and a ViT with fastbridge adapters (adapter op) under fp16 CPU autocast:
    loss / outputs as the unpatched models under the same autocast."""
    transformers = pytest.importorskip("transformers")
    from test_qformer_integration import blip2

    model, inputs = blip2("cpu")
    model.train()
    with torch.autocast("cpu", dtype=torch.float16):
        want = model(**inputs).loss
        fastbridge.patch(model)
        try:
            got = model(**inputs).loss
        finally:
            fastbridge.unpatch(model)
    assert_close(got.float(), want.float(), torch.float16, "BLIP-2 loss under autocast")

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, image_size=32, patch_size=8)).eval()
    fastbridge.add_adapters(vit, r=8)
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if "adapter" in n:
                p.normal_(0, 0.2)  # the zero-init up-projection would hide the adapter
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
        fused = vit(pixel_values=px).last_hidden_state
        fastbridge.unpatch(vit)  # the adapters' eager composition
        eager = vit(pixel_values=px).last_hidden_state
    assert fused.dtype == eager.dtype
    assert_close(fused.float(), eager.float(), torch.float16, "ViT + adapters under autocast")


@pytest.mark.parametrize("device,amp", CASES)
def test_gated_cross_attention_runs_in_the_autocast_dtype(monkeypatch, device, amp):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 16, generator=g).to(device)                     # fp32 (a norm's fp32 output)
    k = torch.randn(2, 2, 14, 16, generator=g).to(device=device, dtype=amp)  # from a projection under autocast
    v = torch.randn(2, 2, 14, 16, generator=g).to(device=device, dtype=amp)
    vis = torch.rand(2, 5, 2, generator=g).to(device) > 0.3
    seen = _spy(monkeypatch, _module("gated_cross_attention"), ["ref.gated_cross_attention",
                                                                "_gated_cross_attention_op"])
    with torch.autocast(device, dtype=amp):
        out = fastbridge.ops.gated_cross_attention(q, k, v, vis, segment_len=7)
    assert seen == [amp] and out.dtype == amp
    want = ref.gated_cross_attention(q.to(amp).double(), k.double(), v.double(), vis, segment_len=7)
    assert_close(out, want, amp, "gated_cross_attention under autocast")
