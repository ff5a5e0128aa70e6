// qformer_cpu_kernel.h compiled for AVX2 + FMA; picked at run time by the dispatcher.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define FB_ISA_NS cpu_avx2
#define FB_VBYTES 32
#define FB_MR 6
#include "qformer_cpu_kernel.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
