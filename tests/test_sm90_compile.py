"""Launch configurations per GPU arch: every launch the launchers make (as Triton specialises it) compiles without
spills and within the arch's shared memory; on sm_90 the hot gated-attention kernels compile to wgmma only.

Runs without a GPU: Triton compiles to PTX and cubin with its bundled ptxas; cuobjdump reports the
stack frame (spills), registers and shared memory (python -m fastbridge.sm90_check). A spilling or
oversized configuration fails here before any GPU run. The check runs in a subprocess without
TRITON_INTERPRET (compiling needs real @triton.jit functions). sm_86 is not compiled here: its ptxas
output for these kernels is the same as sm_89's (same configurations, same limit); `--arch all` has it.
fp32 (TF32 and "highest" dots) is compiled for sm_80 and sm_89 with the configurations the launchers pick for
4-byte elements: within shared memory there (spills allowed: fp32 spills on every arch).

Also: the configuration functions pick the H100's configurations for sm_90 (and the interpreter) and their
own for sm_80 .. sm_89, those compute correctly (interpreter), and GPUs below 8.0 get the reference.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbridge import _backend
from fastbridge.kernels import _common
from fastbridge.kernels import adapter_block as AB
from fastbridge.kernels import gated_attention as GA

from conftest import assert_close, needs_interpreter

COMPILED_ARCHS = (80, 89, 90)
MIN_CONFIGS = 90  # distinct launches (by Triton specialisation) per arch; sm_90 adds the autotune candidates
N_GCA_CONFIGS = 44  # fastbridge/sm90_gated_cross_attention.py (gated cross-attention's own table)
FP32_ARCHS = (80, 89)
FP32_DTYPES = ("fp32-tf32", "fp32")


def _sections(stdout: str) -> dict:
    """sm90_check's output for several archs (or archs and dtypes), split at its "== sm_N [DTYPE]" headers: keyed
    by the arch, or by (arch, dtype)."""
    out, key = {}, None
    for ln in stdout.splitlines():
        if ln.startswith("== sm_"):
            arch, *dtype = ln.removeprefix("== sm_").split()
            key = (int(arch), dtype[0]) if dtype else int(arch)
            out[key] = []
        elif key is not None:
            out[key].append(ln)
    return out


# The check runs from the repository root: `python -m fastbridge.sm90_check` then compiles this checkout's
# fastbridge (from tests/ it imported whichever fastbridge is installed).
def _env_without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_kernel_configs_compile_without_spills_within_shared_memory():
    cmd = [sys.executable, "-m", "fastbridge.sm90_check", "--arch", *map(str, COMPILED_ARCHS),
           "--jobs", str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_interpreter(),
                          cwd=str(Path(__file__).parent.parent), timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sections = _sections(proc.stdout)
    assert sorted(sections) == sorted(COMPILED_ARCHS), proc.stdout[-4000:]
    for arch, text in sections.items():
        lines = [ln for ln in text if ln.startswith(("adapter_", "gated_attn_", "gca_"))]
        summary = "\n".join(ln for ln in text if not ln.startswith(("adapter_", "gated_attn_", "gca_")))
        assert len(lines) >= MIN_CONFIGS and f"{len(lines)} configurations, 0 spilling" in summary, (arch, summary)
        assert sum(ln.startswith("gca_") for ln in lines) == N_GCA_CONFIGS, arch
        limit = _common.SMEM_PER_BLOCK[arch]
        assert f"shared memory: 0 above sm_{arch}'s {limit} B per block" in summary, (arch, summary)
        assert not any("SHARED MEMORY" in ln or "NOT WGMMA" in ln for ln in lines), arch
        # every kernel, the decode shapes (packed and not) and the adapter's N-dependent row tiles are compiled
        for part in ("adapter_fwd", "adapter_bwd_rows", "adapter_bwd_weights", "gated_attn_fwd ", "gated_attn_fwd_split",
                     "gated_attn_fwd_combine", "gated_attn_bwd_pre", "gated_attn_bwd_dkdv ", "gated_attn_bwd_dkdv_atomic",
                     "gated_attn_bwd_dq ", "gated_attn_bwd_dq_acc", "decode MHA", "N=2048 BM=32"):
            assert any(part in ln for ln in lines), (arch, part)
    # Hopper: every hot kernel whose tiles allow wgmma (M >= 64 rows) compiles all its matmuls to wgmma, the
    # autotune's candidates too; the key-major dK/dV kernel at D = 128 among them.
    lines = [ln for ln in sections[90] if ln.startswith(("adapter_", "gated_attn_", "gca_"))]
    hot = re.search(r"wgmma: 0 of (\d+) hot kernels with mma.sync matmuls", "\n".join(sections[90]))
    assert hot and int(hot.group(1)) >= 30, sections[90][-4:]
    dkdv = [ln for ln in lines if ln.startswith("gated_attn_bwd_dkdv ") and "D=128 L=4096 BM" in ln]
    assert len(dkdv) == 1 and " mma.sync=  0" in dkdv[0] and " wgmma=  0" not in dkdv[0], dkdv
    assert sum("tune#" in ln for ln in lines) >= 12, "autotune candidates not compiled"


def test_report_fails_a_hot_kernel_with_mma_sync_on_hopper_only(capsys):
    from fastbridge.sm90_check import Resources, report

    hot = Resources("gated_attn_bwd_dkdv", "D=128", 200, 0, 0, 0, 50000, 4, 32, wgmma_exempt=None)
    exempt = Resources("gated_attn_fwd", "decode", 100, 0, 0, 0, 40000, 0, 44, wgmma_exempt="M tile 16 < 64")
    clean = Resources("gated_attn_bwd_dq", "D=128", 160, 0, 0, 0, 90000, 69, 0, wgmma_exempt=None)
    assert report(90, [hot, exempt, clean]) == 1
    out = capsys.readouterr().out
    assert "NOT WGMMA" in out.splitlines()[0] and "NOT WGMMA" not in out.splitlines()[1]
    assert "wgmma: 1 of 2 hot kernels with mma.sync matmuls" in out
    assert report(80, [hot, exempt, clean]) == 0  # mma.sync is all sm_80 has


def test_the_check_compiles_the_specialisations_that_launch():
    """Triton specialises integer arguments equal to 1 (a constant) and multiples of 16 (divisibility): the check
    binds each recorded launch with Triton's own binder -- decode compiles with Lq = 1 folded in, training with
    Lq, Lk divisible by 16 -- not a neighbouring compile."""
    code = (
        "from fastbridge import sm90_check as S\n"
        "from triton.compiler import make_backend\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.runtime.jit import create_function_from_signature\n"
        "b = make_backend(GPUTarget('cuda', 90, 32))\n"
        "for l in S.gated_attention_launches(90):\n"
        "    if l.name == 'gated_attn_fwd' and l.config.startswith(('D=64 L=4096 BM', 'D=64 decode Lk=200')):\n"
        "        _, spec, _ = create_function_from_signature(l.fn.signature, l.fn.params, b)(*l.args, **l.kwargs)\n"
        "        sp = dict(zip(l.fn.arg_names, spec))\n"
        "        print(l.config.split(' BM')[0], '|', sp['Lq'], '|', sp['Lk'], '|', sp['GROUP'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env_without_interpreter(),
                          cwd=str(Path(__file__).parent.parent), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(ln.split(" | ", 1) for ln in proc.stdout.splitlines())
    assert rows["D=64 L=4096"] == "('i32', 'D') | ('i32', 'D') | ('i32', '')", rows
    assert rows["D=64 decode Lk=200"].startswith("('constexpr', 1) | ('i32', '')"), rows


def test_fp32_configs_fit_shared_memory_on_sm80_and_sm89():
    """fp32 tiles take twice the bytes: the launchers pick configurations for 4-byte elements (fewer stages,
    smaller tiles) that fit sm_89's 99 KB and sm_80's 163 KB per block (with the 2-byte ones, 19-20 did not on
    sm_89 and 2 on sm_80: OutOfResources at launch). Spills are allowed in fp32."""
    cmd = [sys.executable, "-m", "fastbridge.sm90_check", "--arch", *map(str, FP32_ARCHS), "--dtype", *FP32_DTYPES,
           "--allow-spills", "--jobs", str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_interpreter(),
                          cwd=str(Path(__file__).parent.parent), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sections = _sections(proc.stdout)
    assert sorted(sections) == sorted((a, d) for a in FP32_ARCHS for d in FP32_DTYPES), proc.stdout[-4000:]
    for (arch, dtype), text in sections.items():
        lines = [ln for ln in text if ln.startswith(("adapter_", "gated_attn_", "gca_"))]
        summary = "\n".join(ln for ln in text if not ln.startswith(("adapter_", "gated_attn_", "gca_")))
        assert len(lines) >= MIN_CONFIGS - 10 and f"{len(lines)} configurations, " in summary, (arch, dtype, summary)
        limit = _common.SMEM_PER_BLOCK[arch]
        assert f"shared memory: 0 above sm_{arch}'s {limit} B per block" in summary, (arch, dtype, summary)
        assert not any("SHARED MEMORY" in ln for ln in lines), (arch, dtype)


# ----------------------------------------------------------------------- configuration functions (CPU)
# The H100 (sm_90) configurations, pinned: also what every arch >= 90 and the interpreter get.
H100_FWD = {(16, 4096): (128, 64, 8, 2), (64, 4096): (128, 64, 8, 2), (128, 4096): (128, 64, 8, 2),
            (256, 4096): (64, 32, 8, 2), (64, 64): (64, 64, 4, 2), (128, 64): (64, 64, 8, 2),
            (16, 1): (16, 32, 4, 2), (128, 1): (16, 64, 4, 2),
            (256, 1): (16, 32, 4, 2)}
H100_BWD = {
    32: {"pre": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2)},
    64: {"pre": (64, 64, 4, 2), "dkdv": (64, 64, 8, 2), "dq": (64, 64, 4, 2)},
    128: {"pre": (32, 0, 8, 1), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 8, 2)},
    256: {"pre": (32, 32, 8, 1), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)},
}
H100_ROWS = {(64, 4096): (64, 128, 8), (128, 4096): (64, 64, 8), (256, 4096): (16, 64, 8), (256, 48): (16, 64, 8)}
H100_WEIGHTS = {(16, True): (64, 64, 16, 8), (64, True): (64, 64, 64, 8), (64, False): (64, 64, 64, 8),
                (128, False): (64, 32, 128, 8), (128, True): (64, 32, 128, 8), (256, False): (32, 32, 256, 8),
                (256, True): (64, 32, 128, 8)}
# sm_80 / sm_86 / sm_89 (mma.sync): only what differs from the H100's.
PRE_HOPPER_FWD = {(64, 4096): (64, 64, 8, 2), (128, 4096): (64, 64, 8, 2), (256, 4096): (32, 32, 8, 2),
                  (64, 64): (32, 64, 8, 2), (128, 64): (32, 64, 8, 2)}
PRE_HOPPER_BWD = {
    32: {"pre": (32, 0, 4, 2), "dkdv": (64, 32, 8, 2), "dq": (32, 64, 8, 2)},
    64: {"pre": (32, 0, 4, 2), "dkdv": (64, 32, 8, 2), "dq": (32, 64, 8, 2)},
    128: {"dkdv": (32, 64, 8, 1), "dq": (32, 64, 8, 2)},
    256: {"dq": (16, 32, 8, 1), "dkdv": (16, 32, 8, 1)},
}
PRE_HOPPER_ROWS = {(256, 4096): (16, 32, 8), (256, 48): (16, 32, 8)}
PRE_HOPPER_WEIGHTS = {(16, True): (16, 64, 16, 8), (64, True): (16, 64, 32, 8), (128, False): (64, 32, 64, 8),
                      (128, True): (16, 64, 32, 8), (256, False): (32, 32, 64, 8), (256, True): (16, 64, 32, 8)}


def _expected(arch):
    if not _common.pre_hopper(arch):
        return H100_FWD, H100_BWD, H100_ROWS, H100_WEIGHTS
    return ({**H100_FWD, **PRE_HOPPER_FWD}, {d: {**c, **PRE_HOPPER_BWD[d]} for d, c in H100_BWD.items()},
            {**H100_ROWS, **PRE_HOPPER_ROWS}, {**H100_WEIGHTS, **PRE_HOPPER_WEIGHTS})


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0)], ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_config_functions_pick_per_arch(cap):
    arch = 10 * cap[0] + cap[1]
    assert _common.pre_hopper(arch) == (cap < (9, 0))
    fwd, bwd, rows, weights = _expected(arch)
    assert {k: GA.fwd_config(*k, arch) for k in fwd} == fwd
    assert {d: GA.bwd_config(d, arch) for d in bwd} == bwd
    assert {k: AB._row_config(*k, arch) for k in rows} == rows
    assert {k: AB._weights_config(*k, arch) for k in weights} == weights
    assert GA.combine_warps(16, 64) == 4 and GA.combine_warps(16, 128) == 8  # the same on every arch


# fp32 (4-byte elements): only what differs from the 2-byte configurations of that arch. sm_90 (232 KB): none.
FP32_SMALL_SMEM_FWD = {(128, 4096): (64, 32, 8, 2), (128, 64): (32, 32, 8, 2), (256, 4096): (32, 32, 8, 1)}
FP32_SMALL_SMEM_BWD = {128: {"dkdv": (16, 32, 8, 1), "dq": (32, 64, 4, 1)},
                       256: {"pre": (16, 32, 8, 1), "dkdv": (16, 16, 8, 1)}}
FP32_SMALL_SMEM_ROWS = {(64, 4096): (64, 64, 8)}
FP32_SM80_BWD = {256: {"pre": (16, 32, 8, 1), "dkdv": (16, 32, 8, 1)}}


@pytest.mark.parametrize("arch", [80, 86, 89, 90, 100])
def test_config_functions_for_4_byte_elements(arch):
    fwd, bwd, rows, weights = _expected(arch)
    # elem_size=2 (the default) is the 2-byte configuration on every arch.
    assert {k: GA.fwd_config(*k, arch, 2) for k in fwd} == fwd
    assert {d: GA.bwd_config(d, arch, 2) for d in bwd} == bwd
    assert {k: AB._row_config(*k, arch, 2) for k in rows} == rows
    assert AB._num_stages(arch) == AB._num_stages(arch, 2) == 3
    small = arch in (86, 89)
    if small:
        fwd = {**fwd, **FP32_SMALL_SMEM_FWD}
        bwd = {d: {**c, **FP32_SMALL_SMEM_BWD.get(d, {})} for d, c in bwd.items()}
        rows = {**rows, **FP32_SMALL_SMEM_ROWS}
    elif arch == 80:
        bwd = {d: {**c, **FP32_SM80_BWD.get(d, {})} for d, c in bwd.items()}
    assert {k: GA.fwd_config(*k, arch, 4) for k in fwd} == fwd
    assert {d: GA.bwd_config(d, arch, 4) for d in bwd} == bwd
    assert {k: AB._row_config(*k, arch, 4) for k in rows} == rows
    # the weight-gradient tiles take no element size: fp32 runs the same ones (2 stages on 99 KB, below)
    assert {k: AB._weights_config(*k, arch) for k in weights} == weights
    assert AB._num_stages(arch, 4) == (2 if small else 3)
    assert _common.small_smem(arch, 4) == small and not _common.small_smem(arch, 2)


def test_default_arch_is_the_h100s_and_the_interpreter_uses_it(monkeypatch):
    assert GA.fwd_config(128, 4096) == GA.fwd_config(128, 4096, 90) == H100_FWD[(128, 4096)]
    assert GA.bwd_config(64) == H100_BWD[64] and AB._weights_config(256, True) == H100_WEIGHTS[(256, True)]
    assert _common.device_arch(torch.device("cpu")) == 90
    calls = []

    def capability(index):
        calls.append(index)
        return (8, 6)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    _common._capability_arch.cache_clear()
    try:
        assert _common.device_arch(torch.device("cuda", 3)) == 86
        assert _common.device_arch(torch.device("cuda", 3)) == 86
        assert calls == [3]  # cached per device
    finally:
        _common._capability_arch.cache_clear()


def test_gpus_below_compute_capability_8_get_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = _backend.triton_unavailable_reason(torch.device("cuda", 0))
    assert reason is not None and ">= 8.0" in reason and "cuda:0 (Tesla T4) has 7.5" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert _backend.triton_unavailable_reason(torch.device("cuda", 0)) is None


def test_fp32_tf32_backward_that_fits_no_tile_gets_the_reference():
    """The one known case no configuration fits (Triton < 3.9: fp32 with TF32 dots, D > 128, backward, on a
    99 KB GPU) is named, so the op runs the reference instead of failing at launch; nothing else is."""
    gap = GA.shared_memory_gap
    reason = gap(89, 4, 256, "tf32", True, "3.6.0")
    assert reason is not None and "114688" in reason and "sm_89 allows 101376" in reason and "3.6.0" in reason
    assert gap(86, 4, 256, "tf32", True, "3.8.1") is not None
    for args in [(89, 4, 256, "tf32", True, "3.9.0"), (89, 4, 256, "ieee", True, "3.6.0"),
                 (89, 4, 256, "tf32", False, "3.6.0"), (89, 4, 128, "tf32", True, "3.6.0"),
                 (89, 2, 256, "ieee", True, "3.6.0"), (80, 4, 256, "tf32", True, "3.6.0"),
                 (90, 4, 256, "tf32", True, "3.6.0")]:
        assert gap(*args) is None, args


# ------------------------------------------------- the sm_80 .. sm_89 configurations compute correctly
# The interpreter (CPU) launches with the configuration functions' arch-80 picks for 2-byte elements, computed
# in fp32 against the float64 reference, every gradient, both dQ modes. Cases reach each configuration that
# differs from the H100's. Then a few cases with sm_80's and sm_89's fp32 (4-byte) picks, as an A100 or an
# RTX 4090 runs fp32.
GA_CASES = [  # (B, H, Hkv, Lq, Lk, P, D, options), as tests/test_gated_attention.py
    pytest.param(1, 2, 1, 80, 80, 4, 64, dict(), id="d64-train-tile"),
    pytest.param(3, 4, 1, 21, 21, 1, 64, dict(kpm=True, gate="scalar"), id="d64-short-Lq-pad"),
    pytest.param(1, 2, 2, 33, 33, 17, 128, dict(per_sample=True, kpm=True), id="d128"),
    pytest.param(1, 2, 1, 24, 40, 3, 256, dict(), id="d256"),
    pytest.param(2, 4, 2, 37, 37, 3, 32, dict(), id="d32-gqa"),
    pytest.param(1, 4, 2, 5, 777, 4, 16, dict(kpm="partial", per_sample=True), id="d16-decode-split"),
]
AB_CASES = [  # (lead shape, d, r, activation, options), as tests/test_adapter_block.py
    pytest.param((2, 19), 70, 13, "gelu", dict(ln=True, ln_bias=True, gate=True), id="ln-r16"),
    pytest.param((21,), 257, 64, "gelu_tanh", dict(ln=True, ln_bias=True, scale=0.5), id="ln-r64-two-r-tiles"),
    pytest.param((9,), 64, 256, "gelu", dict(gate=True, residual=True), id="r256-r-tiled"),
    pytest.param((11,), 96, 200, "gelu", dict(ln=True, ln_bias=True), id="ln-r200"),
    pytest.param((37,), 130, 100, "silu", dict(tensor_scale=True), id="r128-r-tiled"),
]


@pytest.fixture
def arch80(monkeypatch):
    monkeypatch.setattr(GA, "device_arch", lambda device: 80)
    monkeypatch.setattr(AB, "device_arch", lambda device: 80)
    # the 2-byte configurations (bf16 / fp16 runs), although the inputs are fp32
    for name in ("fwd_config", "bwd_config"):  # (..., arch, elem_size) -> elem_size 2
        real = getattr(GA, name)
        monkeypatch.setattr(GA, name, lambda *args, _real=real: _real(*args[:-1], 2))
    monkeypatch.setattr(AB, "small_smem", lambda arch, elem_size: False)


@pytest.fixture(params=[80, 89], ids=lambda a: f"sm_{a}")
def fp32_arch(request, monkeypatch):
    arch = request.param
    monkeypatch.setattr(GA, "device_arch", lambda device: arch)
    monkeypatch.setattr(AB, "device_arch", lambda device: arch)
    calls = []
    real = GA.bwd_config
    monkeypatch.setattr(GA, "bwd_config", lambda *a: calls.append(a) or real(*a))
    yield arch
    assert all(a[1:] == (arch, 4) for a in calls)  # the launchers passed fp32's element size


@needs_interpreter
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,P,D,opts", GA_CASES)
def test_gated_attention_with_pre_hopper_configs(arch80, monkeypatch, dq_mode, B, H, Hkv, Lq, Lk, P, D, opts):
    import test_gated_attention as T

    monkeypatch.setenv("FASTBRIDGE_GA_DQ", dq_mode)
    dtype = torch.float32
    t, kw = T.make_inputs(B, H, Hkv, Lq, Lk, P, D, opts, dtype, "cpu")
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, grads = T.run(t, kw, dout, "kernel")
    out64, g64 = T.reference64(t, kw, dout)
    assert_close(out, out64, dtype, "out")
    for n in T.NAMES:
        assert_close(grads[n], g64[n], dtype, f"d{n}")


@needs_interpreter
@pytest.mark.parametrize("lead,d,r,activation,opts", AB_CASES)
def test_adapter_block_with_pre_hopper_configs(arch80, lead, d, r, activation, opts):
    import test_adapter_block as T

    dtype = torch.float32
    t = T.make_inputs(lead, d, r, opts, dtype, "cpu")
    dy = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, grads = T.run_with_grads(t, activation, dy, "kernel")
    y64, g64 = T.reference64(t, activation, dy)
    assert_close(y, y64, dtype, "y")
    assert set(grads) == set(g64)
    for name in g64:
        assert_close(grads[name], g64[name], dtype, f"d{name}")


GA_FP32_CASES = [c for c in GA_CASES if c.id in ("d128", "d256")]
AB_FP32_CASES = [c for c in AB_CASES if c.id in ("ln-r64-two-r-tiles", "r128-r-tiled")]


@needs_interpreter
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,P,D,opts", GA_FP32_CASES)
def test_gated_attention_with_pre_hopper_fp32_configs(fp32_arch, monkeypatch, dq_mode, B, H, Hkv, Lq, Lk, P, D, opts):
    test_gated_attention_with_pre_hopper_configs(None, monkeypatch, dq_mode, B, H, Hkv, Lq, Lk, P, D, opts)


@needs_interpreter
@pytest.mark.parametrize("lead,d,r,activation,opts", AB_FP32_CASES)
def test_adapter_block_with_pre_hopper_fp32_configs(fp32_arch, lead, d, r, activation, opts):
    test_adapter_block_with_pre_hopper_configs(None, lead, d, r, activation, opts)
