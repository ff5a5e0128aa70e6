"""Every launch configuration of the Triton kernels compiles for the H100 (sm_90) without spills.

Runs without a GPU: Triton compiles to PTX and cubin with its bundled ptxas; cuobjdump reports the
stack frame (spills) and registers. A spilling configuration fails here before any GPU run. The
check runs in a subprocess without TRITON_INTERPRET (compiling needs real @triton.jit functions).
"""
import os
import subprocess
import sys
from pathlib import Path


def test_kernel_configs_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastbridge.sm90_check", "--arch", "90"], capture_output=True,
                          text=True, env=env, cwd=str(Path(__file__).parent), timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("adapter_", "gated_attn_"))]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(lines) == 75 and "75 configurations, 0 spilling" in proc.stdout, proc.stdout[-4000:]
    # Hopper tensor cores (wgmma) wherever the row tile allows them (>= 64 rows).
    big_tile = [ln for ln in lines if any(f"{k}={n} " in ln for k in ("BM", "BN") for n in (64, 128))
                and not ("BM=16 " in ln or "BM=32 " in ln)]
    assert big_tile and all("wgmma=yes" in ln for ln in big_tile), "\n".join(big_tile)
