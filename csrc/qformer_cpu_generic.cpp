// qformer_cpu_kernel.h compiled for the baseline of the build flags (SSE2 on x86-64, NEON on arm64):
// the fallback on every CPU and the only instance off x86-64.
#define FB_ISA_NS cpu_generic
#define FB_VBYTES 16
#define FB_MR 4
#include "qformer_cpu_kernel.h"
