"""Gated-attention scheduling (kernel review, item 9): pack-GQA decode and heaviest-first causal order, against the
float64 reference in the interpreter, every gradient; which launches pack."""
from __future__ import annotations

import pytest
import torch

from fastbridge.kernels import gated_attention as K

from conftest import assert_close, kernel_cases, needs_kernels

import test_gated_attention as T

# (B, H, Hkv, Lq, Lk, P, D, options)
PACK_CASES = [
    # group 4 x Lq 9 = 36 rows: one 64-row packed tile (the sm_90 / interpreter configuration), long cache: split-K
    pytest.param(1, 8, 2, 9, 700, 3, 32, dict(kpm="partial"), id="pack-36-rows-split"),
    # group 3 x Lq 5 = 15 rows in a 16-row tile, ragged group, per-sample prompt, no split
    pytest.param(2, 6, 2, 5, 40, 4, 16, dict(per_sample=True), id="pack-15-rows"),
    # group 8, Lq 1, non-causal, per-head gate
    pytest.param(1, 8, 1, 1, 300, 2, 64, dict(causal=False, kpm=True), id="pack-mqa-decode"),
]


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases())
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,P,D,opts", PACK_CASES)
def test_packed_decode_matches_float64(device, dtype, B, H, Hkv, Lq, Lk, P, D, opts):
    assert K.pack_gqa(Lq, H // Hkv, D)
    t, kw = T.make_inputs(B, H, Hkv, Lq, Lk, P, D, opts, dtype, device)
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    out, grads = T.run(t, kw, dout, "kernel")
    out64, g64 = T.reference64(t, kw, dout)
    assert_close(out, out64, dtype, "out")
    for n in T.NAMES:
        assert_close(grads[n], g64[n], dtype, f"d{n}")


def test_pack_gqa_selection():
    assert K.pack_gqa(1, 4, 128) and K.pack_gqa(1, 8, 256)
    assert not K.pack_gqa(1, 1, 128)  # MHA: nothing to pack
    assert not K.pack_gqa(17, 4, 128)  # not a decode step
    assert K.pack_gqa(16, 4, 128, 90)  # 64 rows: the sm_90 64-row tile
    assert not K.pack_gqa(16, 4, 128, 80)  # sm_80's 32-row tile at D = 128 cannot hold them
    assert K.pack_gqa(8, 4, 128, 80)


def test_packed_launch_grid(monkeypatch):
    """The forward launches one program per KV head (B·Hkv), with PACK set, for a decode step."""
    calls = []
    for fn in (K._gated_attn_fwd_kernel, K._gated_attn_fwd_split_kernel, K._gated_attn_fwd_combine_kernel):
        monkeypatch.setattr(fn, "run", lambda *a, grid, warmup, _n=fn.__name__, **kw: calls.append((_n, grid, kw)),
                            raising=False)
    B, H, Hkv, D = 3, 8, 2, 64
    q = torch.zeros(B, H, 1, D)
    k = torch.zeros(B, Hkv, 50, D)
    pk = torch.zeros(1, Hkv, 2, D)
    K.gated_attention_forward(q, k, k, pk, pk, torch.zeros(H), True, 0.125, None)
    (name, grid, kw), = calls
    assert name == "_gated_attn_fwd_kernel" and tuple(grid) == (1, B * Hkv) and kw["PACK"] and kw["BLOCK_M"] == 16
    calls.clear()
    K.gated_attention_forward(torch.zeros(B, H, 1, D), torch.zeros(B, H, 50, D), torch.zeros(B, H, 50, D),
                              torch.zeros(1, H, 2, D), torch.zeros(1, H, 2, D), torch.zeros(H), True, 0.125, None)
    (name, grid, kw), = calls
    assert tuple(grid) == (1, B * H) and not kw["PACK"]


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_causal_heaviest_first_order_is_still_exact(device, dtype):
    """Several query tiles per head (reversed program order in forward and dQ), ragged last tile."""
    t, kw = T.make_inputs(1, 2, 1, 200, 200, 3, 16, dict(kpm="partial"), dtype, device)
    dout = torch.randn(1, 2, 200, 16, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    out, grads = T.run(t, kw, dout, "kernel")
    out64, g64 = T.reference64(t, kw, dout)
    assert_close(out, out64, dtype, "out")
    for n in T.NAMES:
        assert_close(grads[n], g64[n], dtype, f"d{n}")
