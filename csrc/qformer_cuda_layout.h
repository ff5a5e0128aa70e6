// Shared-memory layouts (byte offsets) of the CUDA kernels in qformer_cross_attention_cuda.cu, in plain
// C++ so that every build -- the CPU-only one too -- can say how much shared memory a CUDA launch needs
// (fastbridge::qformer_cuda_smem_bytes, ops.cpp). The Python op compares that with the device's opt-in
// limit and runs the reference where a launch would not fit (a 99 KB RTX 30xx / 40xx, say), instead
// of failing at launch. No torch / CUDA headers.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace fastbridge {
namespace cuda_layout {

constexpr int kBN = 64;        // keys per tile
constexpr int kBMQ = 32;       // query rows per backward tile
constexpr int kBwdWarps = 4;   // warps of the backward kernel
constexpr int kFwdWarpsSmall = 2;  // forward: 32 query rows per block
constexpr int kFwdWarpsLarge = 4;  // forward: 64 query rows per block (Lq > 32, where it fits)

constexpr size_t align128c(size_t x) { return (x + 127) / 128 * 128; }

// ES: bytes per element of q / k / v (2: fp16 / bf16, 4: fp32). Tiles of ES-byte elements are padded by
// 16 bytes a row (bank conflicts of the WMMA fragment loads), fp32 tiles by 4 floats.
template <int ES, int D, int NW>
struct FwdSmem {
  static constexpr int PAD = 16 / ES;
  static constexpr int BM = 16 * NW;
  static constexpr int LDT = D + PAD;     // Q, K, V tiles
  static constexpr int LDS = kBN + 4;     // fp32 scores
  static constexpr int LDP = kBN + PAD;   // probabilities (ES bytes)
  static constexpr int LDO = D + 4;       // fp32 output accumulator
  static constexpr size_t q = 0;
  static constexpr size_t k = q + align128c(size_t(ES) * BM * LDT);
  static constexpr size_t v = k + align128c(size_t(ES) * kBN * LDT);
  static constexpr size_t s = v + align128c(size_t(ES) * kBN * LDT);
  static constexpr size_t pr = s + align128c(sizeof(float) * BM * LDS);
  static constexpr size_t o = pr + align128c(size_t(ES) * BM * LDP);
  static constexpr size_t m = o + align128c(sizeof(float) * BM * LDO);
  static constexpr size_t l = m + align128c(sizeof(float) * BM);
  static constexpr size_t a = l + align128c(sizeof(float) * BM);
  static constexpr size_t kadd = a + align128c(sizeof(float) * BM);
  static constexpr size_t total = kadd + align128c(sizeof(float) * kBN);
};

template <int ES, int D>
struct BwdSmem {
  static constexpr int PAD = 16 / ES;
  static constexpr int LDT = D + PAD;     // K, V, Q, dO tiles
  static constexpr int LDQ = kBMQ + 4;    // fp32 S^T, dP^T (keys x queries)
  static constexpr int LDQT = kBMQ + PAD;  // Pd^T, dS^T (ES bytes)
  static constexpr int LDO = D + 4;       // fp32 dK / dV accumulators
  static constexpr size_t k = 0;
  static constexpr size_t v = k + align128c(size_t(ES) * kBN * LDT);
  static constexpr size_t q = v + align128c(size_t(ES) * kBN * LDT);
  static constexpr size_t dout = q + align128c(size_t(ES) * kBMQ * LDT);
  static constexpr size_t dk = dout + align128c(size_t(ES) * kBMQ * LDT);
  static constexpr size_t dv = dk + align128c(sizeof(float) * kBN * LDO);
  static constexpr size_t stats = dv + align128c(sizeof(float) * kBN * LDO);  // m then log l (kBMQ each)
  static constexpr size_t delta = stats + align128c(sizeof(float) * 2 * kBMQ);
  static constexpr size_t st = delta + align128c(sizeof(float) * kBMQ);
  static constexpr size_t dpt = st + align128c(sizeof(float) * kBN * LDQ);
  static constexpr size_t pdt = dpt + align128c(sizeof(float) * kBN * LDQ);
  static constexpr size_t dst = pdt + align128c(size_t(ES) * kBN * LDQT);
  static constexpr size_t kadd = dst + align128c(size_t(ES) * kBN * LDQT);
  static constexpr size_t total = kadd + align128c(sizeof(float) * kBN);
};

template <int ES, int D>
constexpr int64_t smem_bytes_d(int nw) {
  return nw == 0 ? int64_t(BwdSmem<ES, D>::total)
                 : int64_t(nw == kFwdWarpsSmall ? FwdSmem<ES, D, kFwdWarpsSmall>::total
                                                : FwdSmem<ES, D, kFwdWarpsLarge>::total);
}

template <int ES>
constexpr int64_t smem_bytes_es(int64_t D, int nw) {
  return D == 32 ? smem_bytes_d<ES, 32>(nw) : D == 64 ? smem_bytes_d<ES, 64>(nw)
                                            : D == 128 ? smem_bytes_d<ES, 128>(nw) : -1;
}

// Bytes of dynamic shared memory of one block: nw = 0 the backward, else the forward with nw warps.
// -1 for a head dim the kernels are not built for.
constexpr int64_t smem_bytes(int elem_size, int64_t D, int nw) {
  return elem_size == 2 ? smem_bytes_es<2>(D, nw) : elem_size == 4 ? smem_bytes_es<4>(D, nw) : -1;
}

}  // namespace cuda_layout
}  // namespace fastbridge
