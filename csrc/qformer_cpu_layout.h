// Workspace layout of the CPU kernel (float offsets), shared by the ISA-specific kernel translation
// units and the dispatcher that allocates one workspace per thread. No torch / std headers.
#pragma once

#include <stdint.h>

#include "qformer_params.h"

namespace fastbridge {
namespace cpu_layout {

// Every GEMM column block of every ISA (8, 16 or 32 floats) divides 32: N dimensions are padded to it.
static const int64_t kPad = 32;

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Backward key block: a block's K, V, scores and gradients (~60 K floats for Lq = 32, D = 64) stay in L2.
static const int64_t kBwdKeyBlock = 128;

struct Layout {
  int64_t DP, LqP, KB;  // padded D and Lq (multiples of kPad: GEMM N dimensions), backward key block
  int64_t qt, kf, vf, st, keep, o, m, l, ll, dq;  // forward: whole key range (Lk up to a few thousand)
  int64_t q, dO, dOt, dpt, dk, dv;            // backward: key blocks of KB (the buffers above sized KB)
  int64_t total;                              // floats per thread
};

// The forward's (bwd = false) or the backward's layout.
static inline Layout make_layout(const QfParams& p, bool bwd) {
  Layout L;
  L.DP = round_up(p.D, kPad);
  L.LqP = round_up(p.Lq, kPad);
  L.KB = round_up(p.Lk, 4) < kBwdKeyBlock ? round_up(p.Lk, 4) : kBwdKeyBlock;
  {
    const int64_t keys = bwd ? L.KB : p.Lk;
    int64_t off = 0;
    auto take = [&off](int64_t n) {
      const int64_t at = off;
      off += round_up(n, 16);  // 64-byte aligned blocks
      return at;
    };
    L.qt = take(p.D * L.LqP);
    L.kf = take(keys * L.DP);
    L.vf = take(keys * L.DP);
    L.st = take(keys * L.LqP);
    L.keep = take(keys * L.LqP);
    L.o = take(L.LqP * L.DP);
    L.m = take(L.LqP);
    L.l = take(L.LqP);
    L.ll = take(L.LqP);
    L.dq = take(L.LqP * L.DP);
    if (bwd) {
      L.q = take(L.LqP * L.DP);
      L.dO = take(L.LqP * L.DP);
      L.dOt = take(p.D * L.LqP);
      L.dpt = take(keys * L.LqP);
      L.dk = take(keys * L.DP);
      L.dv = take(keys * L.DP);
    }
    L.total = off;
  }
  return L;
}

}  // namespace cpu_layout
}  // namespace fastbridge
