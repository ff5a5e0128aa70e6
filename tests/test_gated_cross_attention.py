"""fastbridge.ops.gated_cross_attention: fused kernels against the float64 reference, every gradient."""
from __future__ import annotations

import pytest
import torch

import fastbridge
from fastbridge import reference as R
from fastbridge.ops import gated_cross_attention

from conftest import assert_close, kernel_cases, kernel_devices, needs_kernels

# (B, H, Hkv, Lq, S, segment_len, D, options). Kernel tiles (H100 configs, also the interpreter's): forward
# 16 / 64 / 128 query rows by 16..64 keys, backward 32..64 rows by 16..64 keys. Keys per block shrink to the
# segment (at least 16), so segment_len 7 / 37 / 70 are not multiples of any key block.
CASES = [
    pytest.param(2, 4, 2, 37, 3, 7, 32, dict(vis="random", gate=(4,)), id="gqa-seg7-random"),
    pytest.param(2, 3, 1, 19, 3, 37, 16, dict(vis="mllama", gate=()), id="mqa-seg37-mllama-scalar-gate"),
    pytest.param(2, 2, 2, 21, 2, 70, 16, dict(vis="idefics", gate=(1,), gate_fn="identity"),
                 id="mha-seg70-idefics-identity"),
    pytest.param(2, 2, 1, 20, 2, 70, 16, dict(vis="random", gate=(2,)), id="seg70-unmasked-blocks-with-visibility"),
    pytest.param(3, 4, 2, 9, 4, 5, 16, dict(vis="random", gate=None), id="no-gate-sample-sees-nothing"),
    pytest.param(1, 2, 1, 131, 2, 37, 16, dict(vis="mllama", gate=(2,)), id="Lq131-two-fwd-tiles"),
    pytest.param(2, 2, 1, 13, 1, 83, 16, dict(vis=None, gate=()), id="no-visibility"),
    pytest.param(1, 2, 2, 11, 3, 9, 48, dict(vis="random", gate=(2,)), id="d48-non-pow2"),
    pytest.param(1, 2, 1, 17, 2, 19, 128, dict(vis="mllama", gate=None), id="d128"),
    pytest.param(1, 2, 1, 3, 2, 11, 32, dict(vis="random", gate=(), infer_seg=True), id="decode-Lq3-seg-inferred"),
    # Decode with many key blocks at small B·H: the split-K path (split + combine kernels; the backward reads
    # the combined lse).
    pytest.param(1, 2, 1, 3, 12, 7, 16, dict(vis="random", gate=(2,)), id="decode-split-seg7"),
    pytest.param(1, 4, 2, 5, 9, 40, 16, dict(vis="mllama", gate=()), id="decode-split-Lq5-mllama"),
    pytest.param(1, 2, 2, 1, 1, 600, 16, dict(vis=None, gate=None), id="decode-split-no-visibility"),
]


def test_decode_cases_take_the_split_path():
    from fastbridge.kernels.gated_cross_attention import decode_splits, fwd_config, key_block

    for B, H, Lq, S, seg, D in ((1, 2, 3, 12, 7, 16), (1, 4, 5, 9, 40, 16), (1, 2, 1, 1, 600, 16)):
        bm, bn, _, _ = fwd_config(D, Lq, 90)
        bn = key_block(bn, seg)
        assert decode_splits(B * H, Lq, S * -(-seg // bn), bm, torch.device("cpu")) > 1
    bm, bn, _, _ = fwd_config(128, 2048, 90)  # a long prefill never splits
    assert decode_splits(32, 2048, 8 * 26, bm, torch.device("cpu")) == 1


def make_visibility(kind, B, Lq, S, g):
    """bool (B, Lq, S) or None, every pattern with rows that see nothing (and, for B > 2, a whole sample)."""
    if kind is None:
        return None
    if kind == "random":
        vis = torch.rand(B, Lq, S, generator=g) > 0.4
        if B > 1:
            vis[0, :, 0] = True                     # a segment every row of sample 0 sees (unmasked blocks)
        vis[B - 1, Lq // 2] = False                 # a row that sees nothing
        if B > 2:
            vis[1] = False                          # a sample that sees nothing (no image)
        return vis
    if kind == "mllama":
        # Text before the first image token sees nothing; then each token sees every tile of the images
        # so far (cross_attention_mask), padding tiles (the last segment of sample 1) never.
        vis = torch.zeros(B, Lq, S, dtype=torch.bool)
        for b in range(B):
            start = 2 + b
            vis[b, start:, :] = True
            if b == 1:
                vis[b, :, S - 1] = False
        return vis
    if kind == "idefics":
        # image_attention_mask: token i sees the last image before it (one image per segment).
        vis = torch.zeros(B, Lq, S, dtype=torch.bool)
        for b in range(B):
            bounds = sorted(torch.randint(1, Lq, (S,), generator=g).tolist())
            for s, lo in enumerate(bounds):
                hi = bounds[s + 1] if s + 1 < S else Lq
                vis[b, lo:hi, s] = True
        return vis
    raise ValueError(kind)


def make_inputs(B, H, Hkv, Lq, S, seg, D, opts, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    Lk = S * seg
    t = dict(q=rnd(B, H, Lq, D), k=rnd(B, Hkv, Lk, D), v=rnd(B, Hkv, Lk, D))
    gate_shape = opts.get("gate", ())
    t["gate"] = None if gate_shape is None else rnd(*gate_shape, scale=0.7)
    vis = make_visibility(opts.get("vis", "random"), B, Lq, S, g)
    kw = dict(visibility=None if vis is None else vis.to(device),
              segment_len=None if opts.get("infer_seg") else seg, gate_fn=opts.get("gate_fn", "tanh"))
    return t, kw


def _names(t):
    return [n for n in ("q", "k", "v", "gate") if t[n] is not None]


def run(t, kw, dout, backend):
    leaves = {n: t[n].detach().clone().requires_grad_(True) for n in _names(t)}
    with fastbridge.use_backend(backend):
        out = gated_cross_attention(leaves["q"], leaves["k"], leaves["v"], kw["visibility"],
                                    segment_len=kw["segment_len"], gate=leaves.get("gate"), gate_fn=kw["gate_fn"])
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return out, dict(zip(leaves, grads))


def reference64(t, kw, dout):
    leaves = {n: t[n].detach().double().cpu().requires_grad_(True) for n in _names(t)}
    vis = None if kw["visibility"] is None else kw["visibility"].cpu()
    out = R.gated_cross_attention(leaves["q"], leaves["k"], leaves["v"], vis, segment_len=kw["segment_len"],
                                  gate=leaves.get("gate"), gate_fn=kw["gate_fn"])
    grads = torch.autograd.grad(out, list(leaves.values()), dout.detach().double().cpu())
    return out, dict(zip(leaves, grads))


def _dout(B, H, Lq, D, dtype, device):
    return torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases())
@pytest.mark.parametrize("B,H,Hkv,Lq,S,seg,D,opts", CASES)
def test_kernel_matches_float64_reference(device, dtype, B, H, Hkv, Lq, S, seg, D, opts):
    t, kw = make_inputs(B, H, Hkv, Lq, S, seg, D, opts, dtype, device)
    dout = _dout(B, H, Lq, D, dtype, device)
    out, grads = run(t, kw, dout, "kernel")
    out64, g64 = reference64(t, kw, dout)
    assert out.dtype == dtype and out.shape == (B, H, Lq, D)
    assert_close(out, out64, dtype, "out")
    for n in grads:
        assert grads[n].shape == t[n].shape and grads[n].dtype == t[n].dtype, n
        assert_close(grads[n], g64[n], dtype, f"d{n}")
    vis = kw["visibility"]
    if vis is not None:  # rows that see nothing: exactly 0 out and exactly 0 dq
        blind = ~vis.any(-1)  # (B, Lq)
        assert blind.any()
        assert out.permute(0, 2, 1, 3)[blind].abs().max() == 0
        assert grads["q"].permute(0, 2, 1, 3)[blind].abs().max() == 0


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_invisible_segments_are_never_read(device, dtype):
    """Skipping, observably: K/V of a segment no query sees are NaN; a kernel that read them (masking
    instead of skipping) would turn 0 · NaN into NaN. dk, dv there are exactly 0."""
    B, H, Hkv, Lq, S, seg, D = 2, 2, 1, 20, 3, 21, 16
    t, kw = make_inputs(B, H, Hkv, Lq, S, seg, D, dict(vis="random", gate=(2,)), dtype, device)
    vis = kw["visibility"]
    vis[:, :, 1] = False  # segment 1: nobody sees it
    clean = {n: (x.clone() if x is not None else None) for n, x in t.items()}
    for n in ("k", "v"):
        t[n][:, :, seg:2 * seg] = float("nan")
    dout = _dout(B, H, Lq, D, dtype, device)
    out, grads = run(t, kw, dout, "kernel")
    out64, g64 = reference64(clean, kw, dout)
    assert_close(out, out64, dtype, "out")
    for n in ("q", "gate"):
        assert_close(grads[n], g64[n], dtype, f"d{n}")
    for n in ("k", "v"):
        assert grads[n][:, :, seg:2 * seg].abs().max() == 0
        assert_close(grads[n], g64[n], dtype, f"d{n}")


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_zero_gate_gives_zero_and_still_trains(device, dtype):
    t, kw = make_inputs(2, 4, 2, 12, 2, 9, 16, dict(vis="mllama", gate=(1,)), dtype, device)
    t["gate"] = torch.zeros(1, dtype=dtype, device=device)
    dout = _dout(2, 4, 12, 16, dtype, device)
    out, grads = run(t, kw, dout, "kernel")
    _, g64 = reference64(t, kw, dout)
    assert out.abs().max() == 0
    assert g64["gate"].abs().min() > 0  # the zero gate gets a gradient (out = 0 says nothing about o)
    assert_close(grads["gate"], g64["gate"], dtype, "dgate")
    for n in ("q", "k", "v"):
        assert grads[n].abs().max() == 0


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_no_visibility_is_plain_attention(device, dtype):
    t, kw = make_inputs(2, 4, 2, 10, 1, 30, 16, dict(vis=None, gate=None), dtype, device)
    with fastbridge.use_backend("kernel"):
        out = gated_cross_attention(t["q"], t["k"], t["v"])
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        t["q"], t["k"].repeat_interleave(2, 1), t["v"].repeat_interleave(2, 1))
    assert_close(out, sdpa, dtype, "out vs SDPA")


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_strided_inputs_hf_layout(device, dtype):
    """q/k/v as transformers produces them: (B, L, H, D) projections viewed as (B, H, L, D)."""
    B, H, Hkv, Lq, S, seg, D = 2, 4, 2, 13, 2, 10, 16
    t, kw = make_inputs(B, H, Hkv, Lq, S, seg, D, dict(vis="mllama", gate=(4,)), dtype, device)
    for n in ("q", "k", "v"):
        t[n] = t[n].transpose(1, 2).contiguous().transpose(1, 2)
        assert not t[n].is_contiguous()
    dout = torch.randn(B, Lq, H, D, dtype=dtype, device=device).transpose(1, 2)
    out, grads = run(t, kw, dout, "kernel")
    out64, g64 = reference64(t, kw, dout)
    assert_close(out, out64, dtype, "out")
    for n in grads:
        assert_close(grads[n], g64[n], dtype, f"d{n}")


@needs_kernels
def test_opcheck():
    device = kernel_devices()[0]
    t, kw = make_inputs(2, 4, 2, 9, 3, 7, 16, dict(vis="random"), torch.float32, device)
    q, k, v = (t[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
    g = torch.tanh(t["gate"].float()).expand(4).contiguous().requires_grad_(True)
    op = torch.ops.fastbridge.gated_cross_attention.default
    torch.library.opcheck(op, (q, k, v, kw["visibility"], 7, g, 0.25))
    torch.library.opcheck(op, (q, k, v, None, 21, None, 0.25))


@needs_kernels
@pytest.mark.parametrize("gate", [True, False])
def test_torch_compile_fullgraph(gate):
    device = kernel_devices()[0]
    t, kw = make_inputs(1, 2, 1, 8, 2, 5, 16, dict(vis="random", gate=(2,) if gate else None), torch.float32,
                        device)
    leaves = [t[n].detach().requires_grad_(True) for n in _names(t)]
    vis = kw["visibility"]

    def f(q, k, v, *g):
        return gated_cross_attention(q, k, v, vis, segment_len=5, gate=g[0] if g else None)

    with fastbridge.use_backend("kernel"):
        eager = f(*leaves)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
        torch.testing.assert_close(a, b)


@needs_kernels
def test_tile_state():
    from fastbridge.kernels.gated_cross_attention import tile_state, tile_state_reference

    device = kernel_devices()[0]
    vis = torch.zeros(1, 5, 3, dtype=torch.bool)
    vis[0, :, 0] = True          # every row: 2 in both tiles (rows past Lq count as seeing)
    vis[0, 1, 1] = True          # one row of tile 0: 1; tile 1: 0
    state, n_tiles = tile_state(vis.to(device), 4)
    assert n_tiles == 2
    assert state.tolist() == [[[2, 1, 0], [2, 0, 0]]]
    g = torch.Generator().manual_seed(0)
    for B, Lq, S, bm in ((2, 37, 3, 16), (3, 70, 40, 32), (1, 9, 1, 64)):  # S past the kernel's 32-column block
        vis = torch.rand(B, Lq, S, generator=g) > 0.3
        vis[0, :, 0] = True
        vis[-1, Lq // 2] = False
        assert torch.equal(tile_state(vis.to(device), bm)[0].cpu(), tile_state_reference(vis, bm))


def test_reference_matches_a_loop():
    """The reference's semantics, checked against a per-row loop over the visible keys (float64)."""
    B, H, Hkv, Lq, S, seg, D = 2, 4, 2, 5, 3, 4, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in
               ((B, H, Lq, D), (B, Hkv, S * seg, D), (B, Hkv, S * seg, D)))
    vis = torch.rand(B, Lq, S, generator=g) > 0.5
    vis[0, 2] = False
    gate = torch.randn(H, generator=g, dtype=torch.float64)
    out = R.gated_cross_attention(q, k, v, vis, segment_len=seg, gate=gate, scale=0.3)
    expect = torch.zeros_like(out)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                keys = [j for j in range(S * seg) if vis[b, i, j // seg]]
                if keys:
                    p = torch.softmax(k[b, h // 2, keys] @ q[b, h, i] * 0.3, 0)
                    expect[b, h, i] = torch.tanh(gate[h]) * (p[:, None] * v[b, h // 2, keys]).sum(0)
    torch.testing.assert_close(out, expect)


def test_reference_backend_matches_float64():
    t, kw = make_inputs(2, 4, 2, 11, 3, 5, 16, dict(vis="random", gate=(4,)), torch.float32, "cpu")
    dout = torch.randn(2, 4, 11, 16)
    out, grads = run(t, kw, dout, "reference")
    out64, g64 = reference64(t, kw, dout)
    assert_close(out, out64, torch.float32, "out")
    for n in grads:
        assert_close(grads[n], g64[n], torch.float32, f"d{n}")
    assert torch.isfinite(grads["q"]).all()


# ---------------------------------------------------------------------------------------- bad input
def _good():
    return make_inputs(2, 4, 2, 5, 3, 7, 16, dict(vis="random", gate=(4,)), torch.float32, "cpu")


def _call(t, kw):
    return gated_cross_attention(t["q"], t["k"], t["v"], kw["visibility"], segment_len=kw["segment_len"],
                                 gate=t["gate"], gate_fn=kw["gate_fn"])


@pytest.mark.parametrize("change,kwchange,arg,fragment", [
    (dict(q=torch.randn(2, 4, 5)), {}, "q", "4-d tensor"),
    (dict(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 21, 0), v=torch.randn(2, 2, 21, 0)), {}, "q",
     "head dim D >= 1"),
    (dict(k=torch.randn(2, 3, 21, 16)), {}, "k", "dividing q's 4 heads"),
    (dict(k=torch.randn(2, 2, 21, 8)), {}, "k", "(B, Hkv, Lk, D) = (2, Hkv, Lk, 16)"),
    (dict(v=torch.randn(2, 2, 20, 16)), {}, "v", "k's shape"),
    (dict(v=torch.randn(2, 2, 21, 16, dtype=torch.float64)), {}, "v", "q's dtype torch.float32"),
    (dict(gate=torch.zeros(3)), {}, "gate", "shape () or (1,) or (4,)"),
    ({}, dict(visibility=torch.ones(2, 5, 3)), "visibility", "a bool tensor"),
    ({}, dict(visibility=torch.ones(2, 4, 3, dtype=torch.bool)), "visibility", "(B, Lq, S) = (2, 5, S)"),
    ({}, dict(segment_len=6), "segment_len", "S * segment_len == Lk (S = 3 segments in visibility, Lk = 21"),
    ({}, dict(segment_len=0), "segment_len", "a positive int"),
    ({}, dict(visibility=torch.ones(2, 5, 4, dtype=torch.bool), segment_len=None), "segment_len",
     "k's 21 keys do not split into visibility's S = 4"),
    ({}, dict(gate_fn="sigmoid"), "gate_fn", "one of ('tanh', 'identity')"),
])
def test_bad_input_names_the_argument(change, kwchange, arg, fragment):
    t, kw = _good()
    t.update(change)
    kw.update(kwchange)
    with pytest.raises(ValueError) as e:
        _call(t, kw)
    assert f"'{arg}'" in str(e.value) and fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), 0.0, True, "0.5", torch.tensor(0.5)])
def test_bad_scale_names_the_argument(scale):
    t, kw = _good()
    with pytest.raises(ValueError, match="'scale' must be None or a positive float"):
        gated_cross_attention(t["q"], t["k"], t["v"], kw["visibility"], segment_len=7, scale=scale)


def test_numpy_scale_works():
    np = pytest.importorskip("numpy")
    t, kw = _good()
    expect = gated_cross_attention(t["q"], t["k"], t["v"], kw["visibility"], segment_len=7, scale=0.3)
    for s in (np.float32(0.3), np.float64(0.3)):
        got = gated_cross_attention(t["q"], t["k"], t["v"], kw["visibility"], segment_len=7, scale=s)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("arch", [80, 89])
def test_pre_hopper_configurations_compute_correctly(arch, monkeypatch):
    """The tiles picked for sm_80 / sm_89 (kernels/gated_cross_attention.py: fwd_config / bwd_config overrides)
    run in the interpreter too: D = 32 (sm_80's 32-key forward tile) and D = 16 (the 32x32 dkdv tile)."""
    from fastbridge.kernels import gated_cross_attention as K

    device = kernel_devices()[0]
    if device != "cpu":
        pytest.skip("the interpreter picks the configurations of the arch it is told; on CUDA the real arch decides")
    monkeypatch.setattr(K, "device_arch", lambda dev: arch)
    assert K.fwd_config(32, 100, 80) == (128, 32, 8, 2) and K.bwd_config(16, 89)["dkdv"] == (32, 32, 4, 2)
    for D in (32, 16):
        t, kw = make_inputs(2, 2, 1, 70, 2, 37, D, dict(vis="random", gate=(2,)), torch.float16, device)
        dout = _dout(2, 2, 70, D, torch.float16, device)
        out, grads = run(t, kw, dout, "kernel")
        out64, g64 = reference64(t, kw, dout)
        assert_close(out, out64, torch.float16, f"out D={D}")
        for n in grads:
            assert_close(grads[n], g64[n], torch.float16, f"d{n} D={D}")
