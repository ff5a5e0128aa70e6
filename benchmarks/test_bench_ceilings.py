"""The two ceilings every kernel is judged against, measured once per device (BENCHMARKS.md).

  ceiling_copy    device-to-device copy of a large buffer: achievable HBM bandwidth (bytes read +
                  written per second) -- the denominator of every memory-bound floor.
  ceiling_matmul  a large square bf16 (and TF32) matmul through cuBLAS: achievable dense tensor-core
                  rate -- the denominator of every compute-bound floor.

Recorded in the same results JSON as the ops (op = "ceiling_copy" / "ceiling_matmul", provider
"torch"), so notes and plots can rescale nominal floors to measured ones. CUDA only.
"""
from __future__ import annotations

import pytest
import torch

from _harness import cuda_unavailable_reason

COPY_BYTES = (1 << 30,)  # 1 GiB source: far beyond L2, so it measures HBM
MATMUL_N = (8192,)

pytestmark = pytest.mark.skipif(cuda_unavailable_reason() is not None, reason=cuda_unavailable_reason() or "")


@pytest.mark.parametrize("nbytes", COPY_BYTES)
def test_ceiling_copy(fb_bench, nbytes):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    fb_bench.run(op="ceiling_copy", provider="torch", mode="fwd", dtype="bf16", shape={"bytes": nbytes},
                 fn=lambda: dst.copy_(src), device="cuda", nbytes=2 * nbytes)


@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
@pytest.mark.parametrize("n", MATMUL_N)
def test_ceiling_matmul(fb_bench, n, dtype):
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, dtype=torch_dtype, device="cuda")
    b = torch.randn(n, n, dtype=torch_dtype, device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        fb_bench.run(op="ceiling_matmul", provider="torch", mode="fwd", dtype=dtype, shape={"n": n},
                     fn=lambda: a @ b, device="cuda", flops=2.0 * n ** 3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
