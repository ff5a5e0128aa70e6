// Philox4x32-10 counter-based RNG (Salmon et al., SC'11; the generator of cuRAND and of PyTorch's
// CUDA dropout), shared by the CPU and CUDA kernels of fastbridge so that a dropout mask is a pure
// function of (seed, offset, element) on every device.
//
// Dropout scheme of qformer_cross_attention (documented in fastbridge/ops/qformer_cross_attention.py):
//   element (b, h, i, j) of the (B, H, Lq, Lk) probabilities, global row r = (b*H + h)*Lq + i,
//   counter = (j / 4, r, lo32(offset), hi32(offset)), key = (lo32(seed), hi32(seed)),
//   u = philox(counter, key)[j % 4],  keep  <=>  (u >> 8) < keep_threshold,
//   keep_threshold = ceil((1 - p) * 2^24)  (so P(keep) = keep_threshold / 2^24 = 1 - p up to 2^-24),
//   kept probabilities are scaled by 1 / (1 - p) (inverted dropout).
// One Philox call serves four consecutive keys of one query row: the kernels draw per group of 4 keys.
// No torch / std headers here: this file is included by the ISA-specific CPU translation units.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_HD static inline __attribute__((always_inline))
#endif

namespace fastbridge {

struct PhiloxOut {
  uint32_t x[4];
};

FB_HD uint32_t fb_mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  return (uint32_t)p;
#endif
}

// Philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1).
FB_HD PhiloxOut fb_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = fb_mulhilo32(M0, c0, &hi0);
    const uint32_t lo1 = fb_mulhilo32(M1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  PhiloxOut out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// The four draws of keys 4*group .. 4*group+3 of global query row `row`.
FB_HD PhiloxOut fb_dropout_draw(uint64_t seed, uint64_t offset, uint64_t row, uint64_t group) {
  return fb_philox4x32_10((uint32_t)group, (uint32_t)row, (uint32_t)offset, (uint32_t)(offset >> 32),
                          (uint32_t)seed, (uint32_t)(seed >> 32));
}

FB_HD bool fb_dropout_keep(uint32_t draw, uint32_t keep_threshold) {
  return (draw >> 8) < keep_threshold;
}

}  // namespace fastbridge
