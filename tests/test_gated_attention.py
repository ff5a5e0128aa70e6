"""fastbridge.ops.gated_attention: fused kernels against the float64 reference, every gradient."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastbridge
from fastbridge import reference as R
from fastbridge.ops import gated_attention

from conftest import assert_close, kernel_cases, kernel_devices, needs_kernels

# (B, H, Hkv, Lq, Lk, P, D, options)
CASES = [
    pytest.param(2, 4, 2, 37, 37, 3, 32, dict(), id="gqa-causal-shared"),
    pytest.param(2, 3, 3, 19, 45, 10, 16, dict(per_sample=True), id="mha-decode-rect-per-sample"),
    pytest.param(3, 4, 1, 21, 21, 1, 64, dict(kpm=True, gate="scalar"), id="mqa-padding-P1"),
    pytest.param(2, 2, 2, 70, 70, 5, 32, dict(causal=False, kpm=True, gate_fn="identity"), id="noncausal-pad-id"),
    pytest.param(1, 2, 1, 1, 83, 7, 64, dict(), id="decode-Lq1"),
    # Long caches at small B·H take the split-K decode path (split + combine kernels).
    pytest.param(1, 2, 1, 1, 600, 3, 32, dict(), id="decode-split"),
    pytest.param(1, 4, 2, 5, 777, 4, 16, dict(kpm="partial", per_sample=True), id="decode-split-Lq5-pad"),
    pytest.param(2, 2, 2, 30, 12, 4, 32, dict(), id="Lq-gt-Lk-empty-rows"),
    pytest.param(1, 2, 2, 33, 33, 17, 128, dict(per_sample=True, kpm=True), id="d128-P17"),
    # Long enough for whole key blocks below the causal diagonal / before a ragged end (unmasked path).
    pytest.param(1, 2, 1, 150, 150, 4, 32, dict(), id="causal-unmasked-blocks"),
    pytest.param(1, 2, 2, 20, 150, 3, 16, dict(causal=False), id="noncausal-ragged-end"),
    pytest.param(1, 2, 1, 9, 9, 2, 48, dict(gate="one"), id="d48-non-pow2"),
]


def make_inputs(B, H, Hkv, Lq, Lk, P, D, opts, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    Bp = B if opts.get("per_sample") else 1
    gate_shape = {"scalar": (), "one": (1,)}.get(opts.get("gate"), (H,))
    t = dict(q=rnd(B, H, Lq, D), k=rnd(B, Hkv, Lk, D), v=rnd(B, Hkv, Lk, D), prefix_k=rnd(Bp, Hkv, P, D),
             prefix_v=rnd(Bp, Hkv, P, D), gate=rnd(*gate_shape, scale=0.7))
    kpm = None
    if opts.get("kpm"):
        kpm = torch.rand(B, Lk, generator=g) > 0.3
        if opts["kpm"] != "partial":
            kpm[0, :] = False  # a sample with every key padded: main branch must give 0, not NaN
        kpm = kpm.to(device)
    kw = dict(causal=opts.get("causal", True), gate_fn=opts.get("gate_fn", "tanh"), key_padding_mask=kpm)
    return t, kw


NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "gate")


def run(t, kw, dout, backend):
    leaves = {n: t[n].detach().clone().requires_grad_(True) for n in NAMES}
    with fastbridge.use_backend(backend):
        out = gated_attention(*[leaves[n] for n in NAMES], **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return out, dict(zip(NAMES, grads))


def reference64(t, kw, dout):
    leaves = {n: t[n].detach().double().cpu().requires_grad_(True) for n in NAMES}
    kw64 = dict(kw, key_padding_mask=None if kw["key_padding_mask"] is None else kw["key_padding_mask"].cpu())
    out = R.gated_attention(*[leaves[n] for n in NAMES], **kw64)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.detach().double().cpu())
    return out, dict(zip(NAMES, grads))


@pytest.fixture(params=["separate", "atomic"])
def dq_mode(request, monkeypatch):
    """Both backward dQ paths of the kernel (kernels/gated_attention.py: dq_mode)."""
    monkeypatch.setenv("FASTBRIDGE_GA_DQ", request.param)
    return request.param


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases())
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,P,D,opts", CASES)
def test_kernel_matches_float64_reference(device, dtype, B, H, Hkv, Lq, Lk, P, D, opts, dq_mode):
    t, kw = make_inputs(B, H, Hkv, Lq, Lk, P, D, opts, dtype, device)
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    out, grads = run(t, kw, dout, "kernel")
    out64, g64 = reference64(t, kw, dout)
    assert out.dtype == dtype and out.shape == (B, H, Lq, D)
    assert_close(out, out64, dtype, "out")
    for n in NAMES:
        assert grads[n].shape == t[n].shape and grads[n].dtype == t[n].dtype, n
        assert_close(grads[n], g64[n], dtype, f"d{n}")


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_zero_gate_is_plain_causal_attention_and_still_trains(device, dtype):
    t, kw = make_inputs(2, 4, 2, 24, 24, 5, 32, dict(), dtype, device)
    t["gate"] = torch.zeros(4, dtype=dtype, device=device)
    dout = torch.randn(2, 4, 24, 32, dtype=dtype, device=device)
    out, grads = run(t, kw, dout, "kernel")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        t["q"], t["k"].repeat_interleave(2, 1), t["v"].repeat_interleave(2, 1), is_causal=True)
    assert_close(out, sdpa, dtype, "out vs SDPA causal")
    _, g64 = reference64(t, kw, dout)
    assert g64["gate"].abs().min() > 0  # the zero gate gets a gradient
    assert_close(grads["gate"], g64["gate"], dtype, "dgate")
    assert grads["prefix_k"].abs().max() == 0 and grads["prefix_v"].abs().max() == 0  # tanh(0) = 0


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_strided_inputs_hf_layout(device, dtype):
    """q/k/v as transformers produces them: (B, L, H, D) projections viewed as (B, H, L, D)."""
    B, H, Hkv, L, P, D = 2, 4, 2, 13, 3, 16
    t, kw = make_inputs(B, H, Hkv, L, L, P, D, dict(), dtype, device)
    for n in ("q", "k", "v"):
        t[n] = t[n].transpose(1, 2).contiguous().transpose(1, 2)
        assert not t[n].is_contiguous()
    dout = torch.randn(B, L, H, D, dtype=dtype, device=device).transpose(1, 2)
    out, grads = run(t, kw, dout, "kernel")
    out64, g64 = reference64(t, kw, dout)
    assert_close(out, out64, dtype, "out")
    for n in NAMES:
        assert_close(grads[n], g64[n], dtype, f"d{n}")


@needs_kernels
def test_opcheck():
    device = kernel_devices()[0]
    t, kw = make_inputs(2, 4, 2, 9, 11, 3, 16, dict(kpm=True), torch.float32, device)
    g = torch.tanh(t["gate"].float())
    args = [t[n].detach().requires_grad_(True) for n in NAMES[:5]] + [g.detach().requires_grad_(True)]
    torch.library.opcheck(torch.ops.fastbridge.gated_attention.default,
                          (*args, True, 0.25, kw["key_padding_mask"]))


@needs_kernels
def test_torch_compile_fullgraph():
    device = kernel_devices()[0]
    t, kw = make_inputs(1, 2, 1, 8, 8, 2, 16, dict(), torch.float32, device)
    leaves = [t[n].detach().requires_grad_(True) for n in NAMES]

    def f(*xs):
        return gated_attention(*xs, causal=True)

    with fastbridge.use_backend("kernel"):
        eager = f(*leaves)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
        torch.testing.assert_close(a, b)


@needs_kernels
def test_dq_modes_agree_and_atomic_yields_to_determinism(monkeypatch):
    from fastbridge.kernels import gated_attention as K

    device = kernel_devices()[0]
    t, kw = make_inputs(2, 4, 2, 37, 37, 3, 32, dict(kpm="partial"), torch.float32, device)
    dout = torch.randn(2, 4, 37, 32, generator=torch.Generator().manual_seed(1)).to(device)
    grads = {}
    for mode in K.DQ_MODES:
        monkeypatch.setenv(K.DQ_ENV, mode)
        assert K.dq_mode() == mode
        grads[mode] = run(t, kw, dout, "kernel")[1]
    for n in NAMES:  # same gradients up to fp32 summation order
        torch.testing.assert_close(grads["atomic"][n], grads["separate"][n], rtol=1e-5, atol=1e-5, msg=n)
    monkeypatch.setenv(K.DQ_ENV, "atomic")
    monkeypatch.setattr(K, "_warned_deterministic", False)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        with pytest.warns(UserWarning, match="FASTBRIDGE_GA_DQ=atomic .* separate dQ kernel"):
            assert K.dq_mode() == "separate"
    monkeypatch.setenv(K.DQ_ENV, "fast")
    with pytest.raises(ValueError, match="FASTBRIDGE_GA_DQ: expected one of separate, atomic, got 'fast'"):
        K.dq_mode()


def test_decode_cases_take_the_split_path():
    from fastbridge.kernels.gated_attention import decode_splits, fwd_config

    for B, H, Lq, Lk, D in ((1, 2, 1, 600, 32), (1, 4, 5, 777, 16)):
        bm, bn, _, _ = fwd_config(D, Lq)
        assert decode_splits(B * H, Lq, Lk, bm, bn, torch.device("cpu")) > 1
    # and a long prefill never does
    bm, bn, _, _ = fwd_config(128, 4096)
    assert decode_splits(32, 4096, 4096, bm, bn, torch.device("cpu")) == 1


def test_reference_backend_matches_float64():
    t, kw = make_inputs(2, 4, 2, 11, 11, 3, 16, dict(kpm=True), torch.float32, "cpu")
    dout = torch.randn(2, 4, 11, 16)
    out, grads = run(t, kw, dout, "reference")
    out64, g64 = reference64(t, kw, dout)
    assert_close(out, out64, torch.float32, "out")
    for n in NAMES:
        assert_close(grads[n], g64[n], torch.float32, f"d{n}")


def test_reference_no_nan_for_fully_padded_rows():
    t, kw = make_inputs(3, 4, 1, 21, 21, 1, 64, dict(kpm=True), torch.float64, "cpu")
    out = R.gated_attention(*[t[n] for n in NAMES], **kw)
    assert torch.isfinite(out).all()
    # Sample 0 has every key padded: its output is the gated prefix branch alone.
    pref = torch.softmax(t["q"][0] @ t["prefix_k"][0].repeat_interleave(4, 0).transpose(-1, -2) * 64 ** -0.5, -1)
    expect = torch.tanh(t["gate"]).reshape(-1, 1, 1) * (pref @ t["prefix_v"][0].repeat_interleave(4, 0))
    torch.testing.assert_close(out[0], expect)


# ---------------------------------------------------------------------------------------- bad input
def _good():
    return make_inputs(2, 4, 2, 5, 7, 3, 16, dict(), torch.float32, "cpu")


@pytest.mark.parametrize("change,arg,fragment", [
    (dict(q=torch.randn(2, 4, 5)), "q", "4-d tensor"),
    (dict(k=torch.randn(2, 3, 7, 16)), "k", "dividing q's 4 heads"),
    (dict(k=torch.randn(2, 2, 7, 8)), "k", "(B, Hkv, Lk, D) = (2, Hkv, Lk, 16)"),
    (dict(v=torch.randn(2, 2, 6, 16)), "v", "k's shape"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16)), "prefix_k", "(1 or 2, 2, P >= 1, 16)"),
    (dict(prefix_k=torch.randn(1, 2, 0, 16), prefix_v=torch.randn(1, 2, 0, 16)), "prefix_k", "P >= 1"),
    (dict(prefix_v=torch.randn(1, 2, 4, 16)), "prefix_v", "prefix_k's shape"),
    (dict(gate=torch.zeros(3)), "gate", "shape () or (1,) or (4,)"),
    (dict(v=torch.randn(2, 2, 7, 16, dtype=torch.float64)), "v", "q's dtype torch.float32"),
])
def test_bad_input_names_the_argument(change, arg, fragment):
    t, kw = _good()
    t.update(change)
    with pytest.raises(ValueError) as e:
        gated_attention(*[t[n] for n in NAMES], **kw)
    assert f"'{arg}'" in str(e.value) and fragment in str(e.value), str(e.value)


def test_bad_options_name_the_argument():
    t, kw = _good()
    args = [t[n] for n in NAMES]
    with pytest.raises(ValueError, match="'gate_fn' must be one of"):
        gated_attention(*args, gate_fn="sigmoid")
    with pytest.raises(ValueError, match="'key_padding_mask' must be a bool tensor"):
        gated_attention(*args, key_padding_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"'key_padding_mask' must be of shape \(B, Lk\) = \(2, 7\)"):
        gated_attention(*args, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="'scale' must be None or a positive float"):
        gated_attention(*args, scale=-1.0)
    with pytest.raises(ValueError, match="'causal' must be a bool"):
        gated_attention(*args, causal=1)


# Prompts longer than one prompt tile (kernels/gated_attention._prefix_block: 64 keys): the forward's and
# dq's prompt loops and the backward "pre" kernel's prompt-tile programs (kernel review, item 1).
LONG_PROMPTS = [
    pytest.param(2, 2, 1, 7, 9, 65, 16, dict(), id="P65-shared-gqa"),
    pytest.param(2, 2, 2, 11, 5, 130, 16, dict(per_sample=True, kpm="partial"), id="P130-per-sample"),
    pytest.param(2, 2, 1, 13, 13, 130, 16, dict(causal=False), id="P130-shared-noncausal"),
    pytest.param(1, 2, 1, 70, 70, 129, 16, dict(), id="P129-row-chunks"),
    pytest.param(1, 2, 1, 1, 600, 130, 16, dict(), id="P130-decode-split"),
]


@needs_kernels
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,P,D,opts", LONG_PROMPTS)
def test_long_prompts_match_float64_reference(B, H, Hkv, Lq, Lk, P, D, opts, dq_mode):
    device = kernel_devices()[0]
    dtype = torch.float32
    t, kw = make_inputs(B, H, Hkv, Lq, Lk, P, D, opts, dtype, device)
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    out, grads = run(t, kw, dout, "kernel")
    out64, g64 = reference64(t, kw, dout)
    assert_close(out, out64, dtype, "out")
    for n in NAMES:
        assert_close(grads[n], g64[n], dtype, f"d{n}")


# ------------------------------------------------------------------------------- launch device (item 2)
def guarded_launches(monkeypatch, module):
    """Replace kernels/_common.device_guard with a recording one and every ``*_kernel`` of ``module`` with a
    proxy that fails a launch made outside the guard (or under another device's guard). Returns the list
    of (kernel name, launch keyword arguments)."""
    from fastbridge.kernels import _common as KC

    active, launched = [], []
    real_guard = KC.device_guard

    @contextlib.contextmanager
    def recording_guard(device):
        with real_guard(device):
            active.append(device)
            try:
                yield
            finally:
                active.pop()

    class Checked:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                device = next(a.device for a in args if isinstance(a, torch.Tensor))
                assert active, f"{self.name} launched outside kernels/_common.device_guard"
                assert active[-1] == device, f"{self.name}: guard for {active[-1]}, tensors on {device}"
                launched.append((self.name, kwargs))
                return self.fn[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(KC, "device_guard", recording_guard)
    for name in dir(module):
        if name.endswith("_kernel"):
            monkeypatch.setattr(module, name, Checked(name, getattr(module, name)))
    return launched


@needs_kernels
def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    from fastbridge.kernels import gated_attention as K

    launched = guarded_launches(monkeypatch, K)
    device = kernel_devices()[0]
    for mode in K.DQ_MODES:
        monkeypatch.setenv(K.DQ_ENV, mode)
        for shape in ((1, 2, 1, 9, 11, 3, 16), (1, 2, 1, 1, 600, 3, 16)):  # prefill; decode (split + combine)
            t, kw = make_inputs(*shape, dict(), torch.float32, device)
            run(t, kw, torch.randn(shape[0], shape[1], shape[3], shape[6]).to(device), "kernel")
    assert {name for name, _ in launched} == {n for n in dir(K) if n.endswith("_kernel")}


def test_device_guard_makes_the_tensors_gpu_current():
    from fastbridge.kernels import _common as KC

    assert isinstance(KC.device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = KC.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


# ------------------------------------------------------------------------- fp32 dot precision (item 6)
@pytest.fixture
def matmul_precision():
    """Set torch's fp32 matmul precision for one test, restored after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_dot_precision_follows_torch(matmul_precision, monkeypatch):
    from types import SimpleNamespace

    from fastbridge.kernels._common import dot_precision

    for torch_setting, expected in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
        matmul_precision(torch_setting)
        assert dot_precision(torch.float32) == expected, torch_setting
        assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "ieee"
    # torch's newer API (torch.backends.cuda.matmul.fp32_precision) wins where it is set; mixing the two APIs
    # makes torch.get_float32_matmul_precision() raise, so it must not be asked then.
    for new_api, expected in (("tf32", "tf32"), ("ieee", "tf32x3")):
        monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(fp32_precision=new_api))
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: pytest.fail("legacy API asked"))
        assert dot_precision(torch.float32) == expected


# TF32 keeps 10 mantissa bits, as fp16 does: "high" earns fp16's tolerance; 3xTF32 ("highest") fp32's.
PRECISIONS = [("highest", "tf32x3", torch.float32), ("high", "tf32", torch.float16)]


@needs_kernels
@pytest.mark.parametrize("torch_setting,dot_prec,tol_dtype", PRECISIONS)
def test_fp32_precisions_match_float64(torch_setting, dot_prec, tol_dtype, matmul_precision, monkeypatch):
    """On a GPU this measures the precision's real error; the interpreter computes every input_precision as an
    fp32 numpy matmul, so there it checks that each precision launches and is passed to every kernel."""
    from fastbridge.kernels import gated_attention as K

    matmul_precision(torch_setting)
    launched = guarded_launches(monkeypatch, K)
    device = kernel_devices()[0]
    t, kw = make_inputs(2, 4, 2, 37, 37, 70, 32, dict(kpm="partial"), torch.float32, device)
    dout = torch.randn(2, 4, 37, 32, generator=torch.Generator().manual_seed(1)).to(device)
    out, grads = run(t, kw, dout, "kernel")
    out64, g64 = reference64(t, kw, dout)
    assert_close(out, out64, tol_dtype, f"out ({dot_prec})")
    for n in NAMES:
        assert_close(grads[n], g64[n], tol_dtype, f"d{n} ({dot_prec})")
    assert {kwargs["DOT_PREC"] for _, kwargs in launched} == {dot_prec}


# ------------------------------------------------------------- found by adversarial testing (items 13-19)
@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=needs_kernels)])
def test_double_backward(backend):
    """Second order: the reference backend differentiates its backward; the fused backward raises in
    fastbridge's words instead of torch's generic error (or silently wrong values)."""
    device = "cpu" if backend == "reference" else kernel_devices()[0]
    t, kw = make_inputs(1, 2, 1, 5, 6, 3, 16, dict(), torch.float32, device)
    leaves = [t[n].detach().requires_grad_(True) for n in NAMES]
    with fastbridge.use_backend(backend):
        out = gated_attention(*leaves, **kw)
    gq, = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    if backend == "reference":
        assert torch.autograd.grad(gq.sum(), leaves[1])[0].abs().sum() > 0
        return
    with pytest.raises(NotImplementedError, match="second-order gradients are not supported by "
                                                  r"fastbridge.ops.gated_attention; .*use_backend\('reference'\)"):
        torch.autograd.grad(gq.sum(), leaves[1])


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=needs_kernels)])
@pytest.mark.parametrize("kpm", [False, True])
def test_no_main_keys_gives_the_prompt_branch(backend, kpm):
    """Lk = 0: the main branch contributes 0 on every backend (the reference used to raise IndexError)."""
    device = "cpu" if backend == "reference" else kernel_devices()[0]
    t, kw = make_inputs(2, 4, 2, 5, 0, 3, 16, dict(), torch.float32, device)
    if kpm:
        kw["key_padding_mask"] = torch.ones(2, 0, dtype=torch.bool, device=device)
    dout = torch.randn(2, 4, 5, 16).to(device)
    out, grads = run(t, kw, dout, backend)
    out64, g64 = reference64(t, kw, dout)
    q = t["q"].double().cpu()
    pk, pv = (t[n].double().cpu().repeat_interleave(2, 1) for n in ("prefix_k", "prefix_v"))
    prompt = torch.softmax(q @ pk.transpose(-1, -2) * 16 ** -0.5, -1) @ pv
    torch.testing.assert_close(out64, torch.tanh(t["gate"].double().cpu()).view(1, 4, 1, 1) * prompt)
    assert_close(out, out64, torch.float32, "out")
    for n in NAMES:
        assert grads[n].shape == t[n].shape
        assert_close(grads[n], g64[n], torch.float32, f"d{n}")


@pytest.mark.parametrize("change,arg,fragment", [
    (dict(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 7, 0), v=torch.randn(2, 2, 7, 0),
          prefix_k=torch.randn(1, 2, 3, 0), prefix_v=torch.randn(1, 2, 3, 0)), "q", "head dim D >= 1"),
])
def test_degenerate_shapes_name_the_argument(change, arg, fragment):
    t, kw = _good()
    t.update(change)
    with pytest.raises(ValueError) as e:
        gated_attention(*[t[n] for n in NAMES], **kw)
    assert f"'{arg}'" in str(e.value) and fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, True, "0.5", torch.tensor(0.5)])
def test_bad_scale_names_the_argument(scale):
    t, kw = _good()
    with pytest.raises(ValueError, match="'scale' must be None or a positive float"):
        gated_attention(*[t[n] for n in NAMES], scale=scale, **kw)


def test_numpy_scale_works():
    np = pytest.importorskip("numpy")
    t, kw = _good()
    args = [t[n] for n in NAMES]
    expect = gated_attention(*args, scale=0.3, **kw)
    for s in (np.float32(0.3), np.float64(0.3)):
        torch.testing.assert_close(gated_attention(*args, scale=s, **kw), expect, rtol=1e-6, atol=1e-6)


def _bwd_op_args(Lq, device):
    """Arguments of fastbridge::gated_attention_bwd in transformers' layout: q / k / v / dout (B, L, H, D)
    projections viewed as (B, H, L, D), a shared prompt, out / lse from the forward op."""
    B, H, Hkv, Lk, P, D = 2, 4, 2, 6, 3, 16
    g = torch.Generator().manual_seed(3)

    def hf(L, heads):
        return torch.randn(B, L, heads, D, generator=g).transpose(1, 2).to(device)

    q, k, v, dout = hf(Lq, H), hf(Lk, Hkv), hf(Lk, Hkv), hf(Lq, H)
    pk, pv = (torch.randn(1, Hkv, P, D, generator=g).to(device) for _ in range(2))
    gate = torch.tanh(torch.randn(H, generator=g)).to(device)
    kpm = (torch.rand(B, Lk, generator=g) > 0.3).to(device)
    out, lse_m, lse_p = torch.ops.fastbridge.gated_attention(q, k, v, pk, pv, gate, True, 0.25, kpm)
    return (dout, q, k, v, pk, pv, gate, out, lse_m, lse_p, True, 0.25, kpm)


@needs_kernels
@pytest.mark.parametrize("Lq", [0, 5])
def test_opcheck_backward_odd_layouts(Lq):
    """Fake and real backward outputs agree in shape, dtype and strides (Lq = 0 used to keep k's strides)."""
    args = _bwd_op_args(Lq, kernel_devices()[0])
    torch.library.opcheck(torch.ops.fastbridge.gated_attention_bwd.default, args)
    real = torch.ops.fastbridge.gated_attention_bwd(*args)
    for t, x in zip(real, args[1:7]):
        assert t.shape == x.shape and t.is_contiguous()


@needs_kernels
def test_tf32x3_that_does_not_fit_runs_ieee_and_says_so_once(matmul_precision, monkeypatch):
    """3xTF32 stages two TF32 tiles per fp32 operand: where a configuration does not fit (Triton's
    OutOfResources at launch), the launcher reruns with fp32 FMA dots, once warned; other precisions'
    OutOfResources propagate. (On CPU the launch failure is simulated.)"""
    import warnings

    from triton.runtime.errors import OutOfResources

    from fastbridge._backend import FastbridgeFallbackWarning
    from fastbridge.kernels import _common as KC
    from fastbridge.kernels import gated_attention as K

    monkeypatch.setattr(KC, "_TF32X3_UNFIT", set())
    real, tried = K._gated_attn_fwd_kernel, []

    class TooBigFor:
        def __init__(self, precisions):
            self.precisions = precisions

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tried.append(kwargs["DOT_PREC"])
                if kwargs["DOT_PREC"] in self.precisions:
                    raise OutOfResources(262144, 232448, "shared memory")
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(K, "_gated_attn_fwd_kernel", TooBigFor({"tf32x3"}))
    device = kernel_devices()[0]
    t, kw = make_inputs(1, 2, 1, 9, 11, 3, 16, dict(), torch.float32, device)
    dout = torch.randn(1, 2, 9, 16).to(device)
    matmul_precision("highest")
    with pytest.warns(FastbridgeFallbackWarning, match="gated_attention_forward with 3xTF32 fp32 dots"):
        out, grads = run(t, kw, dout, "kernel")
    assert tried == ["tf32x3", "ieee"]
    out64, g64 = reference64(t, kw, dout)
    assert_close(out, out64, torch.float32, "out")
    for n in NAMES:
        assert_close(grads[n], g64[n], torch.float32, f"d{n}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastbridgeFallbackWarning)
        run(t, kw, dout, "kernel")  # straight to fp32 FMA dots, no second warning
    assert tried == ["tf32x3", "ieee", "ieee"]
    matmul_precision("high")
    monkeypatch.setattr(K, "_gated_attn_fwd_kernel", TooBigFor({"tf32"}))
    with pytest.raises(OutOfResources):
        run(t, kw, dout, "kernel")
