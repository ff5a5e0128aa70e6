// The schemas of fastbridge's C++/CUDA ops: the one TORCH_LIBRARY(fastbridge, m) of the extension.
// Kernels: qformer_cross_attention_cpu.cpp (CPU), qformer_cross_attention_cuda.cu (CUDA). Autograd
// and fake (meta) implementations are registered from Python, in the module named below, which
// torch imports when it needs them.
//
// qformer_attn_fwd: out = softmax(q k^T * scale + mask) v with inverted dropout on the probabilities;
//   q (B or 1, H, Lq, D), k, v (B, H, Lk, D), key_mask bool (B, Lk) (true = attend), bias float
//   broadcastable to (B, H, Lq, Lk) (additive), rng int64 [seed, offset] (Philox, csrc/philox.h)
//   when dropout_p > 0, on the CPU or on q's device (CUDA: read by the kernels, so a CUDA graph replay
//   uses the values drawn anew into it; a host rng is refused under stream capture), allow_tf32: fp32
//   on CUDA with one TF32 product instead of 3xTF32.
//   Returns out (B, H, Lq, D) and the softmax statistics stats (B, H, Lq, 2) float32: per query row
//   the max m of the scaled, masked scores and log l, l = sum exp(s - m) (m = +inf for a row that sees
//   no key; its output is 0). Two numbers, not lse = m + log l, which rounds to m under a huge finite
//   mask (qformer_params.h).
// qformer_attn_bwd: (dq, dk, dv) from the saved out and stats (the probabilities are recomputed and the
//   dropout mask replayed from rng).
// qformer_dropout_keep: the keep mask (B, H, Lq, Lk) the kernels apply for rng (tests, debugging).
// qformer_cpu_isa: the CPU kernel instance in use (0 baseline, 1 AVX2, 2 AVX-512).
// qformer_cuda_smem_bytes: dynamic shared memory per block of the smallest CUDA launch for dtype and
//   head dim D (forward: 32-row tiles; backward: dQ in global memory), -1 where no CUDA kernel exists
//   for them; dq_in_smem: the backward that keeps dQ in shared memory (Lq <= 64, where the device
//   allows it). Known in every build (qformer_cuda_layout.h), so the Python op can check a device's
//   limit before it launches.
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include "qformer_cuda_layout.h"

namespace fastbridge {
int64_t qformer_cpu_isa();

int64_t qformer_cuda_smem_bytes(c10::ScalarType dtype, int64_t D, bool backward, bool dq_in_smem) {
  TORCH_CHECK(backward || !dq_in_smem, "fastbridge::qformer_cuda_smem_bytes: dq_in_smem is a backward launch");
  const bool half = dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16;
  if (!half && dtype != c10::ScalarType::Float) return -1;
  if (!half && D == 128) return -1;  // fp32 at D = 128 is not built (it would not fit an A100)
  const int launch = !backward ? cuda_layout::kFwdWarpsSmall : dq_in_smem ? cuda_layout::kBwdDqSmem : cuda_layout::kBwd;
  return cuda_layout::smem_bytes(half ? 2 : 4, D, launch);
}
}  // namespace fastbridge

TORCH_LIBRARY(fastbridge, m) {
  m.set_python_module("fastbridge.ops.qformer_cross_attention");
  m.def(
      "qformer_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? bias, float scale, "
      "float dropout_p, Tensor? rng, bool allow_tf32) -> (Tensor out, Tensor stats)");
  m.def(
      "qformer_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor? key_mask, "
      "Tensor? bias, float scale, float dropout_p, Tensor? rng, bool allow_tf32) -> (Tensor dq, Tensor dk, "
      "Tensor dv)");
  m.def("qformer_dropout_keep(Tensor like, Tensor rng, int Lk, float dropout_p) -> Tensor");
  m.def("qformer_cpu_isa() -> int", &fastbridge::qformer_cpu_isa);
  m.def("qformer_cuda_smem_bytes(ScalarType dtype, int D, bool backward, bool dq_in_smem=False) -> int",
        &fastbridge::qformer_cuda_smem_bytes);
}
