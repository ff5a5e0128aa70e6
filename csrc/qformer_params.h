// Plain parameter blocks of the Q-Former cross-attention kernels (no torch headers: shared by the
// ISA-specific CPU translation units and the CUDA kernels).
//
// Shapes: q (Bq, H, Lq, D) with Bq in {1, B} (Bq = 1: stride 0 over the batch), k, v (B, H, Lk, D);
// every stride is in elements and the last dimension (D) of q, k, v, out, dout is contiguous.
// key_mask: bool (B, Lk), true = attend.  bias: float32, broadcast (stride 0) to (B, H, Lq, Lk).
// out (B, H, Lq, D) contiguous; stats (B, H, Lq, 2) float32 contiguous: per query row of the scaled,
// masked scores the max m and log l, l = sum_j exp(s_j - m) (natural units; m = +inf, log l = 0 for a
// row with no visible key: its output is 0). Kept apart, not as lse = m + log l: under a huge finite
// mask (HF's finfo.min at every key of a row) m + log l rounds to m and P = exp(s - lse) would be 1.
// The backward recomputes P = exp((s - m) - log l).
#pragma once

#include <stdint.h>

namespace fastbridge {

enum class ElemType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct QfStrides {
  int64_t b, h, l;  // the last dimension is contiguous
};

struct QfParams {
  ElemType dtype;
  int64_t B, H, Lq, Lk, D;
  const void* q;
  QfStrides sq;
  const void* k;
  QfStrides sk;
  const void* v;
  QfStrides sv;
  const bool* key_mask;  // nullptr = none
  int64_t km_b, km_k;
  const float* bias;  // nullptr = none
  int64_t bs_b, bs_h, bs_q, bs_k;
  float scale;
  // dropout (p > 0): Philox seed / offset (philox.h), keep threshold, 1 / (1 - p). The seed / offset
  // come from a host rng tensor (read into seed / offset by the host), or from a device rng tensor
  // (rng_dev = [seed, offset] on the kernel's device, read by the kernels: CUDA-graph safe).
  float dropout_p;
  uint32_t keep_threshold;
  float rescale;
  uint64_t seed, offset;
  const int64_t* rng_dev;  // nullptr: seed / offset above
  // forward outputs / backward inputs
  void* out;  // (B, H, Lq, D) contiguous
  float* stats;  // (B, H, Lq, 2): m, log l
  // backward
  const void* dout;
  QfStrides sdo;
  void* dq;        // (B, H, Lq, D) with strides sdq, dtype; or nullptr when dq_acc is used
  QfStrides sdq;
  float* dq_acc;   // float32 (B, H, Lq, D) contiguous per-batch dq, scaled (query broadcast: summed by the caller)
  float* dq_work;  // CUDA backward with dQ in global memory: float32 (B, H, ceil(Lq / 32) * 32, D) scratch
  void* dk;        // (B, H, Lk, D) with strides sdk (the gradients follow the inputs' layouts)
  QfStrides sdk;
  void* dv;
  QfStrides sdv;
  float* delta;    // CUDA scratch (B, H, Lq): rowsum(dout * out)
  bool allow_tf32;  // CUDA fp32: one TF32 product (true) or the 3xTF32 split (fp32-accurate)
};

}  // namespace fastbridge
