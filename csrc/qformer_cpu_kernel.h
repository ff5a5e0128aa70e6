// CPU kernel of qformer_cross_attention, written once and compiled per instruction set.
//
// Included by qformer_cpu_{avx512,avx2,generic}.cpp after a `#pragma GCC target(...)`, with
//   FB_ISA_NS   the namespace of this instance (cpu_avx512, cpu_avx2, cpu_generic)
//   FB_VBYTES   the vector width in bytes (64, 32, 16)
//   FB_MR       rows of the GEMM micro-kernel (register blocking: FB_MR x 2 vectors of accumulators)
// Everything but the two entry points has internal linkage, and no torch / std header is included
// here, so code compiled for one instruction set is never picked by the linker for another.
//
// Work item: one (batch, head) pair; the dispatcher (qformer_cross_attention_cpu.cpp) runs ranges of
// pairs in parallel (at::parallel_for) with one float workspace per thread (qformer_cpu_layout.h).
// Per pair, all of it in L1/L2: inputs are converted to float32 once (K and V also transposed where
// a GEMM wants them so), the scores of all Lq x Lk pairs are computed by a register-blocked GEMM
// (Lk <= a few thousand: a direct softmax, no online rescaling), softmax / masks / dropout run in one
// vectorised pass per row, and the products with V (and in the backward dV, dK, dQ) are GEMMs again.
// Forward saves only the row statistics (max, log of the sum); the backward recomputes the probabilities.
#include <stdint.h>

#include "philox.h"
#include "qformer_cpu_layout.h"
#include "qformer_params.h"

#define FB_INLINE static inline __attribute__((always_inline))

namespace fastbridge {
namespace FB_ISA_NS {
namespace {

constexpr int VL = FB_VBYTES / 4;  // floats per vector
constexpr int NV = 2;              // vectors per micro-kernel row
constexpr int NR = NV * VL;        // columns per micro-kernel
constexpr int MR = FB_MR;

typedef float vf __attribute__((vector_size(FB_VBYTES)));
typedef int32_t vi __attribute__((vector_size(FB_VBYTES)));

FB_INLINE vf vload(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(vf));
  return v;
}
FB_INLINE void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(vf)); }
FB_INLINE vf vset(float x) {  // a broadcast (not `vf{} + x`: 0 + x is no identity for x = -0)
#if defined(__clang__)
  vf v;
  for (int i = 0; i < VL; ++i) v[i] = x;
  return v;
#else
  const vf v = {x};
  return __builtin_shuffle(v, vi{});
#endif
}
FB_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
FB_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VL; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
FB_INLINE float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}
FB_INLINE float bits2f(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
FB_INLINE uint32_t f2bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

const float kNegInf = -__builtin_inff();
const float kPosInf = __builtin_inff();

// exp(x), vectorised (Cephes expf, |rel. error| < 2e-7); x < -87.3 (incl. -inf) gives exactly 0.
FB_INLINE vf vexp(vf x) {
  const vf lo = vset(-87.3365447505531f);
  const vi tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > vset(88.3762626647949f) ? vset(88.3762626647949f) : x;
  vf fx = x * vset(1.44269504088896341f) + vset(0.5f);
  vf t = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);  // trunc toward 0
  fx = t > fx ? t - vset(1.f) : t;                                      // floor
  x = x - fx * vset(0.693359375f) - fx * vset(-2.12194440e-4f);
  const vf z = x * x;
  vf y = vset(1.9875691500E-4f);
  y = y * x + vset(1.3981999507E-3f);
  y = y * x + vset(8.3334519073E-3f);
  y = y * x + vset(4.1665795894E-2f);
  y = y * x + vset(1.6666665459E-1f);
  y = y * x + vset(5.0000001201E-1f);
  y = y * z + x + vset(1.f);
  const vi n = __builtin_convertvector(fx, vi);
  vi e = (n + 127) << 23;
  vf pow2n;
  __builtin_memcpy(&pow2n, &e, sizeof(vf));
  y = y * pow2n;
  return tiny ? vset(0.f) : y;
}

// ------------------------------------------------------------------------------ element conversion
FB_INLINE float h2f(uint16_t h) {  // IEEE half -> float (as c10::Half)
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits2f((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f2bits(denormalized) : f2bits(normalized));
  return bits2f(r);
}
FB_INLINE uint16_t f2h(float f) {  // float -> IEEE half, round to nearest even (as c10::Half)
  const uint32_t w = f2bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (bits2f(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
FB_INLINE float b2f(uint16_t b) { return bits2f((uint32_t)b << 16); }
FB_INLINE uint16_t f2b(float f) {  // float -> bfloat16, round to nearest even (as c10::BFloat16)
  const uint32_t u = f2bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// src row of n elements of type dt -> dst floats
FB_INLINE void load_row(ElemType dt, const void* src, int64_t n, float* dst) {
  if (dt == ElemType::f32) {
    const float* s = (const float*)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i];
  } else if (dt == ElemType::f16) {
    const uint16_t* s = (const uint16_t*)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = h2f(s[i]);
  } else {
    const uint16_t* s = (const uint16_t*)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = b2f(s[i]);
  }
}
// src row -> column `col` of a row-major (n x ld) float matrix (a transposed load)
FB_INLINE void load_col(ElemType dt, const void* src, int64_t n, float* dst, int64_t ld) {
  if (dt == ElemType::f32) {
    const float* s = (const float*)src;
    for (int64_t i = 0; i < n; ++i) dst[i * ld] = s[i];
  } else if (dt == ElemType::f16) {
    const uint16_t* s = (const uint16_t*)src;
    for (int64_t i = 0; i < n; ++i) dst[i * ld] = h2f(s[i]);
  } else {
    const uint16_t* s = (const uint16_t*)src;
    for (int64_t i = 0; i < n; ++i) dst[i * ld] = b2f(s[i]);
  }
}
FB_INLINE void store_row(ElemType dt, const float* src, int64_t n, float mul, void* dst) {
  if (dt == ElemType::f32) {
    float* d = (float*)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mul;
  } else if (dt == ElemType::f16) {
    uint16_t* d = (uint16_t*)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = f2h(src[i] * mul);
  } else {
    uint16_t* d = (uint16_t*)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = f2b(src[i] * mul);
  }
}
FB_INLINE int64_t esize(ElemType dt) { return dt == ElemType::f32 ? 4 : 2; }
FB_INLINE const void* at(const void* base, ElemType dt, int64_t elem) {
  return (const char*)base + elem * esize(dt);
}
FB_INLINE void* at_mut(void* base, ElemType dt, int64_t elem) { return (char*)base + elem * esize(dt); }
FB_INLINE void zero(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = 0.f;
}

// ----------------------------------------------------------------------------------------- GEMM
// C[m][0:NR) (+)= sum_k a(m, k) * B[k][0:NR) for m < ROWS, ROWS x NV vector accumulators in registers;
// a(m, k) = A[m*lda + k], or A[k*lda + m] when A_T (A stored transposed: a broadcast costs the same).
template <int ROWS, bool A_T>
FB_INLINE void micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     bool accumulate) {
  vf c[ROWS][NV];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < NV; ++v) c[m][v] = accumulate ? vload(C + m * ldc + v * VL) : vset(0.f);
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * VL);
    for (int m = 0; m < ROWS; ++m) {
      const vf a = vset(A_T ? A[k * lda + m] : A[m * lda + k]);
      for (int v = 0; v < NV; ++v) c[m][v] += a * b[v];
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < NV; ++v) vstore(C + m * ldc + v * VL, c[m][v]);
}

template <int ROWS, bool A_T>
FB_INLINE void micro_tail(int64_t rows, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                          float* C, int64_t ldc, bool accumulate) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS)
      micro<ROWS, A_T>(K, A, lda, B, ldb, C, ldc, accumulate);
    else
      micro_tail<ROWS - 1, A_T>(rows, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

// C[M][N] (+)= A[M][K] B[K][N] (A_T: A given as A^T, K x M), row-major, N a multiple of NR (B and C
// padded). Column blocks outer: a K x NR strip of B stays in L1 while the row blocks of A stream past.
template <bool A_T>
FB_INLINE void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += NR) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR) {
      const float* a = A_T ? A + m0 : A + m0 * lda;
      micro<MR, A_T>(K, a, lda, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    }
    if (m0 < M) {
      const float* a = A_T ? A + m0 : A + m0 * lda;
      micro_tail<MR - 1, A_T>(M - m0, K, a, lda, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------------- loaders
// rows x D matrix of `base` (row stride `ld_src` elements) -> float rows of `ld` (zero padding to ld)
FB_INLINE void load_mat(ElemType dt, const void* base, int64_t rows, int64_t ld_src, int64_t D, float* dst,
                        int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    load_row(dt, at(base, dt, r * ld_src), D, dst + r * ld);
    for (int64_t d = D; d < ld; ++d) dst[r * ld + d] = 0.f;
  }
}
// rows x D float matrix (row stride ld_src) -> its transpose, D x ld (columns rows..ld zero)
FB_INLINE void transpose(const float* src, int64_t rows, int64_t ld_src, int64_t D, float* dst, int64_t ld) {
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t r = 0; r < rows; ++r) dst[d * ld + r] = src[r * ld_src + d];
    for (int64_t r = rows; r < ld; ++r) dst[d * ld + r] = 0.f;
  }
}
// A rows x D operand as float rows: the tensor itself for float32 with D a multiple of kPad (a GEMM
// B operand reads whole padded rows, so only then), else converted into `buf` (row stride DP).
FB_INLINE const float* operand(ElemType dt, const void* base, int64_t rows, int64_t ld_src, int64_t D, int64_t DP,
                               float* buf, int64_t* ld_out) {
  if (dt == ElemType::f32 && D == DP) {
    *ld_out = ld_src;
    return (const float*)base;
  }
  load_mat(dt, base, rows, ld_src, D, buf, DP);
  *ld_out = DP;
  return buf;
}

// ------------------------------------------------------------------------------------ key helpers
// Scores are handled key-major (S^T: one row per key, queries along the vector lanes), so K and V
// are GEMM operands as they are stored, and per-query statistics (max, sum, log sum, delta) are vectors.

// Masked keys (key_mask false) influence nothing, whatever their K / V rows hold (NaN, inf): their rows
// are never read (the GEMM operands get zeros there: 0 * NaN would be NaN), their scores are set to -inf
// (never added to: NaN + -inf is NaN, and a NaN would reach the row max), and in the backward their dS /
// Pd rows are set to 0. The CUDA kernels do the same (qformer_cross_attention_cuda.cu).
FB_INLINE bool key_visible(const QfParams& p, int64_t b, int64_t j) {
  return !p.key_mask || p.key_mask[b * p.km_b + j * p.km_k];
}

// K or V rows [j0, j0 + n) of one (b, h) (`base` = row 0, row stride ld_src) as a GEMM operand (see
// operand()); rows of masked keys are zeros in `buf`, never read from the tensor.
FB_INLINE const float* key_operand(const QfParams& p, int64_t b, const void* base, int64_t j0, int64_t n,
                                   int64_t ld_src, int64_t DP, float* buf, int64_t* ld_out) {
  bool masked = false;
  for (int64_t r = 0; r < n && !masked; ++r) masked = !key_visible(p, b, j0 + r);
  const void* first = at(base, p.dtype, j0 * ld_src);
  if (!masked) return operand(p.dtype, first, n, ld_src, p.D, DP, buf, ld_out);
  for (int64_t r = 0; r < n; ++r) {
    float* dst = buf + r * DP;
    if (key_visible(p, b, j0 + r)) {
      load_row(p.dtype, at(first, p.dtype, r * ld_src), p.D, dst);
      zero(dst + p.D, DP - p.D);
    } else {
      zero(dst, DP);
    }
  }
  *ld_out = DP;
  return buf;
}

// st[0:LqP) = st * scale (+ bias[b, h, i, j] for i < Lq; columns i >= Lq left as they are) for a visible
// key j; -inf for a masked one.
FB_INLINE void scores_keyrow(const QfParams& p, int64_t b, int64_t h, int64_t j, int64_t LqP, float* st) {
  if (!key_visible(p, b, j)) {
    const vf ninf = vset(kNegInf);
    for (int64_t i = 0; i < LqP; i += VL) vstore(st + i, ninf);
    return;
  }
  const vf sc = vset(p.scale);
  for (int64_t i = 0; i < LqP; i += VL) vstore(st + i, vload(st + i) * sc);
  if (p.bias) {
    const float* bias = p.bias + b * p.bs_b + h * p.bs_h + j * p.bs_k;
    if (p.bs_q == 0) {
      const vf bv = vset(bias[0]);
      for (int64_t i = 0; i < LqP; i += VL) vstore(st + i, vload(st + i) + bv);
    } else {
      for (int64_t i = 0; i < p.Lq; ++i) st[i] += bias[i * p.bs_q];
    }
  }
}

typedef uint32_t vu __attribute__((vector_size(FB_VBYTES)));
typedef uint64_t vu64 __attribute__((vector_size(2 * FB_VBYTES)));

FB_INLINE vu vsplat_u(uint32_t x) {
#if defined(__clang__)
  vu v;
  for (int i = 0; i < VL; ++i) v[i] = x;
  return v;
#else
  const vu v = {x};
  return __builtin_shuffle(v, vi{});
#endif
}

// Philox4x32-10 (philox.h) on VL counters at once: the same stream, bit for bit.
FB_INLINE void philox_v(vu c0, vu c1, vu c2, vu c3, uint32_t k0, uint32_t k1, vu out[4]) {
  for (int round = 0; round < 10; ++round) {
    const vu64 p0 = __builtin_convertvector(c0, vu64) * (uint64_t)0xD2511F53u;
    const vu64 p1 = __builtin_convertvector(c2, vu64) * (uint64_t)0xCD9E8D57u;
    const vu hi0 = __builtin_convertvector(p0 >> 32, vu), lo0 = __builtin_convertvector(p0, vu);
    const vu hi1 = __builtin_convertvector(p1 >> 32, vu), lo1 = __builtin_convertvector(p1, vu);
    const vu n0 = hi1 ^ c1 ^ vsplat_u(k0);
    const vu n2 = hi0 ^ c3 ^ vsplat_u(k1);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// keepT[jj * ld + i] = 1/(1-p) or 0 for keys j0 + jj (jj < nk) of queries i (philox.h); j0 a multiple
// of 4. One vector Philox evaluation draws one 4-key group for VL queries (the counters of VL rows), so
// each of its 4 outputs is a contiguous run of keepT. Columns i >= Lq (up to ld) get values too, which
// the callers ignore.
FB_INLINE void keep_block_t(const QfParams& p, int64_t bh, int64_t j0, int64_t nk, float* keepT, int64_t ld) {
  const int64_t groups = (nk + 3) / 4;
  vu iota;
  for (int l = 0; l < VL; ++l) iota[l] = (uint32_t)l;
  const vu c2 = vsplat_u((uint32_t)p.offset), c3 = vsplat_u((uint32_t)(p.offset >> 32));
  const uint32_t k0 = (uint32_t)p.seed, k1 = (uint32_t)(p.seed >> 32);
  const vu thr = vsplat_u(p.keep_threshold);
  const vf kept = vset(p.rescale), dropped = vset(0.f);
  for (int64_t g = 0; g < groups; ++g) {
    const vu c0 = vsplat_u((uint32_t)(j0 / 4 + g));
    for (int64_t i0 = 0; i0 < p.Lq; i0 += VL) {
      vu r[4];
      philox_v(c0, vsplat_u((uint32_t)(bh * p.Lq + i0)) + iota, c2, c3, k0, k1, r);
      for (int t = 0; t < 4 && 4 * g + t < nk; ++t)
        vstore(keepT + (4 * g + t) * ld + i0, (r[t] >> 8) < thr ? kept : dropped);
    }
  }
}

// Prefetch rows [r0, r0 + n) of a rows x D matrix (row stride ld elements) into the cache.
FB_INLINE void prefetch_rows(ElemType dt, const void* base, int64_t r0, int64_t n, int64_t ld, int64_t D) {
  const int64_t rowb = D * esize(dt);
  for (int64_t r = r0; r < r0 + n; ++r) {
    const char* row = (const char*)at(base, dt, r * ld);
    for (int64_t o = 0; o < rowb; o += 64) __builtin_prefetch(row + o, 0, 2);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------ forward
// Per (b, h): S^T = K Q^T (Lk x Lq, whole rows: Lk up to a few thousand), scale / masks, per-query
// max, exp and sum as vectors, the dropout mask, O = P V, out = O / l, stats = (max, log l).
void qformer_fwd_range(const QfParams& p, int64_t begin, int64_t end, float* ws) {
  const cpu_layout::Layout L = cpu_layout::make_layout(p, false);
  const int64_t Lq = p.Lq, Lk = p.Lk, D = p.D, DP = L.DP, LqP = L.LqP;
  float* Qt = ws + L.qt;    // D x LqP
  float* Kb = ws + L.kf;    // Lk x DP (converted K, when needed)
  float* Vb = ws + L.vf;    // Lk x DP (converted V, when needed)
  float* ST = ws + L.st;    // Lk x LqP: scores, then probabilities (transposed)
  float* keepT = ws + L.keep;  // Lk x LqP
  float* O = ws + L.o;      // Lq x DP
  float* qrows = ws + L.o;  // scratch for q rows (Lq x DP) before O is computed
  float* mx = ws + L.m;     // LqP
  float* sm = ws + L.l;     // LqP
  float* mz = ws + L.dq;    // LqP: the max, 0 for a row that sees no key
  const bool dropout = p.dropout_p > 0.f;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.H, h = bh % p.H;
    int64_t ldq, ldk, ldv;
    const float* q = operand(p.dtype, at(p.q, p.dtype, b * p.sq.b + h * p.sq.h), Lq, p.sq.l, D, DP, qrows, &ldq);
    transpose(q, Lq, ldq, D, Qt, LqP);
    const float* K = key_operand(p, b, at(p.k, p.dtype, b * p.sk.b + h * p.sk.h), 0, Lk, p.sk.l, DP, Kb, &ldk);
    const float* V = key_operand(p, b, at(p.v, p.dtype, b * p.sv.b + h * p.sv.h), 0, Lk, p.sv.l, DP, Vb, &ldv);
    gemm<false>(Lk, LqP, D, K, ldk, Qt, LqP, ST, LqP, false);  // S^T = K Q^T
    if (bh + 1 < end) {  // the next pair's K comes in during this pair's softmax and P V
      const int64_t b2 = (bh + 1) / p.H, h2 = (bh + 1) % p.H;
      prefetch_rows(p.dtype, at(p.k, p.dtype, b2 * p.sk.b + h2 * p.sk.h), 0, Lk, p.sk.l, D);
    }
    const int64_t nvq = LqP / VL;
    for (int64_t i = 0; i < LqP; i += VL) vstore(mx + i, vset(kNegInf));
    for (int64_t j = 0; j < Lk; ++j) {
      float* st = ST + j * LqP;
      scores_keyrow(p, b, h, j, LqP, st);
      for (int64_t c = 0; c < nvq; ++c) vstore(mx + c * VL, vmax(vload(mx + c * VL), vload(st + c * VL)));
    }
    for (int64_t i = 0; i < LqP; i += VL) {
      const vf m = vload(mx + i);
      vstore(mz + i, m == vset(kNegInf) ? vset(0.f) : m);  // a row that sees no key: exp(-inf - 0) = 0
      vstore(sm + i, vset(0.f));
    }
    for (int64_t j = 0; j < Lk; ++j) {
      float* st = ST + j * LqP;
      for (int64_t c = 0; c < nvq; ++c) {
        const vf e = vexp(vload(st + c * VL) - vload(mz + c * VL));
        vstore(sm + c * VL, vload(sm + c * VL) + e);
        vstore(st + c * VL, e);
      }
    }
    if (dropout) {  // padding columns (queries >= Lq) are never read
      keep_block_t(p, bh, 0, Lk, keepT, LqP);
      for (int64_t j = 0; j < Lk; ++j)
        for (int64_t i = 0; i < LqP; i += VL) vstore(ST + j * LqP + i, vload(ST + j * LqP + i) * vload(keepT + j * LqP + i));
    }
    if (bh + 1 < end) {  // and its V during this pair's P V and the next pair's K Q^T
      const int64_t b2 = (bh + 1) / p.H, h2 = (bh + 1) % p.H;
      prefetch_rows(p.dtype, at(p.v, p.dtype, b2 * p.sv.b + h2 * p.sv.h), 0, Lk, p.sv.l, D);
    }
    gemm<true>(Lq, DP, Lk, ST, LqP, V, ldv, O, DP, false);  // O = P V (unnormalised, dropout applied)
    float* stats = p.stats + bh * Lq * 2;
    for (int64_t i = 0; i < Lq; ++i) {
      const float l = sm[i];
      stats[2 * i] = l > 0.f ? mx[i] : kPosInf;
      stats[2 * i + 1] = l > 0.f ? __builtin_logf(l) : 0.f;
      store_row(p.dtype, O + i * DP, D, l > 0.f ? 1.f / l : 0.f, at_mut(p.out, p.dtype, (bh * Lq + i) * D));
    }
  }
}

// ----------------------------------------------------------------------------------------- backward
// dS = P o (dP - delta), delta_i = sum_d dO_id O_id; dV = Pd^T dO, dK = scale dS^T Q, dQ = scale dS K,
// where P = exp((S - m) - log l) is recomputed and Pd / dP carry the replayed dropout mask. Key blocks of KB
// (their scores and gradients stay in L1/L2), all key-major: S^T = K Q^T, dPd^T = V dO^T, then
// dV = Pd^T dO, dK = dS^T Q and dQ += (dS^T)^T K are GEMMs on the blocks as they are.
void qformer_bwd_range(const QfParams& p, int64_t begin, int64_t end, float* ws) {
  const cpu_layout::Layout L = cpu_layout::make_layout(p, true);
  const int64_t Lq = p.Lq, Lk = p.Lk, D = p.D, DP = L.DP, LqP = L.LqP, KB = L.KB;
  float* Q = ws + L.q;      // Lq x DP
  float* Qt = ws + L.qt;    // D x LqP
  float* dO = ws + L.dO;    // Lq x DP
  float* dOt = ws + L.dOt;  // D x LqP
  float* mrow = ws + L.m;   // LqP: row max (+inf padding)
  float* logl = ws + L.ll;  // LqP: log of the row sum (0 padding)
  float* delta = ws + L.l;  // LqP (0 padding)
  float* dQ = ws + L.dq;    // Lq x DP (accumulated over key blocks)
  float* Kb = ws + L.kf;    // KB x DP (converted K block, when needed)
  float* Vb = ws + L.vf;    // KB x DP
  float* ST = ws + L.st;    // KB x LqP: scores, then dS^T
  float* dPT = ws + L.dpt;  // KB x LqP: dPd^T, then Pd^T
  float* keepT = ws + L.keep;  // KB x LqP
  float* dK = ws + L.dk;    // KB x DP
  float* dV = ws + L.dv;    // KB x DP
  const bool dropout = p.dropout_p > 0.f;
  const int64_t nvq = LqP / VL;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.H, h = bh % p.H;
    load_mat(p.dtype, at(p.q, p.dtype, b * p.sq.b + h * p.sq.h), Lq, p.sq.l, D, Q, DP);
    load_mat(p.dtype, at(p.dout, p.dtype, b * p.sdo.b + h * p.sdo.h), Lq, p.sdo.l, D, dO, DP);
    transpose(Q, Lq, DP, D, Qt, LqP);
    transpose(dO, Lq, DP, D, dOt, LqP);
    for (int64_t i = 0; i < LqP; ++i) {
      float acc = 0.f;
      if (i < Lq) {
        float* orow = dQ;  // scratch before dQ is accumulated
        load_row(p.dtype, at(p.out, p.dtype, (bh * Lq + i) * D), D, orow);
        for (int64_t d = 0; d < D; ++d) acc += orow[d] * dO[i * DP + d];
      }
      delta[i] = acc;
      mrow[i] = i < Lq ? p.stats[(bh * Lq + i) * 2] : kPosInf;  // +inf: P = exp(-inf) = 0
      logl[i] = i < Lq ? p.stats[(bh * Lq + i) * 2 + 1] : 0.f;
    }
    zero(dQ, Lq * DP);
    const void* kbase = at(p.k, p.dtype, b * p.sk.b + h * p.sk.h);
    const void* vbase = at(p.v, p.dtype, b * p.sv.b + h * p.sv.h);
    for (int64_t j0 = 0; j0 < Lk; j0 += KB) {
      const int64_t nk = Lk - j0 < KB ? Lk - j0 : KB;  // keys in this block
      int64_t ldk, ldv;
      const float* K = key_operand(p, b, kbase, j0, nk, p.sk.l, DP, Kb, &ldk);
      const float* V = key_operand(p, b, vbase, j0, nk, p.sv.l, DP, Vb, &ldv);
      if (j0 + KB < Lk) {  // the next block's K and V rows come in while this block computes
        const int64_t nn = Lk - j0 - KB < KB ? Lk - j0 - KB : KB;
        prefetch_rows(p.dtype, kbase, j0 + KB, nn, p.sk.l, D);
        prefetch_rows(p.dtype, vbase, j0 + KB, nn, p.sv.l, D);
      }
      gemm<false>(nk, LqP, D, K, ldk, Qt, LqP, ST, LqP, false);    // S^T = K Q^T
      gemm<false>(nk, LqP, D, V, ldv, dOt, LqP, dPT, LqP, false);  // dPd^T = V dO^T
      if (dropout) keep_block_t(p, bh, j0, nk, keepT, LqP);
      for (int64_t jj = 0; jj < nk; ++jj) {
        float* st = ST + jj * LqP;
        float* dpt = dPT + jj * LqP;
        const float* kp = keepT + jj * LqP;
        if (!key_visible(p, b, j0 + jj)) {  // a masked key: dS = Pd = 0 exactly
          zero(st, LqP);
          zero(dpt, LqP);
          continue;
        }
        scores_keyrow(p, b, h, j0 + jj, LqP, st);
        for (int64_t c = 0; c < nvq; ++c) {
          const int64_t i = c * VL;
          const vf pr = vexp((vload(st + i) - vload(mrow + i)) - vload(logl + i));
          vf pd = pr, dpv = vload(dpt + i);
          if (dropout) {
            vf kv = vload(kp + i);
            if (i + VL > Lq) {  // padding queries: keep values never written
              for (int t = 0; t < VL; ++t)
                if (i + t >= Lq) kv[t] = 0.f;
            }
            pd = pr * kv;
            dpv = dpv * kv;
          }
          vstore(st + i, pr * (dpv - vload(delta + i)));  // dS^T
          vstore(dpt + i, pd);                             // Pd^T
        }
      }
      gemm<false>(nk, DP, Lq, dPT, LqP, dO, DP, dV, DP, false);  // dV = Pd^T dO
      gemm<false>(nk, DP, Lq, ST, LqP, Q, DP, dK, DP, false);    // dK = dS^T Q   (x scale on store)
      gemm<true>(Lq, DP, nk, ST, LqP, K, ldk, dQ, DP, true);     // dQ += dS K    (x scale on store)
      for (int64_t jj = 0; jj < nk; ++jj) {
        const int64_t j = j0 + jj;
        store_row(p.dtype, dK + jj * DP, D, p.scale, at_mut(p.dk, p.dtype, b * p.sdk.b + h * p.sdk.h + j * p.sdk.l));
        store_row(p.dtype, dV + jj * DP, D, 1.f, at_mut(p.dv, p.dtype, b * p.sdv.b + h * p.sdv.h + j * p.sdv.l));
      }
    }
    if (p.dq_acc) {
      for (int64_t i = 0; i < Lq; ++i) {
        float* d = p.dq_acc + (bh * Lq + i) * D;
        for (int64_t e = 0; e < D; ++e) d[e] = dQ[i * DP + e] * p.scale;
      }
    } else {
      for (int64_t i = 0; i < Lq; ++i)
        store_row(p.dtype, dQ + i * DP, D, p.scale, at_mut(p.dq, p.dtype, b * p.sdq.b + h * p.sdq.h + i * p.sdq.l));
    }
  }
}

// The keep mask (1 = kept) of rows [begin, end) of the (B*H*Lq, Lk) probabilities (debug / tests).
void qformer_keep_rows(const QfParams& p, int64_t begin, int64_t end, bool* keep_out) {
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t g = 0; g < (p.Lk + 3) / 4; ++g) {
      const PhiloxOut r = fb_dropout_draw(p.seed, p.offset, (uint64_t)row, (uint64_t)g);
      for (int t = 0; t < 4 && 4 * g + t < p.Lk; ++t)
        keep_out[row * p.Lk + 4 * g + t] = fb_dropout_keep(r.x[t], p.keep_threshold);
    }
  }
}

}  // namespace FB_ISA_NS
}  // namespace fastbridge
