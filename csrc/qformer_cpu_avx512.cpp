// qformer_cpu_kernel.h compiled for AVX-512 (F/BW/DQ/VL + FMA); picked at run time by the dispatcher.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif
#define FB_ISA_NS cpu_avx512
#define FB_VBYTES 64
#define FB_MR 8
#include "qformer_cpu_kernel.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
