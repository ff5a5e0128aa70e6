"""Every launch configuration of the Triton kernels compiles for the H100 (sm_90) without spills.

Runs without a GPU: Triton compiles to PTX and cubin with its bundled ptxas; cuobjdump reports the
stack frame (spills) and registers. A spilling configuration fails here before any GPU run. The
check runs in a subprocess without TRITON_INTERPRET (compiling needs real @triton.jit functions).
"""
import os
import subprocess
import sys
from pathlib import Path


def test_adapter_block_configs_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastbridge.sm90_check", "--arch", "90"], capture_output=True,
                          text=True, env=env, cwd=str(Path(__file__).parent), timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("adapter_")]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(lines) == 30 and "30 configurations, 0 spilling" in proc.stdout
    # Hopper tensor cores (wgmma) wherever the tile allows them (64-row tiles).
    assert all("wgmma=yes" in ln for ln in lines if "BM=64" in ln or "BN=64" in ln), proc.stdout
