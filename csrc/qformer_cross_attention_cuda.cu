// CUDA implementation of the fastbridge::qformer_attn_* ops (sm_80+).
//
// Design (benchmarks/notes/qformer_cross_attention.md has the numbers):
//  * forward: one block per (batch*head, tile of BM = 16*NW query rows), NW warps; warp w owns query
//    rows 16w..16w+15 of the tile. K/V tiles of BN = 64 keys go through shared memory (16-byte vector
//    loads, zero-filled past Lk); S = Q K^T and O += P V on tensor cores through WMMA (bf16 / fp16
//    m16n16k16, fp32 as TF32 m16n16k8: one product when TF32 is allowed, else the 3xTF32 split
//    a_hi*b_hi + a_hi*b_lo + a_lo*b_hi, which keeps fp32 accuracy); fp32 scores, online softmax
//    (scores / max in natural units, exp2 of (s - max) log2 e, per-row sum, O rescaled in shared
//    memory), masks, inverted dropout from Philox (philox.h: one draw per 4 keys of a row, the same
//    stream as the CPU kernel), fp32 accumulation.
//    Saves per row the max m and log l (natural units; m = +inf for a row that sees no key) -- never
//    the probabilities. Not lse = m + log l, which rounds to m under a huge finite mask.
//  * backward: one block per (batch*head), 4 warps; key blocks of 64 (warp w owns 16 keys) in an
//    outer loop, query tiles of 32 rows in an inner loop. Per tile: S^T = K Q^T and dPd^T = V dO^T
//    (WMMA), P = exp2(((S - m) - log l) log2 e) recomputed, the dropout mask replayed, dS = P (dP - delta)
//    (Pd^T / dS^T written over S^T / dP^T as those are read); dV += Pd^T dO and dK += dS^T Q accumulate
//    in fp32 shared memory for the key block; dQ += dS K accumulates for the whole (b, h) in fp32 shared
//    memory for Lq <= 64 (where the device allows the larger layout), else in an fp32 buffer this block
//    owns alone (no atomics: deterministic). The block writes dQ once at the end, scaled, in q's dtype
//    and layout (a query batch broadcast over B: fp32 per b, summed by the host). delta = rowsum(dO o O)
//    is computed by the block first.
//  * masked keys (key_mask false) influence nothing: their K / V rows are never read (zeros in shared
//    memory), their scores are set to -inf (not added to: NaN + -inf is NaN), their dS / Pd are 0.
//  * dropout seed / offset: from a device rng tensor (read by the kernels: CUDA-graph safe), or a host
//    one (refused under stream capture).
// Intermediate values are staged through shared memory (WMMA fragments have no defined element
// layout), which keeps every index explicit.
// No ATen/cuda or c10/cuda header (they need cuBLAS / cuSPARSE headers and a generated header that
// CPU builds of torch do not ship): the device guard and the current stream come through c10's
// device-generic interfaces, so this file compiles against any torch's headers with a bare CUDA
// toolkit (nvcc + runtime headers) -- which is how CI compiles it for sm_80 / sm_90a.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <type_traits>

#include "philox.h"
#include "qformer_cuda_layout.h"
#include "qformer_host.h"

namespace fastbridge {
namespace {

using namespace nvcuda;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
using cuda_layout::kBMQ;
using cuda_layout::kBN;
using cuda_layout::kBwdWarps;

// --------------------------------------------------------------------------------------- types
template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  using Frag = __half;
  static constexpr int KS = 16;  // k of one m16n16kKS WMMA step
  static constexpr int PAD = 8;  // row padding (elements) of shared tiles: 16 bytes
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int KS = 16;
  static constexpr int PAD = 8;
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Elem<float> {
  using Frag = wmma::precision::tf32;
  static constexpr int KS = 8;
  static constexpr int PAD = 4;
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};

template <typename T>
using Acc = wmma::fragment<wmma::accumulator, 16, 16, Elem<T>::KS, float>;

// acc += A (16 x K) * B (K x 16); A, B in shared memory with the given layouts and leading dims.
template <typename T, bool X3, typename LA, typename LB, int K>
__device__ __forceinline__ void mma_tile(Acc<T>& acc, const T* A, int lda, const T* B, int ldb) {
  constexpr int KS = Elem<T>::KS;
  using F = typename Elem<T>::Frag;
  // fp32 (TF32 fragments, 3 products with the split) unrolls by 2 only: fully unrolled, the compiler
  // hoists every fragment load of the tile and runs out of registers.
#pragma unroll(std::is_same_v<T, float> ? 2 : K / KS)
  for (int k = 0; k < K; k += KS) {
    wmma::fragment<wmma::matrix_a, 16, 16, KS, F, LA> a;
    wmma::fragment<wmma::matrix_b, 16, 16, KS, F, LB> b;
    const T* pa = std::is_same_v<LA, wmma::row_major> ? A + k : A + k * lda;
    const T* pb = std::is_same_v<LB, wmma::row_major> ? B + k * ldb : B + k;
    wmma::load_matrix_sync(a, pa, lda);
    wmma::load_matrix_sync(b, pb, ldb);
    if constexpr (std::is_same_v<T, float>) {
      if constexpr (X3) {  // 3xTF32: x = hi + lo, hi = tf32(x), lo = tf32(x - hi); drop lo*lo
        wmma::fragment<wmma::matrix_a, 16, 16, KS, F, LA> a_lo;
        wmma::fragment<wmma::matrix_b, 16, 16, KS, F, LB> b_lo;
#pragma unroll
        for (int t = 0; t < a.num_elements; ++t) {
          const float x = a.x[t], hi = wmma::__float_to_tf32(x);
          a.x[t] = hi;
          a_lo.x[t] = wmma::__float_to_tf32(x - hi);
        }
#pragma unroll
        for (int t = 0; t < b.num_elements; ++t) {
          const float x = b.x[t], hi = wmma::__float_to_tf32(x);
          b.x[t] = hi;
          b_lo.x[t] = wmma::__float_to_tf32(x - hi);
        }
        wmma::mma_sync(acc, a_lo, b, acc);
        wmma::mma_sync(acc, a, b_lo, acc);
        wmma::mma_sync(acc, a, b, acc);
      } else {
#pragma unroll
        for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
#pragma unroll
        for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
        wmma::mma_sync(acc, a, b, acc);
      }
    } else {
      wmma::mma_sync(acc, a, b, acc);
    }
  }
}

// rows x D tile from global (row stride ld elements; D contiguous; 16-byte aligned rows) into shared
// memory (leading dim LD), rows >= valid -- and rows r with vis[r] == 0 (masked keys) when vis is given
// -- zero-filled, never read. All threads of the block take part.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int rows, int valid, int tid,
                                          int nthreads, const float* vis = nullptr) {
  constexpr int CH = 16 / sizeof(T);  // elements per 16-byte chunk
  static_assert(D % CH == 0, "load_tile: a row is whole 16-byte chunks");
  constexpr int PER_ROW = D / CH;
  for (int idx = tid; idx < rows * PER_ROW; idx += nthreads) {
    const int r = idx / PER_ROW, c = (idx % PER_ROW) * CH;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid && (vis == nullptr || vis[r] != 0.f)) val = *reinterpret_cast<const uint4*>(src + r * ld + c);
    *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
  }
}

// Dropout seed / offset: from the device rng tensor when there is one (CUDA-graph safe: a replay reads
// what the graph's own RNG op drew into it), else the host's values.
struct Rng {
  uint64_t seed, offset;
};
__device__ __forceinline__ Rng dropout_rng(const QfParams& p) {
  if (p.rng_dev) return {static_cast<uint64_t>(p.rng_dev[0]), static_cast<uint64_t>(p.rng_dev[1])};
  return {p.seed, p.offset};
}

// Visibility of the keys k0 .. k0 + kBN - 1 (1: visible, 0: masked or past Lk) into vis[kBN].
__device__ __forceinline__ void key_visibility(const QfParams& p, int64_t b, int k0, int Lk, float* vis, int tid,
                                               int nthreads) {
  for (int c = tid; c < kBN; c += nthreads) {
    const int j = k0 + c;
    bool v = j < Lk;
    if (v && p.key_mask) v = p.key_mask[b * p.km_b + j * p.km_k];
    vis[c] = v ? 1.f : 0.f;
  }
}

// ------------------------------------------------------------------------------------- forward
// Shared-memory layouts: qformer_cuda_layout.h (also read by the host's fit check, ops.cpp).
template <typename T, int D, int NW>
using FwdSmem = cuda_layout::FwdSmem<sizeof(T), D, NW>;
static_assert(FwdSmem<__half, 64, 2>::PAD == Elem<__half>::PAD && FwdSmem<float, 64, 2>::PAD == Elem<float>::PAD);

template <typename T, int D, int NW, bool X3>
__global__ void __launch_bounds__(NW * 32, 1) qf_fwd_kernel(const QfParams p) {
  using S = FwdSmem<T, D, NW>;
  constexpr int BM = S::BM, LDT = S::LDT, LDS = S::LDS, LDP = S::LDP, LDO = S::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + S::q);
  T* Ks = reinterpret_cast<T*>(smem + S::k);
  T* Vs = reinterpret_cast<T*>(smem + S::v);
  float* Ss = reinterpret_cast<float*>(smem + S::s);
  T* Ps = reinterpret_cast<T*>(smem + S::pr);
  float* Os = reinterpret_cast<float*>(smem + S::o);
  float* mrow = reinterpret_cast<float*>(smem + S::m);
  float* lrow = reinterpret_cast<float*>(smem + S::l);
  float* arow = reinterpret_cast<float*>(smem + S::a);
  float* kvis = reinterpret_cast<float*>(smem + S::kvis);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nthreads = NW * 32;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int q0 = blockIdx.y * BM;
  const int Lq = static_cast<int>(p.Lq), Lk = static_cast<int>(p.Lk);
  // Scores, row max and log-sum stay in natural units (as the CPU kernel): an additive mask of finfo.min
  // (HF's eager masks) times log2(e) would overflow to -inf and empty a row the CPU kernel and the
  // reference average over. Differences to the max are taken to log2 units: exp2((s - m) log2 e).
  const bool dropout = p.dropout_p > 0.f;
  const Rng rng = dropout ? dropout_rng(p) : Rng{0, 0};

  const T* qg = static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h + q0 * p.sq.l;
  load_tile<T, D, LDT>(Qs, qg, p.sq.l, BM, min(BM, Lq - q0), tid, nthreads);
  for (int idx = tid; idx < BM * LDO; idx += nthreads) Os[idx] = 0.f;
  for (int r = tid; r < BM; r += nthreads) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.f;
  }
  const T* kg = static_cast<const T*>(p.k) + b * p.sk.b + h * p.sk.h;
  const T* vg = static_cast<const T*>(p.v) + b * p.sv.b + h * p.sv.h;
  const int r0 = 16 * warp;  // this warp's rows of the tile

  for (int k0 = 0; k0 < Lk; k0 += kBN) {
    __syncthreads();  // every warp is done with the previous K / V tile and its visibility
    key_visibility(p, b, k0, Lk, kvis, tid, nthreads);
    __syncthreads();
    // Masked keys' K / V rows are zeros (never read: 0 * NaN would be NaN in P V), their scores -inf.
    const int valid = min(kBN, Lk - k0);
    load_tile<T, D, LDT>(Ks, kg + k0 * p.sk.l, p.sk.l, kBN, valid, tid, nthreads, kvis);
    load_tile<T, D, LDT>(Vs, vg + k0 * p.sv.l, p.sv.l, kBN, valid, tid, nthreads, kvis);
    __syncthreads();

    // S_w = Q_w K^T (16 x BN), fp32, to shared memory
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) {
      Acc<T> acc;
      wmma::fill_fragment(acc, 0.f);
      mma_tile<T, X3, wmma::row_major, wmma::col_major, D>(acc, Qs + r0 * LDT, LDT, Ks + n * 16 * LDT, LDT);
      wmma::store_matrix_sync(Ss + r0 * LDS + n * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax over this key tile: 16 lanes per row, 4 consecutive keys per lane (one Philox
    // draw), 2 rows per pass (8 passes: the warp's 16 rows). A masked key's score is set to -inf, never
    // added to (NaN + -inf is NaN).
#pragma unroll 1
    for (int pass = 0; pass < 8; ++pass) {
      const int r = r0 + 2 * pass + lane / 16, c = (lane % 16) * 4, i = q0 + r;
      float s[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        s[t] = -INFINITY;
        if (kvis[c + t] != 0.f) {
          s[t] = Ss[r * LDS + c + t] * p.scale;
          if (p.bias && i < Lq) s[t] += p.bias[b * p.bs_b + h * p.bs_h + i * p.bs_q + (k0 + c + t) * p.bs_k];
        }
      }
      float mx = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
#pragma unroll
      for (int off = 8; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = mrow[r], l_old = lrow[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: exp2(-inf - 0) = 0
      float pr[4], sum = 0.f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        pr[t] = exp2f((s[t] - m_use) * kLog2e);
        sum += pr[t];
      }
#pragma unroll
      for (int off = 8; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      const float alpha = exp2f((m_old - m_use) * kLog2e);
      if (dropout) {
        float keep[4] = {0.f, 0.f, 0.f, 0.f};
        if (i < Lq) {
          const PhiloxOut d = fb_dropout_draw(rng.seed, rng.offset, static_cast<uint64_t>(bh * Lq + i),
                                              static_cast<uint64_t>((k0 + c) / 4));
#pragma unroll
          for (int t = 0; t < 4; ++t) keep[t] = fb_dropout_keep(d.x[t], p.keep_threshold) ? p.rescale : 0.f;
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) Ps[r * LDP + c + t] = Elem<T>::from_f(pr[t] * keep[t]);
      } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) Ps[r * LDP + c + t] = Elem<T>::from_f(pr[t]);
      }
      __syncwarp();  // every lane has read mrow / lrow of its row
      if (lane % 16 == 0) {
        mrow[r] = m_new;
        lrow[r] = l_old * alpha + sum;
        arow[r] = alpha;
      }
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * D; idx += 32) {
      const int r = r0 + idx / D, c = idx % D;
      Os[r * LDO + c] *= arow[r];
    }
    __syncwarp();

    // O_w += P_w V (16 x D)
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      Acc<T> acc;
      wmma::load_matrix_sync(acc, Os + r0 * LDO + n * 16, LDO, wmma::mem_row_major);
      mma_tile<T, X3, wmma::row_major, wmma::row_major, kBN>(acc, Ps + r0 * LDP, LDP, Vs + n * 16, LDT);
      wmma::store_matrix_sync(Os + r0 * LDO + n * 16, acc, LDO, wmma::mem_row_major);
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(p.out) + bh * p.Lq * D;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = r0 + idx / D, c = idx % D, i = q0 + r;
    if (i < Lq) {
      const float l = lrow[r];
      og[static_cast<int64_t>(i) * D + c] = Elem<T>::from_f(l > 0.f ? Os[r * LDO + c] / l : 0.f);
    }
  }
  if (lane < 16) {
    const int r = r0 + lane, i = q0 + r;
    if (i < Lq) {
      const float l = lrow[r];
      float* st = p.stats + (bh * p.Lq + i) * 2;
      st[0] = l > 0.f ? mrow[r] : INFINITY;
      st[1] = l > 0.f ? log2f(l) * kLn2 : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------ backward
template <typename T, int D, bool DQ_SMEM>
using BwdSmem = cuda_layout::BwdSmem<sizeof(T), D, DQ_SMEM>;

// DQ_SMEM (Lq <= kDqSmemMaxLq): dQ of the (b, h) accumulates in shared memory; else in p.dq_work (fp32,
// this block's rows only: no atomics). Either way the first key block stores its dQ (no zeroing pass)
// and the block writes dQ once at the end, scaled, into p.dq (q's dtype and layout) or, for a query
// batch broadcast over B, into p.dq_acc (fp32, summed over the batch by the host).
template <typename T, int D, bool X3, bool DQ_SMEM>
__global__ void __launch_bounds__(kBwdWarps * 32, 1) qf_bwd_kernel(const QfParams p) {
  using S = BwdSmem<T, D, DQ_SMEM>;
  constexpr int LDT = S::LDT, LDQ = S::LDQ, LDQT = S::LDQT, LDO = S::LDO, NW = kBwdWarps;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + S::k);
  T* Vs = reinterpret_cast<T*>(smem + S::v);
  T* Qs = reinterpret_cast<T*>(smem + S::q);
  T* dOs = reinterpret_cast<T*>(smem + S::dout);
  float* dKs = reinterpret_cast<float*>(smem + S::dk);  // fp32 accumulators of the key block
  float* dVs = reinterpret_cast<float*>(smem + S::dv);
  float* m_s = reinterpret_cast<float*>(smem + S::stats);  // row max, then log l (kBMQ each)
  float* logl_s = m_s + kBMQ;
  float* delta_s = reinterpret_cast<float*>(smem + S::delta);
  float* St = reinterpret_cast<float*>(smem + S::st);
  float* dPt = reinterpret_cast<float*>(smem + S::dpt);
  T* Pdt = reinterpret_cast<T*>(smem + S::st);   // over S^T (layout header): written as S^T is consumed
  T* dSt = reinterpret_cast<T*>(smem + S::dpt);  // over dP^T
  float* kvis = reinterpret_cast<float*>(smem + S::kvis);
  float* dQs = reinterpret_cast<float*>(smem + S::dq);  // DQ_SMEM only

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nthreads = NW * 32;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int Lq = static_cast<int>(p.Lq), Lk = static_cast<int>(p.Lk);
  const int LqP = (Lq + kBMQ - 1) / kBMQ * kBMQ;
  const bool dropout = p.dropout_p > 0.f;  // scores and stats in natural units, as the forward
  const Rng rng = dropout ? dropout_rng(p) : Rng{0, 0};
  const T* qg = static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h;
  const T* dog = static_cast<const T*>(p.dout) + b * p.sdo.b + h * p.sdo.h;
  const T* og = static_cast<const T*>(p.out) + bh * p.Lq * D;
  const T* kg = static_cast<const T*>(p.k) + b * p.sk.b + h * p.sk.h;
  const T* vg = static_cast<const T*>(p.v) + b * p.sv.b + h * p.sv.h;
  // this block's dQ accumulator: shared memory (LDO) or its rows of the global scratch (D)
  float* dqa = DQ_SMEM ? dQs : p.dq_work + bh * static_cast<int64_t>(LqP) * D;
  constexpr int LDDQ = DQ_SMEM ? LDO : D;
  float* delta = p.delta + bh * p.Lq;

  // delta_i = sum_d dO_id O_id, one warp per row
  for (int i = warp; i < Lq; i += NW) {
    float acc = 0.f;
    for (int d = lane; d < D; d += 32)
      acc += Elem<T>::to_f(dog[i * p.sdo.l + d]) * Elem<T>::to_f(og[static_cast<int64_t>(i) * D + d]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[i] = acc;
  }

  const int k0w = 16 * warp;  // this warp's keys within the key block (kBwdWarps * 16 == kBN)
  for (int k0 = 0; k0 < Lk; k0 += kBN) {
    __syncthreads();  // previous key block done (staging / K / V / visibility / delta writes)
    key_visibility(p, b, k0, Lk, kvis, tid, nthreads);
    for (int idx = tid; idx < kBN * LDO; idx += nthreads) {
      dKs[idx] = 0.f;
      dVs[idx] = 0.f;
    }
    __syncthreads();
    // Masked keys' K / V rows are zeros (never read), their scores -inf, their dS / Pd exactly 0.
    const int valid = min(kBN, Lk - k0);
    load_tile<T, D, LDT>(Ks, kg + k0 * p.sk.l, p.sk.l, kBN, valid, tid, nthreads, kvis);
    load_tile<T, D, LDT>(Vs, vg + k0 * p.sv.l, p.sv.l, kBN, valid, tid, nthreads, kvis);
    for (int q0 = 0; q0 < Lq; q0 += kBMQ) {
      __syncthreads();  // previous query tile done with Q / dO / dS^T
      const int qvalid = min(kBMQ, Lq - q0);
      load_tile<T, D, LDT>(Qs, qg + q0 * p.sq.l, p.sq.l, kBMQ, qvalid, tid, nthreads);
      load_tile<T, D, LDT>(dOs, dog + q0 * p.sdo.l, p.sdo.l, kBMQ, qvalid, tid, nthreads);
      for (int c = tid; c < kBMQ; c += nthreads) {
        const int i = q0 + c;
        m_s[c] = i < Lq ? p.stats[(bh * p.Lq + i) * 2] : INFINITY;  // +inf: P = exp2(-inf) = 0
        logl_s[c] = i < Lq ? p.stats[(bh * p.Lq + i) * 2 + 1] : 0.f;
        delta_s[c] = i < Lq ? delta[i] : 0.f;
      }
      __syncthreads();

      // S^T_w = K_w Q^T and dPd^T_w = V_w dO^T (16 keys x BMQ queries), fp32
#pragma unroll
      for (int n = 0; n < kBMQ / 16; ++n) {
        Acc<T> acc;
        wmma::fill_fragment(acc, 0.f);
        mma_tile<T, X3, wmma::row_major, wmma::col_major, D>(acc, Ks + k0w * LDT, LDT, Qs + n * 16 * LDT, LDT);
        wmma::store_matrix_sync(St + k0w * LDQ + n * 16, acc, LDQ, wmma::mem_row_major);
        wmma::fill_fragment(acc, 0.f);
        mma_tile<T, X3, wmma::row_major, wmma::col_major, D>(acc, Vs + k0w * LDT, LDT, dOs + n * 16 * LDT, LDT);
        wmma::store_matrix_sync(dPt + k0w * LDQ + n * 16, acc, LDQ, wmma::mem_row_major);
      }
      __syncwarp();

      // elementwise: lane = (4-key group g, query c); one Philox draw per (query, 4 keys). Pd^T / dS^T
      // overlay S^T / dP^T: writing query column c of a key row overwrites S^T's column c * sizeof(T) / 4
      // <= c of that row, which this step or an earlier one has read; the __syncwarp between the reads
      // and the writes of each step orders every lane's reads before any lane's writes.
      {
        const int g = lane & 3;
        const int kl = k0w + 4 * g;  // first key (local) of this lane's group
#pragma unroll 1
        for (int it = 0; it < kBMQ / 8; ++it) {
          const int c = (lane >> 2) + 8 * it, i = q0 + c;
          float keep[4] = {1.f, 1.f, 1.f, 1.f};
          if (dropout) {
            if (i < Lq) {
              const PhiloxOut d = fb_dropout_draw(rng.seed, rng.offset, static_cast<uint64_t>(bh * Lq + i),
                                                  static_cast<uint64_t>((k0 + kl) / 4));
#pragma unroll
              for (int t = 0; t < 4; ++t) keep[t] = fb_dropout_keep(d.x[t], p.keep_threshold) ? p.rescale : 0.f;
            } else {
              keep[0] = keep[1] = keep[2] = keep[3] = 0.f;
            }
          }
          float s[4], dp[4];
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            s[t] = St[(kl + t) * LDQ + c];
            dp[t] = dPt[(kl + t) * LDQ + c];
          }
          __syncwarp();
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const int kr = kl + t, j = k0 + kr;
            float pd = 0.f, ds = 0.f;
            if (kvis[kr] != 0.f) {
              float sc = s[t] * p.scale;
              if (p.bias && i < Lq) sc += p.bias[b * p.bs_b + h * p.bs_h + i * p.bs_q + j * p.bs_k];
              const float pr = exp2f(((sc - m_s[c]) - logl_s[c]) * kLog2e);
              pd = pr * keep[t];
              ds = pr * (dp[t] * keep[t] - delta_s[c]);
            }
            Pdt[kr * LDQT + c] = Elem<T>::from_f(pd);
            dSt[kr * LDQT + c] = Elem<T>::from_f(ds);
          }
        }
      }
      __syncthreads();  // dS^T of every warp is needed for dQ

      // dV_w += Pd^T_w dO, dK_w += dS^T_w Q (fp32 accumulators of this warp's 16 keys, shared memory)
#pragma unroll 1
      for (int n = 0; n < D / 16; ++n) {
        Acc<T> acc;
        wmma::load_matrix_sync(acc, dVs + k0w * LDO + n * 16, LDO, wmma::mem_row_major);
        mma_tile<T, X3, wmma::row_major, wmma::row_major, kBMQ>(acc, Pdt + k0w * LDQT, LDQT, dOs + n * 16, LDT);
        wmma::store_matrix_sync(dVs + k0w * LDO + n * 16, acc, LDO, wmma::mem_row_major);
        wmma::load_matrix_sync(acc, dKs + k0w * LDO + n * 16, LDO, wmma::mem_row_major);
        mma_tile<T, X3, wmma::row_major, wmma::row_major, kBMQ>(acc, dSt + k0w * LDQT, LDQT, Qs + n * 16, LDT);
        wmma::store_matrix_sync(dKs + k0w * LDO + n * 16, acc, LDO, wmma::mem_row_major);
      }
      // dQ[q0:q0+BMQ] (+)= dS K_blk: (BMQ/16) x (D/16) output fragments shared among the warps; the first
      // key block stores (every row < LqP is written there), later ones accumulate
      for (int f = warp; f < (kBMQ / 16) * (D / 16); f += NW) {
        const int mq = f / (D / 16), nd = f % (D / 16);
        float* dst = dqa + static_cast<int64_t>(q0 + 16 * mq) * LDDQ + 16 * nd;
        Acc<T> acc;
        if (k0 == 0)
          wmma::fill_fragment(acc, 0.f);
        else
          wmma::load_matrix_sync(acc, dst, LDDQ, wmma::mem_row_major);
        mma_tile<T, X3, wmma::col_major, wmma::row_major, kBN>(acc, dSt + 16 * mq, LDQT, Ks + 16 * nd, LDT);
        wmma::store_matrix_sync(dst, acc, LDDQ, wmma::mem_row_major);
      }
    }
    __syncthreads();  // dK / dV final (and zeroed by all threads when there was no query tile)
    T* dkg = static_cast<T*>(p.dk) + b * p.sdk.b + h * p.sdk.h + k0 * p.sdk.l;  // strides of k
    T* dvg = static_cast<T*>(p.dv) + b * p.sdv.b + h * p.sdv.h + k0 * p.sdv.l;
    for (int idx = lane; idx < 16 * D; idx += 32) {
      const int r = k0w + idx / D, c = idx % D;
      if (k0 + r < Lk) {
        dkg[r * p.sdk.l + c] = Elem<T>::from_f(dKs[r * LDO + c] * p.scale);
        dvg[r * p.sdv.l + c] = Elem<T>::from_f(dVs[r * LDO + c]);
      }
    }
  }
  __syncthreads();  // every warp's dQ fragments are final
  if (p.dq_acc) {  // a query batch broadcast over B: fp32 per (b, h), summed by the host
    float* dst = p.dq_acc + bh * p.Lq * D;
    for (int idx = tid; idx < Lq * D; idx += nthreads) dst[idx] = dqa[(idx / D) * LDDQ + idx % D] * p.scale;
  } else {
    T* dqg = static_cast<T*>(p.dq) + b * p.sdq.b + h * p.sdq.h;  // q's layout (grad_like)
    for (int idx = tid; idx < Lq * D; idx += nthreads) {
      const int i = idx / D, c = idx % D;
      dqg[i * p.sdq.l + c] = Elem<T>::from_f(dqa[i * LDDQ + c] * p.scale);
    }
  }
}

// ----------------------------------------------------------------------------------- dropout mask
__global__ void qf_keep_kernel(const QfParams p, bool* keep) {
  const int64_t groups = (p.Lk + 3) / 4;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= p.B * p.H * p.Lq * groups) return;
  const int64_t row = idx / groups, g = idx % groups;
  const Rng rng = dropout_rng(p);
  const PhiloxOut d = fb_dropout_draw(rng.seed, rng.offset, static_cast<uint64_t>(row), static_cast<uint64_t>(g));
  for (int t = 0; t < 4 && 4 * g + t < p.Lk; ++t) keep[row * p.Lk + 4 * g + t] = fb_dropout_keep(d.x[t], p.keep_threshold);
}

// ------------------------------------------------------------------------------------------ host
#define FB_CUDA_CHECK(expr)                                                                       \
  do {                                                                                            \
    const cudaError_t fb_err = (expr);                                                            \
    TORCH_CHECK(fb_err == cudaSuccess, "fastbridge (CUDA): ", #expr, ": ", cudaGetErrorString(fb_err)); \
  } while (0)

cudaStream_t current_stream(int device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(c10::Device(c10::DeviceType::CUDA, device)).native_handle());
}

// Per-device caches (read once per process and device, not per launch). 0 = not known yet.
constexpr int kMaxDevices = 256;
using DeviceCache = std::array<std::atomic<int>, kMaxDevices>;

template <cudaDeviceAttr A>
int device_attribute(int device) {
  static DeviceCache cache{};  // value + 1 (an attribute may be 0)
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) return v - 1;
  }
  int v = 0;
  FB_CUDA_CHECK(cudaDeviceGetAttribute(&v, A, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(v + 1, std::memory_order_relaxed);
  return v;
}

int max_optin_smem(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// Allows Kernel `smem` bytes of dynamic shared memory on `device`: cudaFuncSetAttribute once per kernel
// instance and device (a static cache per instance), not per launch.
template <auto Kernel>
void allow_smem(size_t smem, int device) {
  TORCH_CHECK(static_cast<int>(smem) <= max_optin_smem(device), "fastbridge::qformer_attn (CUDA): needs ",
              smem, " bytes of shared memory per block, the device allows ", max_optin_smem(device),
              " (fastbridge.ops.qformer_cross_attention checks this first and runs the reference instead)");
  static DeviceCache allowed{};
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && allowed[device].load(std::memory_order_relaxed) >= static_cast<int>(smem)) return;
  FB_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (cached) allowed[device].store(static_cast<int>(smem), std::memory_order_relaxed);
}

// Resident blocks per SM of Kernel with `threads` threads and `smem` bytes (registers and shared memory
// both count), cached per kernel instance and device.
template <auto Kernel>
int occupancy(int threads, size_t smem, int device) {
  static DeviceCache cache{};  // blocks + 1
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) return v - 1;
  }
  allow_smem<Kernel>(smem, device);
  int blocks = 0;
  FB_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads, smem));
  if (cached) cache[device].store(blocks + 1, std::memory_order_relaxed);
  return blocks;
}

template <auto Kernel>
void launch(dim3 grid, dim3 block, size_t smem, const QfParams& p, int device) {
  allow_smem<Kernel>(smem, device);
  Kernel<<<grid, block, smem, current_stream(device)>>>(p);
  FB_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int D, bool X3>
void run_fwd(const QfParams& p, int device) {
  // 2 warps (32 query rows) when the queries fit (Q-Former cross-attention: Lq = 32), else 4 (64 rows)
  // -- unless the 4-warp tile needs more shared memory than the device allows (fp32 on a 99 KB
  // RTX 30xx / 40xx): then 2-warp tiles, more blocks, the same results.
  using S2 = FwdSmem<T, D, cuda_layout::kFwdWarpsSmall>;
  using S4 = FwdSmem<T, D, cuda_layout::kFwdWarpsLarge>;
  if (p.Lq > S2::BM && static_cast<int>(S4::total) <= max_optin_smem(device)) {
    launch<qf_fwd_kernel<T, D, cuda_layout::kFwdWarpsLarge, X3>>(
        dim3(p.B * p.H, (p.Lq + S4::BM - 1) / S4::BM), dim3(32 * cuda_layout::kFwdWarpsLarge), S4::total, p, device);
  } else {
    launch<qf_fwd_kernel<T, D, cuda_layout::kFwdWarpsSmall, X3>>(
        dim3(p.B * p.H, (p.Lq + S2::BM - 1) / S2::BM), dim3(32 * cuda_layout::kFwdWarpsSmall), S2::total, p, device);
  }
}

// The backward keeps dQ in shared memory when Lq <= kDqSmemMaxLq, the larger layout fits the device
// (bf16 / fp16 at D = 128 does not fit an A100's 163 KB) and it costs no resident block per SM (by the
// occupancy API: e.g. bf16 D = 64 on an A100, 2 blocks of the global-dQ layout per SM but 1 of the
// shared one); else dQ accumulates in an fp32 scratch buffer allocated here.
template <typename T, int D, bool X3>
void run_bwd(const QfParams& p, int device) {
  using SS = BwdSmem<T, D, true>;
  using SG = BwdSmem<T, D, false>;
  constexpr auto kSmemDq = qf_bwd_kernel<T, D, X3, true>;
  constexpr auto kGlobalDq = qf_bwd_kernel<T, D, X3, false>;
  const dim3 grid(p.B * p.H), block(kBwdWarps * 32);
  if (p.Lq <= cuda_layout::kDqSmemMaxLq && static_cast<int>(SS::total) <= max_optin_smem(device) &&
      occupancy<kSmemDq>(block.x, SS::total, device) >= occupancy<kGlobalDq>(block.x, SG::total, device))
    return launch<kSmemDq>(grid, block, SS::total, p, device);
  QfParams pg = p;
  const int64_t LqP = (p.Lq + kBMQ - 1) / kBMQ * kBMQ;
  const at::Tensor work = at::empty({p.B, p.H, LqP, D}, at::TensorOptions().dtype(at::kFloat).device(
                                                            c10::Device(c10::DeviceType::CUDA, device)));
  pg.dq_work = work.data_ptr<float>();  // no zeroing: the kernel's first key block stores
  launch<kGlobalDq>(grid, block, SG::total, pg, device);
}

template <typename T, bool X3, bool BWD>
void run_d(const QfParams& p, int device) {
  switch (p.D) {
    case 32:
      return BWD ? run_bwd<T, 32, X3>(p, device) : run_fwd<T, 32, X3>(p, device);
    case 64:
      return BWD ? run_bwd<T, 64, X3>(p, device) : run_fwd<T, 64, X3>(p, device);
    case 128:
      if constexpr (!std::is_same_v<T, float>) {  // fp32 at 128 would not fit an A100's shared memory
        return BWD ? run_bwd<T, 128, X3>(p, device) : run_fwd<T, 128, X3>(p, device);
      }
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "fastbridge::qformer_attn (CUDA): head dim must be 32, 64 (or 128 in bf16 / fp16), got ",
                  p.D);
  }
}

template <bool BWD>
void dispatch(const QfParams& p, int device) {
  switch (p.dtype) {
    case ElemType::f16:
      return run_d<__half, false, BWD>(p, device);
    case ElemType::bf16:
      return run_d<__nv_bfloat16, false, BWD>(p, device);
    case ElemType::f32:
      return p.allow_tf32 ? run_d<float, false, BWD>(p, device) : run_d<float, true, BWD>(p, device);
  }
}

// 16-byte aligned rows and base (vector loads); else a contiguous copy.
at::Tensor vec_aligned(const at::Tensor& t) {
  const int64_t v = 16 / t.element_size();
  auto ok = [&](const at::Tensor& x) {
    if (x.stride(3) != 1 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
    for (int d = 0; d < 3; ++d)
      if (x.size(d) > 1 && x.stride(d) % v != 0) return false;
    return true;
  };
  if (ok(t)) return t;
  at::Tensor c = t.contiguous();
  return ok(c) ? c : c.clone();
}

void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda(), "fastbridge::qformer_attn (CUDA): q, k, v must be CUDA tensors");
  const int major = device_attribute<cudaDevAttrComputeCapabilityMajor>(q.get_device());
  TORCH_CHECK(major >= 8, "fastbridge::qformer_attn (CUDA): needs compute capability >= 8.0, ", q.device(), " has ",
              major, ".", device_attribute<cudaDevAttrComputeCapabilityMinor>(q.get_device()));
}

// A host rng = [seed, offset] is read into the kernel arguments: a CUDA graph captured around the launch
// would replay that one dropout mask forever. Refused under stream capture (the Python op draws rng on
// q's device from the CUDA generator, which the kernels read on the device: graph safe).
void check_rng_capturable(const std::optional<at::Tensor>& rng, double dropout_p, int device, const char* op) {
  if (dropout_p <= 0.0 || !rng.has_value() || !rng->defined() || !rng->device().is_cpu()) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  FB_CUDA_CHECK(cudaStreamIsCapturing(current_stream(device), &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, "fastbridge::", op,
              " (CUDA): dropout with a CPU rng tensor under CUDA graph capture would replay one dropout mask "
              "forever; pass rng on the device (fastbridge.ops.qformer_cross_attention draws it there from the "
              "CUDA generator, graph safe)");
}

std::tuple<at::Tensor, at::Tensor> qformer_attn_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                         const at::Tensor& v_,
                                                         const std::optional<at::Tensor>& key_mask,
                                                         const std::optional<at::Tensor>& bias, double scale,
                                                         double dropout_p, const std::optional<at::Tensor>& rng,
                                                         bool allow_tf32) {
  check_cuda_inputs(q_, k_);
  const c10::DeviceGuard guard(q_.device());
  check_rng_capturable(rng, dropout_p, q_.get_device(), "qformer_attn_fwd");
  const at::Tensor q = vec_aligned(q_), k = vec_aligned(k_), v = vec_aligned(v_);
  QfParams p;
  QfInputs in = prepare(p, q, k, v, key_mask, bias, scale, dropout_p, rng);
  p.allow_tf32 = allow_tf32;
  at::Tensor out = new_output({p.B, p.H, p.Lq, p.D}, q.options());
  at::Tensor stats = new_output({p.B, p.H, p.Lq, 2}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  if (out.numel() > 0) dispatch<false>(p, q.get_device());
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qformer_attn_bwd_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out, const at::Tensor& stats, const std::optional<at::Tensor>& key_mask,
    const std::optional<at::Tensor>& bias, double scale, double dropout_p, const std::optional<at::Tensor>& rng,
    bool allow_tf32) {
  check_cuda_inputs(q_, k_);
  const c10::DeviceGuard guard(q_.device());
  check_rng_capturable(rng, dropout_p, q_.get_device(), "qformer_attn_bwd");
  const at::Tensor q = vec_aligned(q_), k = vec_aligned(k_), v = vec_aligned(v_);
  QfParams p;
  QfInputs in = prepare(p, q, k, v, key_mask, bias, scale, dropout_p, rng);
  p.allow_tf32 = allow_tf32;
  TORCH_CHECK(dout_.sizes() == at::IntArrayRef({p.B, p.H, p.Lq, p.D}) && out.sizes() == dout_.sizes(),
              "fastbridge::qformer_attn_bwd: dout and out must be (B, H, Lq, D)");
  TORCH_CHECK(dout_.scalar_type() == q_.scalar_type() && out.scalar_type() == q_.scalar_type(),
              "fastbridge::qformer_attn_bwd: dout and out must have q's dtype");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.sizes() == at::IntArrayRef({p.B, p.H, p.Lq, 2}),
              "fastbridge::qformer_attn_bwd: stats must be float32 (B, H, Lq, 2), as the forward returns it");
  TORCH_CHECK(dout_.device() == q_.device() && out.device() == q_.device() && stats.device() == q_.device(),
              "fastbridge::qformer_attn_bwd: dout, out and stats must be on q's device");
  const at::Tensor dout = vec_aligned(dout_);
  const at::Tensor out_c = out.contiguous();
  const at::Tensor stats_c = stats.contiguous();
  p.dout = dout.data_ptr();
  p.sdo = strides3(dout);
  p.out = const_cast<void*>(out_c.data_ptr());
  p.stats = const_cast<float*>(stats_c.data_ptr<float>());
  // dQ: written once by the kernel, scaled -- into dq (q's dtype and layout), or for a query batch
  // broadcast over B into an fp32 (B, H, Lq, D) buffer summed here (the CPU kernel's convention).
  const bool q_broadcast = q_.size(0) != p.B;
  at::Tensor dq = grad_like(q_);
  at::Tensor dq_acc;
  if (q_broadcast) {
    dq_acc = at::empty({p.B, p.H, p.Lq, p.D}, q.options().dtype(at::kFloat));
    p.dq_acc = dq_acc.data_ptr<float>();
  } else {
    p.dq = dq.data_ptr();
    p.sdq = strides3(dq);
  }
  at::Tensor delta = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  at::Tensor dk = grad_like(k_);
  at::Tensor dv = grad_like(v_);
  p.delta = delta.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.sdk = strides3(dk);
  p.dv = dv.data_ptr();
  p.sdv = strides3(dv);
  if (p.B * p.H > 0) dispatch<true>(p, q.get_device());
  if (q_broadcast) dq.copy_(dq_acc.sum(0, /*keepdim=*/true));
  return {dq, dk, dv};
}

at::Tensor qformer_dropout_keep_cuda(const at::Tensor& like, const at::Tensor& rng, int64_t Lk, double dropout_p) {
  const at::Tensor r = rng.contiguous();
  const QfParams p = dropout_keep_params(like, r, Lk, dropout_p);
  const c10::DeviceGuard guard(like.device());
  check_rng_capturable(r, dropout_p, like.get_device(), "qformer_dropout_keep");
  at::Tensor keep = at::empty({p.B, p.H, p.Lq, Lk}, like.options().dtype(at::kBool));
  const int64_t n = p.B * p.H * p.Lq * ((Lk + 3) / 4);
  if (n > 0) {
    qf_keep_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, current_stream(like.get_device())>>>(
        p, keep.data_ptr<bool>());
    FB_CUDA_CHECK(cudaGetLastError());
  }
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbridge, CUDA, m) {
  m.impl("qformer_attn_fwd", &qformer_attn_fwd_cuda);
  m.impl("qformer_attn_bwd", &qformer_attn_bwd_cuda);
  m.impl("qformer_dropout_keep", &qformer_dropout_keep_cuda);
}

}  // namespace fastbridge
