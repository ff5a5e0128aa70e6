"""fastbridge.ops.adapter_block: the fused kernels against the float64 reference, every gradient."""
from __future__ import annotations

import pytest
import torch

import fastbridge
from fastbridge import reference as R
from fastbridge.ops import adapter_block

from conftest import assert_close, kernel_cases, kernel_devices, needs_kernels

# (lead shape, d, r, activation, options). Odd / non-power-of-two sizes, d spanning several chunks,
# r from 1 to 256, every activation, LN with/without bias, tensor scale, gate, separate residual.
CASES = [
    pytest.param((2, 19), 70, 13, "gelu", dict(ln=True, ln_bias=True, gate=True), id="ln-gelu-gate"),
    pytest.param((37,), 130, 33, "silu", dict(ln=True, ln_bias=False, tensor_scale=True, residual=True),
                 id="ln-nobias-silu-tscale-res"),
    pytest.param((3, 5, 3), 48, 1, "relu", dict(bias=False), id="r1-relu-nobias"),
    pytest.param((21,), 257, 64, "gelu_tanh", dict(ln=True, ln_bias=True, scale=0.5), id="d257-gelu_tanh"),
    pytest.param((9,), 64, 256, "gelu", dict(gate=True, residual=True), id="r256"),
    pytest.param((11,), 96, 200, "gelu", dict(ln=True, ln_bias=True), id="ln-r200-two-r-slices"),
    pytest.param((3,), 8193, 16, "gelu", dict(ln=True, ln_bias=True, gate=True), id="d8193"),
    pytest.param((1,), 40, 8, "silu", dict(ln=True, ln_bias=True, gate=True, tensor_scale=True), id="one-row"),
]


def make_inputs(lead, d, r, opts, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(dtype).to(device)

    bias = opts.get("bias", True)
    t = dict(
        x=rnd(*lead, d, shift=0.3),
        w_down=rnd(r, d, scale=d ** -0.5),
        b_down=rnd(r, scale=0.1) if bias else None,
        w_up=rnd(d, r, scale=r ** -0.5),
        b_up=rnd(d, scale=0.1) if bias else None,
        ln_weight=rnd(d, scale=0.2, shift=1.0) if opts.get("ln") else None,
        ln_bias=rnd(d, scale=0.2) if opts.get("ln") and opts.get("ln_bias") else None,
        scale=rnd(scale=0.5, shift=1.0).reshape(()) if opts.get("tensor_scale") else opts.get("scale", 1.0),
        gate=rnd(1, scale=0.5) if opts.get("gate") else None,
        residual=rnd(*lead, d) if opts.get("residual") else None,
    )
    return t


def call(t, activation, **extra):
    return adapter_block(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], ln_weight=t["ln_weight"],
                         ln_bias=t["ln_bias"], activation=activation, scale=t["scale"], gate=t["gate"],
                         residual=t["residual"], **extra)


def grad_leaves(t):
    return {k: v for k, v in t.items() if isinstance(v, torch.Tensor)}


def run_with_grads(t, activation, dy, backend):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in grad_leaves(t).items()}
    t2 = {**t, **leaves}
    with fastbridge.use_backend(backend):
        y = call(t2, activation)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, grads))


def reference64(t, activation, dy):
    t64 = {k: (v.detach().double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    leaves = {k: v.requires_grad_(True) for k, v in grad_leaves(t64).items()}
    y = R.adapter_block(t64["x"], t64["w_down"], t64["b_down"], t64["w_up"], t64["b_up"],
                        ln_weight=t64["ln_weight"], ln_bias=t64["ln_bias"], activation=activation,
                        scale=t64["scale"], gate=t64["gate"], residual=t64["residual"])
    grads = torch.autograd.grad(y, list(leaves.values()), dy.detach().double().cpu())
    return y, dict(zip(leaves, grads))


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases())
@pytest.mark.parametrize("lead,d,r,activation,opts", CASES)
def test_kernel_matches_float64_reference(device, dtype, lead, d, r, activation, opts):
    t = make_inputs(lead, d, r, opts, dtype, device)
    dy = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    y, grads = run_with_grads(t, activation, dy, "kernel")
    y64, g64 = reference64(t, activation, dy)
    assert y.dtype == dtype and y.shape == t["x"].shape
    assert_close(y, y64, dtype, "y")
    assert set(grads) == set(g64)
    for name in g64:
        assert grads[name].shape == t[name].shape and grads[name].dtype == t[name].dtype, name
        assert_close(grads[name], g64[name], dtype, f"d{name}")


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases())
def test_zero_gate_still_trains_the_gate(device, dtype):
    """tanh(0) = 0 makes the branch vanish; the gate (and only it, with up zero) must still get a gradient."""
    t = make_inputs((2, 7), 40, 8, dict(ln=True, ln_bias=True, gate=True), dtype, device)
    t["gate"] = torch.zeros(1, dtype=dtype, device=device)
    dy = torch.randn_like(t["x"])
    y, grads = run_with_grads(t, "gelu", dy, "kernel")
    y64, g64 = reference64(t, "gelu", dy)
    assert torch.equal(y, t["x"])
    assert g64["gate"].abs().item() > 0
    for name in g64:
        assert_close(grads[name], g64[name], dtype, f"d{name}")


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_non_contiguous_inputs_and_broadcast_grad(device, dtype):
    d, r = 36, 12
    base = make_inputs((24,), 2 * d, r, dict(ln=True, ln_bias=True), dtype, device)
    x = base["x"][:, ::2]                        # strided rows and columns
    assert not x.is_contiguous()
    t = make_inputs((24,), d, r, dict(ln=True, ln_bias=True, residual=True), dtype, device)
    t["x"] = x
    t["residual"] = torch.randn(d, 24, dtype=dtype, device=device).t()  # transposed view
    t["w_down"] = torch.randn(d, r, dtype=dtype, device=device).t() * d ** -0.5  # (r, d) non-contiguous
    dy = torch.ones(24, d, dtype=dtype, device=device).expand(24, d)  # like the grad of .sum()
    y, grads = run_with_grads(t, "gelu", dy, "kernel")
    y64, g64 = reference64(t, "gelu", dy)
    assert_close(y, y64, dtype, "y")
    for name in g64:
        assert_close(grads[name], g64[name], dtype, f"d{name}")


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases()[:1])
def test_empty_input(device, dtype):
    t = make_inputs((0, 3), 16, 4, dict(ln=True, ln_bias=True, gate=True), dtype, device)
    dy = torch.empty(0, 3, 16, dtype=dtype, device=device)
    y, grads = run_with_grads(t, "gelu", dy, "kernel")
    assert y.shape == (0, 3, 16)
    assert grads["w_down"].abs().sum() == 0 and grads["gate"].abs().sum() == 0


@pytest.mark.parametrize("lead,d,r,activation,opts", CASES[:3])
def test_reference_backend_matches_float64(lead, d, r, activation, opts):
    """The CPU fallback (reference backend) through the same custom op: forward and every gradient."""
    dtype = torch.float32
    t = make_inputs(lead, d, r, opts, dtype, "cpu")
    dy = torch.randn(*lead, d, dtype=dtype)
    y, grads = run_with_grads(t, activation, dy, "reference")
    y64, g64 = reference64(t, activation, dy)
    assert_close(y, y64, dtype, "y")
    for name in g64:
        assert_close(grads[name], g64[name], dtype, f"d{name}")


def _op_args(t, activation, backend):
    return (t["x"].reshape(-1, t["x"].shape[-1]), t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["ln_weight"],
            t["ln_bias"], 1e-5, activation, 1.0, torch.tanh(t["gate"].float()).reshape(()), t["residual"])


@needs_kernels
@pytest.mark.parametrize("opts", [dict(ln=True, ln_bias=True, gate=True), dict(residual=True, gate=True)])
def test_opcheck(opts):
    device = kernel_devices()[0]
    t = make_inputs((5,), 24, 8, opts, torch.float32, device)
    if t["residual"] is not None:
        t["residual"] = t["residual"].reshape(5, 24)
    args = list(_op_args(t, "gelu", None))
    for i in (0, 1, 2, 3, 4, 5, 6, 10, 11):
        if args[i] is not None:
            args[i] = args[i].detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.fastbridge.adapter_block.default, tuple(args))


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=needs_kernels)])
def test_torch_compile_fullgraph(backend):
    device = "cpu" if backend == "reference" else kernel_devices()[0]
    t = make_inputs((4, 3), 24, 8, dict(ln=True, ln_bias=True, gate=True), torch.float32, device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in grad_leaves(t).items()}
    t2 = {**t, **leaves}

    def f(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, gate):
        return call(dict(x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, ln_weight=ln_weight,
                         ln_bias=ln_bias, gate=gate, scale=1.0, residual=None), "gelu")

    args = [t2[k] for k in ("x", "w_down", "b_down", "w_up", "b_up", "ln_weight", "ln_bias", "gate")]
    with fastbridge.use_backend(backend):
        eager = f(*args)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, eager)
    g1 = torch.autograd.grad(compiled.sum(), args)
    g2 = torch.autograd.grad(eager.sum(), args)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------- bad input
def _good():
    return make_inputs((3, 4), 16, 4, dict(ln=True, ln_bias=True, gate=True), torch.float32, "cpu")


@pytest.mark.parametrize("change,arg,fragment", [
    (dict(w_down=torch.randn(4, 15)), "w_down", "(r, d) = (r, 16)"),
    (dict(w_up=torch.randn(4, 16)), "w_up", "(d, r) = (16, 4)"),
    (dict(b_down=torch.randn(5)), "b_down", "(r,) = (4,)"),
    (dict(b_up=torch.randn(15)), "b_up", "(d,) = (16,)"),
    (dict(ln_weight=torch.randn(8)), "ln_weight", "(d,) = (16,)"),
    (dict(ln_weight=None), "ln_bias", "None when ln_weight is None"),
    (dict(w_up=torch.randn(16, 4, dtype=torch.float64)), "w_up", "x's dtype torch.float32"),
    (dict(x=torch.randint(0, 3, (3, 4, 16))), "x", "floating tensor"),
    (dict(gate=torch.zeros(2)), "gate", "shape () or (1,)"),
    (dict(residual=torch.randn(3, 16)), "residual", "x's shape"),
    (dict(scale="big"), "scale", "a float or a 0-d tensor"),
    (dict(scale=torch.ones(2)), "scale", "shape ()"),
])
def test_bad_input_names_the_argument(change, arg, fragment):
    t = {**_good(), **change}
    with pytest.raises(ValueError) as e:
        call(t, "gelu")
    msg = str(e.value)
    assert f"'{arg}'" in msg and fragment in msg, msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_names_the_argument():
    t = _good()
    t["x"] = t["x"].cuda()
    with pytest.raises(ValueError, match=r"argument 'w_down' must be on x's device cuda"):
        call(t, "gelu")


def test_bad_activation_and_eps():
    with pytest.raises(ValueError, match="'activation' must be one of"):
        call(_good(), "tanh")
    with pytest.raises(ValueError, match="'eps' must be a positive float"):
        call(_good(), "gelu", eps=0.0)


@needs_kernels
def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    from fastbridge.kernels import adapter_block as K
    from test_gated_attention import guarded_launches

    launched = guarded_launches(monkeypatch, K)
    t = make_inputs((5,), 24, 8, dict(ln=True, ln_bias=True, gate=True), torch.float32, kernel_devices()[0])
    run_with_grads(t, "gelu", torch.randn(5, 24).to(t["x"].device), "kernel")
    assert {name for name, _ in launched} == {n for n in dir(K) if n.endswith("_kernel")}


@needs_kernels
@pytest.mark.parametrize("torch_setting,dot_prec,tol_dtype", [("highest", "tf32x3", torch.float32),
                                                              ("high", "tf32", torch.float16)])
def test_fp32_precisions_match_float64(torch_setting, dot_prec, tol_dtype, monkeypatch):
    """fp32 dots follow torch's matmul precision (3xTF32 under "highest", TF32 under "high"), each within the
    tolerance it earns (TF32: fp16's 10 mantissa bits). The interpreter computes every precision in fp32."""
    from fastbridge.kernels import adapter_block as K
    from test_gated_attention import guarded_launches

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(torch_setting)
    try:
        launched = guarded_launches(monkeypatch, K)
        t = make_inputs((2, 19), 70, 13, dict(ln=True, ln_bias=True, gate=True), torch.float32, kernel_devices()[0])
        dy = torch.randn(2, 19, 70, generator=torch.Generator().manual_seed(1)).to(t["x"].device)
        y, grads = run_with_grads(t, "gelu", dy, "kernel")
    finally:
        torch.set_float32_matmul_precision(before)
    y64, g64 = reference64(t, "gelu", dy)
    assert_close(y, y64, tol_dtype, f"y ({dot_prec})")
    for n in grads:
        assert_close(grads[n], g64[n], tol_dtype, f"d{n} ({dot_prec})")
    assert {kwargs["DOT_PREC"] for _, kwargs in launched} == {dot_prec}


# ------------------------------------------------------------- found by adversarial testing (items 13-19)
@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=needs_kernels)])
def test_double_backward(backend):
    """Second order: the reference backend differentiates its backward; the fused backward raises in
    fastbridge's words instead of torch's generic "no autograd formula"."""
    device = "cpu" if backend == "reference" else kernel_devices()[0]
    t = make_inputs((5,), 24, 8, dict(ln=True, ln_bias=True, gate=True), torch.float32, device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in grad_leaves(t).items()}
    with fastbridge.use_backend(backend):
        y = call({**t, **leaves}, "gelu")
    gx, = torch.autograd.grad(y.square().sum(), leaves["x"], create_graph=True)
    if backend == "reference":
        assert torch.autograd.grad(gx.sum(), leaves["w_down"])[0].abs().sum() > 0
        return
    with pytest.raises(NotImplementedError, match="second-order gradients are not supported by "
                                                  r"fastbridge.ops.adapter_block; .*use_backend\('reference'\)"):
        torch.autograd.grad(gx.sum(), leaves["w_down"])


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=needs_kernels)])
def test_d1_with_odd_last_stride(backend):
    """d = 1 with a non-unit last stride (x and the incoming grad), which .contiguous() keeps for a size-1
    dim: the launcher used to fail with a bare AssertionError."""
    device = "cpu" if backend == "reference" else kernel_devices()[0]
    t = make_inputs((5,), 1, 3, dict(ln=False), torch.float32, device)
    t["x"] = torch.randn(1, 5).t().to(device)
    assert t["x"].stride(-1) != 1
    dy = torch.randn(1, 5).t().to(device)
    y, grads = run_with_grads(t, "gelu", dy, backend)
    y64, g64 = reference64(t, "gelu", dy)
    assert_close(y, y64, torch.float32, "y")
    for name in g64:
        assert_close(grads[name], g64[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("change,arg,fragment", [
    (dict(w_down=torch.randn(0, 16), w_up=torch.randn(16, 0), b_down=torch.randn(0)), "w_down", "r >= 1"),
    (dict(x=torch.randn(3, 4, 0), w_down=torch.randn(4, 0), w_up=torch.randn(0, 4), b_up=torch.randn(0),
          ln_weight=torch.randn(0), ln_bias=torch.randn(0)), "x", "d >= 1"),
    (dict(scale=float("nan")), "scale", "a float or a 0-d tensor"),
    (dict(scale=float("-inf")), "scale", "a float or a 0-d tensor"),
    (dict(scale=True), "scale", "a float or a 0-d tensor"),
])
def test_degenerate_arguments_name_the_argument(change, arg, fragment):
    t = {**_good(), **change}
    with pytest.raises(ValueError) as e:
        call(t, "gelu")
    msg = str(e.value)
    assert f"'{arg}'" in msg and fragment in msg, msg


@pytest.mark.parametrize("eps", [True, float("nan"), float("inf"), -1e-5, "1e-5"])
def test_bad_eps_names_the_argument(eps):
    with pytest.raises(ValueError, match="'eps' must be a positive float"):
        call(_good(), "gelu", eps=eps)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=needs_kernels)])
def test_numpy_scale_and_eps_work(backend):
    np = pytest.importorskip("numpy")
    device = "cpu" if backend == "reference" else kernel_devices()[0]
    t = make_inputs((3, 4), 16, 4, dict(ln=True, ln_bias=True, gate=True), torch.float32, device)
    with fastbridge.use_backend(backend):
        expect = call({**t, "scale": 0.5}, "gelu", eps=1e-5)
        for s, e in ((np.float32(0.5), np.float32(1e-5)), (np.float64(0.5), np.float64(1e-5))):
            got = call({**t, "scale": s}, "gelu", eps=e)
            assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
            torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("lead", [5, 0])
def test_opcheck_backward_odd_layouts(lead):
    """Fake and real backward outputs agree in shape, dtype and strides with strided rows, transposed
    weights (an (r, d) view of a (d, r) tensor) and a broadcast grad."""
    device = kernel_devices()[0]
    d, r = 24, 8
    t = make_inputs((lead,), 2 * d, r, dict(ln=True, ln_bias=True, gate=True), torch.float32, device)
    x = t["x"][:, ::2]
    w_down = (torch.randn(d, r) * d ** -0.5).t().to(device)
    w_up = (torch.randn(r, d) * r ** -0.5).t().to(device)
    ln_w, ln_b = t["ln_weight"][::2], t["ln_bias"][::2]
    s = torch.tanh(t["gate"].float()).reshape(())
    _, z, mean, rstd = torch.ops.fastbridge.adapter_block(x, w_down, None, w_up, None, ln_w, ln_b, 1e-5, "gelu", 1.0,
                                                         s, None)
    dy = torch.randn(1, d).to(device).expand(lead, d)
    args = (dy, x, w_down, w_up, None, ln_w, ln_b, "gelu", 1.0, s, z, mean, rstd, False)
    torch.library.opcheck(torch.ops.fastbridge.adapter_block_bwd.default, args)
    fwd_args = (x, w_down, None, w_up, None, ln_w, ln_b, 1e-5, "gelu", 1.0, s, None)
    torch.library.opcheck(torch.ops.fastbridge.adapter_block.default, fwd_args)
