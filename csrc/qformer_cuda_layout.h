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
constexpr int kDqSmemMaxLq = 64;   // backward: dQ stays in shared memory for Lq <= 64 (where it fits)

// The tile relations the kernels' index arithmetic relies on (a retune that breaks one fails here
// instead of computing garbage):
static_assert(kBN == 16 * 4, "forward softmax: 16 lanes per query row x 4 consecutive keys per lane (one Philox "
                             "draw of 4) must cover a key tile");
static_assert(kBwdWarps * 16 == kBN, "backward: warp w owns keys 16w .. 16w + 15 of a key block (k0w = 16 * warp)");
static_assert(kBMQ == 32, "backward: a query tile is 2 WMMA row tiles, and the elementwise pass covers 8 queries x "
                          "4 key groups a step in kBMQ / 8 steps (written and checked for 32)");
static_assert(kDqSmemMaxLq % kBMQ == 0, "backward: the shared dQ buffer holds whole query tiles");
static_assert(kFwdWarpsSmall * 16 == 32 && kFwdWarpsLarge * 16 == 64, "forward: 16 query rows per warp");

// Launches whose shared memory smem_bytes() reports: a forward with kFwdWarpsSmall / kFwdWarpsLarge warps,
// or the backward with dQ in global memory (kBwd: any Lq, the smallest) or in shared memory (kBwdDqSmem).
constexpr int kBwd = 0;
constexpr int kBwdDqSmem = -1;

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
  static constexpr size_t kvis = a + align128c(sizeof(float) * BM);  // per key of the tile: 1 visible, 0 not
  static constexpr size_t total = kvis + align128c(sizeof(float) * kBN);
};

// DQ_SMEM: dQ of the whole (b, h) (up to kDqSmemMaxLq rows, fp32) accumulates here, else in a global
// fp32 scratch buffer. Pd^T and dS^T (ES-byte elements) are written over S^T and dP^T (fp32) as they
// are formed: element (key r, query c) of Pd^T at byte r * 4 * LDQ + ES * c overlays S^T's
// (r, c * ES / 4), which the elementwise pass has already read (qformer_cross_attention_cuda.cu).
template <int ES, int D, bool DQ_SMEM>
struct BwdSmem {
  static constexpr int PAD = 16 / ES;
  static constexpr int LDT = D + PAD;     // K, V, Q, dO tiles
  static constexpr int LDQ = kBMQ + 4;    // fp32 S^T, dP^T (keys x queries)
  static constexpr int LDQT = LDQ * 4 / ES;  // Pd^T, dS^T (ES bytes) over S^T, dP^T: the same row pitch
  static constexpr int LDO = D + 4;       // fp32 dK / dV (/ dQ) accumulators
  static_assert(LDQT % (16 / ES) == 0 && LDQT >= kBMQ,
                "WMMA: a leading dim of 16 bytes' multiple (8 16-bit / 4 tf32 elements)");
  static constexpr size_t k = 0;
  static constexpr size_t v = k + align128c(size_t(ES) * kBN * LDT);
  static constexpr size_t q = v + align128c(size_t(ES) * kBN * LDT);
  static constexpr size_t dout = q + align128c(size_t(ES) * kBMQ * LDT);
  static constexpr size_t dk = dout + align128c(size_t(ES) * kBMQ * LDT);
  static constexpr size_t dv = dk + align128c(sizeof(float) * kBN * LDO);
  static constexpr size_t stats = dv + align128c(sizeof(float) * kBN * LDO);  // m then log l (kBMQ each)
  static constexpr size_t delta = stats + align128c(sizeof(float) * 2 * kBMQ);
  static constexpr size_t st = delta + align128c(sizeof(float) * kBMQ);  // S^T, then Pd^T
  static constexpr size_t dpt = st + align128c(sizeof(float) * kBN * LDQ);  // dP^T, then dS^T
  static constexpr size_t kvis = dpt + align128c(sizeof(float) * kBN * LDQ);
  static constexpr size_t dq = kvis + align128c(sizeof(float) * kBN);  // DQ_SMEM: kDqSmemMaxLq x LDO fp32
  static constexpr size_t total = dq + (DQ_SMEM ? align128c(sizeof(float) * kDqSmemMaxLq * LDO) : 0);
};

template <int ES, int D>
constexpr int64_t smem_bytes_d(int launch) {
  return launch == kBwd         ? int64_t(BwdSmem<ES, D, false>::total)
         : launch == kBwdDqSmem ? int64_t(BwdSmem<ES, D, true>::total)
         : launch == kFwdWarpsSmall ? int64_t(FwdSmem<ES, D, kFwdWarpsSmall>::total)
         : launch == kFwdWarpsLarge ? int64_t(FwdSmem<ES, D, kFwdWarpsLarge>::total)
                                    : -1;
}

template <int ES>
constexpr int64_t smem_bytes_es(int64_t D, int launch) {
  return D == 32 ? smem_bytes_d<ES, 32>(launch) : D == 64 ? smem_bytes_d<ES, 64>(launch)
                                                : D == 128 ? smem_bytes_d<ES, 128>(launch) : -1;
}

// Bytes of dynamic shared memory of one block of `launch` (kBwd, kBwdDqSmem, or the forward's warp count).
// -1 for a head dim the kernels are not built for.
constexpr int64_t smem_bytes(int elem_size, int64_t D, int launch) {
  return elem_size == 2 ? smem_bytes_es<2>(D, launch) : elem_size == 4 ? smem_bytes_es<4>(D, launch) : -1;
}

}  // namespace cuda_layout
}  // namespace fastbridge
