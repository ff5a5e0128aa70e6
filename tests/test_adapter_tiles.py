"""adapter_block row tiles from N and the SM count, and the stored activation (kernel review, item 7): against the
float64 reference in the interpreter (the CPU stand-in has 4 SMs: kernels/_common.sm_count), every gradient."""
from __future__ import annotations

import pytest
import torch

from fastbridge.kernels import adapter_block as AB

from conftest import assert_close, kernel_cases, needs_kernels

import test_adapter_block as T


def test_row_tile_from_rows_and_sms():
    assert AB.row_tile(64, 4096, 132) == 32  # 64 programs would leave half the H100 idle; 128 with 32 rows
    assert AB.row_tile(64, 8192, 132) == 64  # 128 programs of 64 rows: >= 90 % of the SMs already
    assert AB.row_tile(64, 4096, 58) == 64
    assert AB.row_tile(16, 100, 132) == 16  # only the 64-row tiles are halved
    # the launch configuration passes them through; without N / SMs it is the arch's table
    assert AB._row_config(64, 4096, 90, 2, 4096, 132)[0] == 32
    assert AB._row_config(64, 4096, 90, 2) == AB._row_config(64, 4096, 90, 2, 10 ** 6, 132)


# (lead shape, d, r, activation, options): N = 300 keeps 64-row tiles on the 4-SM stand-in, N = 50 takes 32.
CASES = [
    pytest.param((300,), 96, 24, "gelu", dict(ln=True, ln_bias=True, gate=True), id="64-row-tiles"),
    pytest.param((5, 10), 70, 13, "silu", dict(residual=True), id="32-row-tiles"),
    pytest.param((3, 100), 40, 100, "gelu_tanh", dict(ln=True), id="r128-64-row-tiles"),
]


@needs_kernels
@pytest.mark.parametrize("device,dtype", kernel_cases())
@pytest.mark.parametrize("lead,d,r,activation,opts", CASES)
def test_row_tiles_and_stored_activation_match_float64(device, dtype, lead, d, r, activation, opts, monkeypatch):
    n = 1
    for x in lead:
        n *= x
    picked = []
    real = AB._row_config
    monkeypatch.setattr(AB, "_row_config", lambda *a: picked.append(real(*a)[0]) or real(*a))
    t = T.make_inputs(lead, d, r, opts, dtype, device)
    dy = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    y, grads = T.run_with_grads(t, activation, dy, "kernel")
    y64, g64 = T.reference64(t, activation, dy)
    assert_close(y, y64, dtype, "y")
    assert set(grads) == set(g64)
    for name in g64:
        assert_close(grads[name], g64[name], dtype, f"d{name}")
    assert picked and set(picked) == {64 if n >= 193 else 32}
