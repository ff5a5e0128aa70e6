"""fastbridge.ops.qformer_cross_attention: the C++ (CPU) / CUDA kernels against the float64 reference.

Every case runs on fresh random inputs with odd sizes and non-power-of-two lengths, the kernel's
output and its q, k, v gradients compared with fastbridge.reference.qformer_cross_attention evaluated
in float64 on the same (already rounded) inputs. The CPU kernel always runs (the extension is built on
first use; a build failure fails these tests); CUDA cases run where a GPU is present. Outputs are
poisoned (FASTBRIDGE_POISON=1, tests/conftest.py) so an element a kernel forgets fails the comparison.
The additive mask is a constant to the kernels (documented in the op): with requires_grad the op runs
the reference, which is tested here too.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import fastbridge
from fastbridge import _backend
from fastbridge import reference as R
from fastbridge.ops import qformer_cross_attention
from fastbridge.ops.qformer_cross_attention import dropout_keep_mask, ensure_loaded, philox_rng, smem_shortfall

from conftest import HAS_CUDA, TOL, assert_close

qf_module = sys.modules["fastbridge.ops.qformer_cross_attention"]  # the module (the package exports the function)


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ensure_loaded()  # builds the extension on first use (~30-60 s on 2 cores): a failure fails the module


def device_dtype_cases():
    cases = [("cpu", torch.float32), ("cpu", torch.float16), ("cpu", torch.bfloat16)]
    if HAS_CUDA:
        cases += [("cuda", torch.float32), ("cuda", torch.float16), ("cuda", torch.bfloat16)]
    return [pytest.param(d, t, id=f"{d}-{str(t).split('.')[-1]}") for d, t in cases]


# (B, qB, H, Lq, Lk, D, mask kind). Odd / non-power-of-two sizes, Q-Former-like shapes, the query-batch-1
# broadcast (Granite Speech), masks: bool key mask (with a fully masked sample), additive masks broadcast
# in every way HF builds them, -inf rows.
CASES = [
    pytest.param(3, 3, 2, 7, 13, 32, None, id="small-nomask"),
    pytest.param(2, 2, 3, 33, 257, 64, "bool", id="qformer-257-bool"),
    pytest.param(5, 1, 2, 32, 67, 64, "bool", id="qbatch1-bool"),
    pytest.param(2, 2, 3, 17, 130, 32, "add_b11k", id="add-B11Lk"),
    pytest.param(3, 1, 2, 9, 41, 64, "add_bhqk", id="qbatch1-add-full"),
    pytest.param(2, 2, 2, 45, 45, 64, "add_b1qk_inf", id="selfattn-add-inf-rows"),
    pytest.param(1, 1, 1, 1, 1, 32, "add_k", id="one-key"),
    pytest.param(2, 2, 3, 96, 150, 64, "bool", id="instructblip-96"),
    # the CUDA backward keeps dQ in shared memory up to Lq = 64 and in a global buffer above
    pytest.param(2, 2, 2, 64, 70, 32, "bool", id="lq64-dq-smem-edge"),
    pytest.param(2, 1, 2, 65, 70, 32, None, id="lq65-qbatch1-dq-global"),
]


def make_mask(kind, B, H, Lq, Lk, device, g):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, Lk, generator=g) > 0.3
        m[0] = False  # a sample that sees no key: its output is 0 (and its gradients)
        m[-1, 0] = True
        return m.to(device)
    shape = {"add_b11k": (B, 1, 1, Lk), "add_bhqk": (B, H, Lq, Lk), "add_b1qk_inf": (B, 1, Lq, Lk),
             "add_k": (Lk,)}[kind]
    m = torch.randn(shape, generator=g)
    if kind == "add_b1qk_inf":
        m = m.masked_fill(torch.rand(shape, generator=g) > 0.6, float("-inf"))
        m[0, 0, 3] = float("-inf")  # one query row that sees no key
    return m.to(device)


def make_inputs(B, qB, H, Lq, Lk, D, kind, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5).to(dtype).to(device)

    q, k, v = rnd(qB, H, Lq, D), rnd(B, H, Lk, D), rnd(B, H, Lk, D)
    mask = make_mask(kind, B, H, Lq, Lk, device, g)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return q, k, v, mask


def run(q, k, v, mask, dout, backend="kernel", **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with fastbridge.use_backend(backend):
        y = qformer_cross_attention(*leaves, attn_mask=mask, **kw)
    grads = torch.autograd.grad(y, leaves, dout)
    return y, grads


def reference64(q, k, v, mask, dout, scale=None):
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    m = None if mask is None else (mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    y = R.qformer_cross_attention(*leaves, attn_mask=m, scale=scale)
    grads = torch.autograd.grad(y, leaves, dout.double().cpu())
    return y, grads


def check(q, k, v, mask, dtype, tag, tol_dtype=None, **kw):
    tol_dtype = tol_dtype or dtype
    B, H, Lq, D = k.shape[0], k.shape[1], q.shape[2], q.shape[3]
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(7)).to(dtype).to(q.device)
    y, grads = run(q, k, v, mask, dout, **kw)
    y64, g64 = reference64(q, k, v, mask, dout, scale=kw.get("scale"))
    assert y.dtype == dtype and y.shape == (B, H, Lq, D) and y.device == q.device
    assert_close(y, y64, tol_dtype, f"{tag}: out")
    for name, g, e, t in zip("qkv", grads, g64, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close(g, e, tol_dtype, f"{tag}: d{name}")


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("B,qB,H,Lq,Lk,D,kind", CASES)
def test_kernel_matches_float64_reference(device, dtype, B, qB, H, Lq, Lk, D, kind):
    q, k, v, mask = make_inputs(B, qB, H, Lq, Lk, D, kind, dtype, device)
    check(q, k, v, mask, dtype, f"{device}-{dtype}")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_rows_masked_with_finfo_min_average_the_values(device, dtype):
    """HF's eager masks add finfo(dtype).min: a row masked at every key has equal scores in the mask's
    precision, so HF's eager softmax (and the kernels) give the mean of v there -- never 0 or NaN -- and
    the gradients of softmax at uniform probabilities. (A CUDA kernel that took the mask to log2 units
    overflowed it to -inf and returned 0; kernels that saved lse = m + log l, which rounds to m at
    m = finfo.min, recomputed P = 1 instead of 1 / Lk in the backward.)"""
    q, k, v, _ = make_inputs(2, 2, 2, 9, 37, 32, None, dtype, device)
    lo = torch.finfo(dtype).min
    mask = torch.zeros(2, 1, 9, 37, dtype=dtype)
    mask[..., 30:] = lo       # padded keys
    mask[1, 0, 4] = lo        # one query row that sees no key
    mask[0] = lo              # a whole sample that sees no key
    mask = mask.to(device)
    check(q, k, v, mask, dtype, f"{device}-{dtype}")
    with fastbridge.use_backend("kernel"):
        y = qformer_cross_attention(q, k, v, attn_mask=mask)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y[1, :, 4].float(), v[1].float().mean(1), atol=tol, rtol=tol)
    torch.testing.assert_close(y[0].float(), v[0].float().mean(1, keepdim=True).expand(2, 9, 32), atol=tol, rtol=tol)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_cpu_instance(isa, monkeypatch):
    """The CPU kernel is compiled per instruction set; each instance this CPU runs is checked (a lower
    one is forced with FASTBRIDGE_CPU_ISA). Odd D (not a multiple of the vector width) and Lq > 32."""
    monkeypatch.setenv("FASTBRIDGE_CPU_ISA", isa)
    want = {"generic": 0, "avx2": 1, "avx512": 2}[isa]
    got = torch.ops.fastbridge.qformer_cpu_isa()
    if got < want:
        pytest.skip(f"this CPU does not run the {isa} instance")
    for dtype in (torch.float32, torch.float16):
        q, k, v, mask = make_inputs(3, 3, 2, 37, 131, 40, "add_b1qk_inf", dtype, "cpu", seed=3)
        check(q, k, v, mask, dtype, f"{isa}-{dtype}", scale=0.3)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_huggingface_layout_and_strides(device):
    """q, k, v as the Q-Former makes them: Linear output viewed (B, L, H, D) and transposed (non-contiguous),
    and a grad_output with stride 0 (the gradient of .sum())."""
    B, H, Lq, Lk, D = 3, 4, 32, 77, 64
    g = torch.Generator().manual_seed(1)
    hq = torch.randn(B, Lq, H * D, generator=g).to(device)
    hk = torch.randn(B, Lk, H * D, generator=g).to(device)
    hv = torch.randn(B, Lk, H * D, generator=g).to(device)
    q, k, v = (t.view(B, -1, H, D).transpose(1, 2) for t in (hq, hk, hv))
    assert not q.is_contiguous()
    mask = torch.rand(B, Lk, generator=g).to(device) > 0.1
    dout = torch.ones(B, H, Lq, D, device=device).expand(B, H, Lq, D)
    y, grads = run(q, k, v, mask, dout)
    y64, g64 = reference64(q, k, v, mask, dout)
    assert_close(y, y64, torch.float32, "out")
    for name, a, e in zip("qkv", grads, g64):
        assert_close(a, e, torch.float32, f"d{name}")


def test_empty_batch_and_no_queries():
    for B, Lq in ((0, 5), (2, 0)):
        q, k, v, mask = make_inputs(B, B, 2, Lq, 9, 32, "bool" if B else None, torch.float32, "cpu")
        dout = torch.randn(B, 2, Lq, 32)
        y, (dq, dk, dv) = run(q, k, v, mask, dout)
        assert y.shape == (B, 2, Lq, 32)
        assert dk.shape == k.shape and (dk == 0).all() and (dv == 0).all()


# ---------------------------------------------------------------------------------------- dropout
def _reference_with_keep(q, k, v, mask, keep, p, scale=None):
    """float64 reference probabilities (the reference op with v = identity returns them) with the
    kernels' keep mask applied: (P o keep / (1 - p)) v."""
    B, H, Lk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(Lk, dtype=torch.float64).expand(B, H, Lk, Lk)
    m = None if mask is None else (mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    P = R.qformer_cross_attention(q, k, eye, attn_mask=m, scale=scale if scale else q.shape[-1] ** -0.5)
    return (P * keep.double().cpu() / (1.0 - p)) @ v


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("B,qB,H,Lq,Lk,D,kind", [CASES[1], CASES[3], CASES[4]])
def test_dropout_forward_and_backward_use_the_same_mask(device, B, qB, H, Lq, Lk, D, kind):
    """The op's dropout = the reference math with the keep mask the kernels report (debug op), forward
    and every gradient: so the backward replays exactly the forward's mask."""
    p = 0.3
    q, k, v, mask = make_inputs(B, qB, H, Lq, Lk, D, kind, torch.float32, device, seed=5)
    gen = torch.Generator(device=device).manual_seed(1234)
    rng = philox_rng(torch.Generator(device=device).manual_seed(1234))  # the draw the op makes from `gen`
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(2)).to(device)
    y, grads = run(q, k, v, mask, dout, dropout_p=p, generator=gen)
    keep = dropout_keep_mask(y, rng, Lk, p)
    assert keep.shape == (B, H, Lq, Lk) and keep.dtype == torch.bool
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.05, frac
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    y64 = _reference_with_keep(*leaves, mask, keep, p)
    g64 = torch.autograd.grad(y64, leaves, dout.double().cpu())
    assert_close(y, y64, torch.float32, "out")
    for name, a, e in zip("qkv", grads, g64):
        assert_close(a, e, torch.float32, f"d{name}")


def test_dropout_statistics_and_reproducibility():
    """Keep fraction 1 - p (binomial bounds), the mean of each output preserved (inverted dropout), same
    generator state -> same output, another seed -> another mask."""
    p, B, H, Lq, Lk, D = 0.1, 4, 12, 32, 257, 64
    n = B * H * Lq * Lk
    q = torch.randn(B, H, Lq, D)
    k = torch.randn(B, H, Lk, D)
    v = torch.ones(B, H, Lk, D)  # out = sum_j P_ij keep_ij / (1 - p): mean 1
    rng = philox_rng(torch.Generator().manual_seed(0))
    keep = dropout_keep_mask(q, rng, Lk, p)
    frac = keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 6 * sigma, (frac, sigma)
    with fastbridge.use_backend("kernel"):
        y1 = qformer_cross_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(9))
        y2 = qformer_cross_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(9))
        y3 = qformer_cross_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(10))
        y0 = qformer_cross_attention(q, k, v)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert torch.allclose(y0, torch.ones_like(y0), atol=1e-5)  # no dropout: rows of P sum to 1
    mean = y1[..., 0].double().mean().item()
    # E[out] = 1; each of B*H*Lq outputs averages Lk dropout terms: a loose 6-sigma-style bound
    assert abs(mean - 1.0) < 0.02, mean
    # keys of one row are independent: neighbouring groups of 4 are not copies
    assert not torch.equal(keep[..., 0:4], keep[..., 4:8])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cpu_and_cuda_draw_the_same_mask():
    rng = philox_rng(torch.Generator().manual_seed(3))
    like = torch.empty(2, 3, 33, 8)
    a = dropout_keep_mask(like, rng, 77, 0.25)
    b = dropout_keep_mask(like.cuda(), rng, 77, 0.25)
    assert torch.equal(a, b.cpu())


def test_generator_devices():
    """The dropout [seed, offset] is drawn on q's device, from that device's generator: the CPU generator
    for CPU tensors (so torch.manual_seed governs them), the CUDA generator for CUDA tensors (GPU test
    below)."""
    assert philox_rng().device.type == "cpu"
    assert philox_rng(torch.Generator().manual_seed(1)).device.type == "cpu"
    torch.manual_seed(5)
    a = philox_rng(device="cpu")
    torch.manual_seed(5)
    assert torch.equal(a, philox_rng(device=torch.device("cpu")))
    same = qf_module._same_device
    assert same(torch.device("cpu"), torch.device("cpu"))
    assert not same(torch.device("cpu"), torch.device("cuda", 0))
    assert not same(torch.device("cuda", 0), torch.device("cuda", 1))
    assert same(torch.device("cuda", 1), torch.device("cuda", 1))
    q, k, v = _base()
    with fastbridge.use_backend("kernel"):
        torch.manual_seed(3)
        y1 = qformer_cross_attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(3)
        y2 = qformer_cross_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(y1, y2)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_dropout_is_governed_by_the_cuda_generator_and_graph_safe():
    """CUDA calls draw rng on the device from the CUDA generator (torch.cuda.manual_seed governs them, the
    CPU seed does not); a CUDA graph replays a new mask each time (the rng is drawn by torch's graph-safe
    Philox into device memory the kernels read); a host rng under capture is refused."""
    q, k, v, mask = make_inputs(2, 2, 3, 32, 77, 64, "bool", torch.float16, "cuda", seed=8)
    f = lambda: qformer_cross_attention(q, k, v, attn_mask=mask, dropout_p=0.3)  # noqa: E731
    with fastbridge.use_backend("kernel"):
        torch.cuda.manual_seed(11)
        torch.default_generator.manual_seed(0)  # the CPU generator only (torch.manual_seed seeds CUDA too)
        y1 = f()
        torch.cuda.manual_seed(11)
        torch.default_generator.manual_seed(1)  # another CPU seed: the same CUDA mask
        y2 = f()
        torch.cuda.manual_seed(12)
        y3 = f()
        assert torch.equal(y1, y2) and not torch.equal(y1, y3)
        with pytest.raises(ValueError, match="'generator' must be None or a torch.Generator on q's device"):
            qformer_cross_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(0))
        # CUDA graph: capture forward (warm-up first, as torch.cuda.graphs requires), replay twice
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            f()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = f()
        graph.replay()
        r1 = y_static.clone()
        graph.replay()
        r2 = y_static.clone()
        assert not torch.equal(r1, r2), "a CUDA graph replayed one dropout mask"
        for r in (r1, r2):
            assert torch.isfinite(r).all()
        host_rng = philox_rng(torch.Generator().manual_seed(0))
        graph2 = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            with torch.cuda.graph(graph2):
                torch.ops.fastbridge.qformer_attn_fwd(q, k, v, mask, None, 0.125, 0.3, host_rng, False)


# ------------------------------------------------------------------------------- masked keys
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["nodrop", "dropout"])
def test_masked_keys_influence_nothing(device, dtype, dropout_p):
    """NaN / +-inf in the k / v rows of keys the bool mask hides change no output and no gradient (bit for
    bit: the kernels never read those rows), and those keys' dk / dv are 0. Keys masked in both backward
    key blocks (Lk > 128), a sample with every key masked, D = 64 (fp32 operands read in place) and 40."""
    for D in (64, 40):
        if device == "cuda" and D == 40:
            continue  # the CUDA kernels take head dims 32 / 64 / 128
        q, k, v, mask = make_inputs(3, 3, 2, 19, 150, D, "bool", dtype, device, seed=12)
        hidden = ~mask
        bad_k, bad_v = k.clone(), v.clone()
        rows = hidden.nonzero()
        for n, (b, j) in enumerate(rows.tolist()):
            val = (float("nan"), float("inf"), float("-inf"))[n % 3]
            bad_k[b, :, j, n % D] = val
            bad_v[b, :, j] = (float("nan"), float("-inf"), float("inf"))[n % 3]
        assert hidden[:, :128].any() and hidden[:, 128:].any()
        dout = torch.randn(3, 2, 19, D, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
        kw = dict(dropout_p=dropout_p)
        outs = []
        for kk, vv in ((k, v), (bad_k, bad_v)):
            if dropout_p:
                kw["generator"] = torch.Generator(device=device).manual_seed(77)
            outs.append(run(q, kk, vv, mask, dout, **kw))
        (y, grads), (y_bad, grads_bad) = outs
        assert torch.equal(y, y_bad), "out"
        for name, a, e in zip("qkv", grads, grads_bad):
            assert torch.equal(a, e), f"d{name}"
        for g in grads_bad[1:]:
            assert (g.transpose(1, 2)[hidden] == 0).all()  # (B, Lk, H, D)[b, j] of masked keys
        if not dropout_p:
            y64, g64 = reference64(q, k, v, mask, dout)
            assert_close(y_bad, y64, dtype, f"{device}-{dtype}-D{D}: out")
            for name, a, e in zip("qkv", grads_bad, g64):
                assert_close(a, e, dtype, f"{device}-{dtype}-D{D}: d{name}")


# ------------------------------------------------------------------------------- double backward
def _double_backward(q, k, v, mask, fn, **kw):
    """gq = d(sum out^2)/dq with create_graph, then d(sum gq * w)/d(q, k, v) -- the issue's repro, with a
    weight w so that every second-order term counts."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, attn_mask=mask, **kw)
    (gq,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    w = torch.randn(gq.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(gq)
    return torch.autograd.grad((gq * w).sum(), leaves), gq


@pytest.mark.parametrize("kind,qB,dropout_p", [(None, 3, 0.0), ("bool", 3, 0.0), ("bool", 1, 0.0),
                                               ("add_b1qk_inf", 3, 0.0), ("bool", 3, 0.25)])
def test_double_backward_matches_float64_reference(kind, qB, dropout_p):
    """Second-order gradients (create_graph=True) are right: the issue's repro (grad of grad) gave 0 where
    the reference gives non-zero values."""
    q, k, v, mask = make_inputs(3, qB, 2, 7, 21, 32, kind, torch.float32, "cpu", seed=9)

    def op(*a, **kw):
        with fastbridge.use_backend("kernel"):
            return qformer_cross_attention(*a, **kw)

    kw = {}
    if dropout_p:
        kw = dict(dropout_p=dropout_p, generator=torch.Generator().manual_seed(21))
    (dq2, dk2, dv2), gq = _double_backward(q, k, v, mask, op, **kw)
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    if dropout_p:
        keep = dropout_keep_mask(torch.empty(3, 2, 7, 32), philox_rng(torch.Generator().manual_seed(21)), 21, dropout_p)
        ref_fn = lambda q, k, v, attn_mask: _reference_with_keep(q, k, v, attn_mask, keep, dropout_p)  # noqa: E731
    else:
        ref_fn = R.qformer_cross_attention
    (eq2, ek2, ev2), gq64 = _double_backward(q.double(), k.double(), v.double(), m64, ref_fn)
    assert_close(gq, gq64, torch.float32, "first-order dq")
    assert ek2.abs().max() > 1e-3  # the repro: the kernel path returned 0 here
    for name, a, e in (("q", dq2, eq2), ("k", dk2, ek2), ("v", dv2, ev2)):
        assert_close(a, e, torch.float32, f"second-order d{name}")


def test_first_order_backward_still_runs_the_kernel(monkeypatch):
    """Without create_graph the kernel's backward op runs (the differentiable path is only for graphs)."""
    calls = []
    monkeypatch.setattr(qf_module, "_differentiable_grads", lambda *a: calls.append(a))
    q, k, v, mask = make_inputs(2, 2, 2, 5, 9, 32, "bool", torch.float32, "cpu")
    dout = torch.randn(2, 2, 5, 32)
    run(q, k, v, mask, dout)
    assert not calls


# ------------------------------------------------------------------------------- custom-op machinery
def _opcheck_args(device, dropout, kind):
    q, k, v, mask = make_inputs(3, 1 if kind == "bool" else 3, 2, 5, 11, 32, kind, torch.float32, device, seed=4)
    key_mask = mask if kind == "bool" else None
    bias = mask if kind not in (None, "bool") else None
    rng = philox_rng(torch.Generator().manual_seed(0)) if dropout else None
    return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), key_mask, bias, 0.3, 0.2 if dropout else 0.0,
            rng, False)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("dropout,kind", [(False, None), (True, "bool"), (False, "add_b11k"), (True, "add_bhqk")])
def test_opcheck(device, dropout, kind):
    torch.library.opcheck(torch.ops.fastbridge.qformer_attn_fwd.default, _opcheck_args(device, dropout, kind))


def test_opcheck_backward_and_keep_ops():
    q, k, v, _, _, scale, p, rng, tf32 = _opcheck_args("cpu", True, None)
    out, lse = torch.ops.fastbridge.qformer_attn_fwd(q, k, v, None, None, scale, p, rng, tf32)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastbridge.qformer_attn_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, None, None, scale, p, rng, tf32))
    torch.library.opcheck(torch.ops.fastbridge.qformer_dropout_keep.default, (out.detach(), rng, 11, p))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    q, k, v, mask = make_inputs(2, 1, 3, 32, 50, 64, "bool", torch.float32, device, seed=6)

    def f(q, k, v, m):
        return qformer_cross_attention(q, k, v, attn_mask=m, scale=0.2).sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with fastbridge.use_backend("kernel"):
        y = torch.compile(f, fullgraph=True)(*leaves, mask)
        y.backward()
        eager_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ye = f(*eager_leaves, mask)
        ye.backward()
    assert_close(y, ye, torch.float32, "compiled out")
    for a, e in zip(leaves, eager_leaves):
        assert_close(a.grad, e.grad, torch.float32, "compiled grad")


# -------------------------------------------------------------------------------- backends / errors
def test_float64_and_differentiable_mask_run_the_reference():
    q, k, v, mask = make_inputs(2, 2, 2, 5, 9, 32, "add_b11k", torch.float64, "cpu")
    with fastbridge.use_backend("kernel"), pytest.raises(_backend.BackendUnavailableError, match="float64"):
        qformer_cross_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _backend.FastbridgeFallbackWarning)
        y = qformer_cross_attention(q, k, v, attn_mask=mask)  # auto: the reference, exact in float64
    assert torch.allclose(y, R.qformer_cross_attention(q, k, v, attn_mask=mask))
    # an additive mask that requires grad: the reference differentiates it
    q32, k32, v32, m32 = (t.float() for t in (q, k, v, mask))
    m32.requires_grad_(True)
    with fastbridge.use_backend("kernel"), pytest.raises(_backend.BackendUnavailableError, match="requires grad"):
        qformer_cross_attention(q32, k32, v32, attn_mask=m32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _backend.FastbridgeFallbackWarning)
        y = qformer_cross_attention(q32, k32, v32, attn_mask=m32)
    (dm,) = torch.autograd.grad(y.sum(), m32)
    m64 = mask.clone().requires_grad_(True)
    (dm64,) = torch.autograd.grad(R.qformer_cross_attention(q, k, v, attn_mask=m64).sum(), m64)
    assert_close(dm, dm64, torch.float32, "d attn_mask")
    with torch.no_grad(), fastbridge.use_backend("kernel"):  # no grad needed: the kernel runs
        y = qformer_cross_attention(q32, k32, v32, attn_mask=m32)
    assert_close(y, R.qformer_cross_attention(q, k, v, attn_mask=mask), torch.float32, "no-grad mask")


def test_reference_backend():
    q, k, v, mask = make_inputs(2, 1, 2, 7, 9, 32, "bool", torch.float32, "cpu")
    check(q, k, v, mask, torch.float32, "reference", backend="reference")


# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the GPUs people train on.
SMEM_RTX = 101376   # sm_86 / sm_89: RTX 3090 / 4090, A6000, L4, L40
SMEM_A100 = 166912  # sm_80
SMEM_H100 = 232448  # sm_90


def test_cuda_launch_fits_shared_memory_or_falls_back_with_a_reason():
    """What the CUDA kernels need (csrc/qformer_cuda_layout.h, reported by the extension in every build)
    against each GPU's limit: BLIP-2's Q-Former (head dim 64) trains in bf16 / fp16 on a 99 KB RTX card;
    fp32 there, or head dim 128, gets a reason (the op runs the reference, SDPA in the HF integration)
    instead of a launch error; everything fits an A100 and an H100."""
    ensure_loaded()
    needed = torch.ops.fastbridge.qformer_cuda_smem_bytes
    shortfall = smem_shortfall
    supported = [(dt, D) for dt in (torch.float16, torch.bfloat16, torch.float32) for D in (32, 64, 128)
                 if not (dt == torch.float32 and D == 128)]
    for dt, D in supported:
        fwd, bwd = needed(dt, D, False), needed(dt, D, True)
        assert 0 < fwd < bwd, (dt, D, fwd, bwd)
        for allowed in (SMEM_A100, SMEM_H100):
            assert shortfall(dt, D, True, allowed, "gpu") is None, (dt, D, allowed)
        assert shortfall(dt, D, False, SMEM_RTX, "gpu") is None, (dt, D)  # every forward fits an RTX card
    for dt in (torch.float16, torch.bfloat16):
        for D in (32, 64):
            assert shortfall(dt, D, True, SMEM_RTX, "cuda:0") is None, (dt, D)
    msg = shortfall(torch.float32, 64, True, SMEM_RTX, "cuda:0")
    assert msg == (f"the CUDA backward kernel needs {needed(torch.float32, 64, True)} bytes of shared memory per "
                   f"block for torch.float32 at head dim 64; cuda:0 allows {SMEM_RTX}"), msg
    assert "backward" in shortfall(torch.bfloat16, 128, True, SMEM_RTX, "cuda:0")
    assert shortfall(torch.float32, 64, True, None, "cuda:0") is None  # limit unknown: the launch checks it
    assert needed(torch.float32, 128, True) == -1 and needed(torch.float16, 80, False) == -1  # not built


def test_cuda_backward_with_dq_in_shared_memory_fits():
    """The backward that keeps dQ in shared memory (Lq <= 64; csrc/qformer_cuda_layout.h): Pd^T / dS^T are
    written over S^T / dP^T to make room, so it is no larger than the old backward for BLIP-2's bf16 /
    fp16 D = 64 and still fits a 99 KB GPU; bf16 / fp16 at D = 128 does not fit an A100 (the global-dQ
    layout runs there), everything fits an H100; the global-dQ layout is the smallest launch."""
    ensure_loaded()
    needed = torch.ops.fastbridge.qformer_cuda_smem_bytes
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for D in ((32, 64, 128) if dt != torch.float32 else (32, 64)):
            glob, shared = needed(dt, D, True), needed(dt, D, True, True)
            assert 0 < glob < shared <= SMEM_H100, (dt, D, glob, shared)
            assert shared - glob == 64 * (D + 4) * 4, (dt, D)  # 64 query rows of fp32 dQ (padded rows)
    for dt in (torch.float16, torch.bfloat16):
        assert needed(dt, 64, True, True) == 98944 <= SMEM_RTX
        assert needed(dt, 32, True, True) <= SMEM_RTX
        assert needed(dt, 128, True, True) > SMEM_A100 >= needed(dt, 128, True)
    assert needed(torch.float32, 64, True, True) <= SMEM_A100
    with pytest.raises(RuntimeError, match="dq_in_smem is a backward launch"):
        needed(torch.float16, 64, False, True)


def _base():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)


@pytest.mark.parametrize("change,arg,match", [
    (lambda q, k, v: (q[0], k, v, {}), "q", r"a 4-d tensor"),
    (lambda q, k, v: (q[:, :2], k, v, {}), "q", r"\(B or 1, H, Lq, D\) = \(2 or 1, 3, Lq, 8\)"),
    (lambda q, k, v: (torch.randn(3, 3, 4, 8), k, v, {}), "q", r"\(B or 1, H, Lq, D\)"),
    (lambda q, k, v: (q, k, v[..., :4], {}), "v", r"\(B, H, Lk, D\) = \(2, 3, 5, 8\)"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0], {}), "k", r"at least one key"),
    (lambda q, k, v: (q, k.half(), v, {}), "k", r"of q's dtype torch.float32"),
    (lambda q, k, v: (q, k, v, {"attn_mask": torch.ones(2, 4, dtype=torch.bool)}), "attn_mask", r"\(B, Lk\) = \(2, 5\)"),
    (lambda q, k, v: (q, k, v, {"attn_mask": torch.ones(2, 5, dtype=torch.long)}), "attn_mask", r"bool key mask"),
    (lambda q, k, v: (q, k, v, {"attn_mask": torch.zeros(2, 3, 4, 6)}), "attn_mask", r"broadcastable to \(B, H, Lq, Lk\) = \(2, 3, 4, 5\)"),
    (lambda q, k, v: (q, k, v, {"dropout_p": 1.0}), "dropout_p", r"a float in \[0, 1\)"),
    (lambda q, k, v: (q, k, v, {"dropout_p": float("nan")}), "dropout_p", r"a float in \[0, 1\)"),
    (lambda q, k, v: (q, k, v, {"scale": "x"}), "scale", r"None or a positive float"),
    (lambda q, k, v: (q, k, v, {"scale": True}), "scale", r"None or a positive float"),
    (lambda q, k, v: (q, k, v, {"scale": float("nan")}), "scale", r"None or a positive float \(finite\)"),
    (lambda q, k, v: (q, k, v, {"scale": float("inf")}), "scale", r"None or a positive float \(finite\)"),
    (lambda q, k, v: (q, k, v, {"scale": 0.0}), "scale", r"None or a positive float"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0], {}), "k", r"head dim D >= 1"),
    (lambda q, k, v: (q.long(), k, v, {}), "q", r"floating tensor"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, arg, match):
    q, k, v, kw = change(*_base())
    with pytest.raises(ValueError, match=rf"fastbridge.ops.qformer_cross_attention: argument '{arg}' must be .*{match}"):
        qformer_cross_attention(q, k, v, **kw)


def test_numpy_scale_and_dropout_p_work():
    np = pytest.importorskip("numpy")
    q, k, v = _base()
    expect = qformer_cross_attention(q, k, v, scale=0.3)
    for s in (np.float32(0.3), np.float64(0.3)):
        torch.testing.assert_close(qformer_cross_attention(q, k, v, scale=s, dropout_p=np.float64(0.0)), expect,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_device_mismatch_and_tf32():
    q, k, v = (t.cuda() for t in _base())
    with pytest.raises(ValueError, match="'k' must be on q's device"):
        qformer_cross_attention(q, k.cpu(), v)
    q, k, v, mask = make_inputs(3, 3, 2, 33, 100, 64, "bool", torch.float32, "cuda")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # one TF32 product: fp16-class error (10-bit mantissa)
        torch._dynamo.reset()
        check(q, k, v, mask, torch.float32, "tf32", tol_dtype=torch.float16)
    finally:
        torch.set_float32_matmul_precision(prev)


def test_tolerance_table_is_shared():
    assert TOL[torch.float32] == 1e-4  # the one table (tests/conftest.py); TF32 uses the fp16 entry
    assert os.environ.get("FASTBRIDGE_POISON") == "1"


def test_reference_ignores_masked_keys_too():
    """The reference (the CPU fallback, float64 oracle) also keeps NaN / inf in masked keys out of every row."""
    from fastbridge import reference as ref

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    mask[1] = False  # a whole sample masked
    clean = ref.qformer_cross_attention(q, k, v, attn_mask=mask)
    kd, vd = k.detach().clone(), v.detach().clone()
    kd[0, :, 1], vd[0, :, 1] = float("nan"), float("inf")
    kd[1], vd[1] = float("-inf"), float("nan")
    kd.requires_grad_(), vd.requires_grad_()
    dirty = ref.qformer_cross_attention(q, kd, vd, attn_mask=mask)
    assert torch.equal(dirty, clean)
    dirty.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kd.grad).all() and torch.isfinite(vd.grad).all()
