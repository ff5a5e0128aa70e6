// CPU implementation of the fastbridge::qformer_attn_* ops: picks the kernel instance for this CPU
// (AVX-512, AVX2 or the baseline; FASTBRIDGE_CPU_ISA=generic|avx2|avx512 lowers the choice) and runs
// it in parallel over the (batch, head) pairs with at::parallel_for, one workspace per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "qformer_cpu_layout.h"
#include "qformer_host.h"

namespace fastbridge {

#define FB_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                        \
  void qformer_fwd_range(const QfParams& p, int64_t begin, int64_t end, float* ws);     \
  void qformer_bwd_range(const QfParams& p, int64_t begin, int64_t end, float* ws);     \
  void qformer_keep_rows(const QfParams& p, int64_t begin, int64_t end, bool* keep_out); \
  }
FB_DECLARE_ISA(cpu_generic)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FB_X86_DISPATCH 1
FB_DECLARE_ISA(cpu_avx2)
FB_DECLARE_ISA(cpu_avx512)
#endif

namespace {

enum CpuIsa : int64_t { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa detected_isa() {
#ifdef FB_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kGeneric;
}

// The instance used now: the best this CPU runs, lowered by FASTBRIDGE_CPU_ISA (read at each call).
CpuIsa active_isa() {
  static const CpuIsa best = detected_isa();
  CpuIsa isa = best;
  if (const char* e = std::getenv("FASTBRIDGE_CPU_ISA")) {
    CpuIsa want = best;
    if (std::strcmp(e, "generic") == 0) want = kGeneric;
    else if (std::strcmp(e, "avx2") == 0) want = kAvx2;
    else if (std::strcmp(e, "avx512") == 0) want = kAvx512;
    if (want < isa) isa = want;
  }
  return isa;
}

void run_fwd(CpuIsa isa, const QfParams& p, int64_t b, int64_t e, float* ws) {
#ifdef FB_X86_DISPATCH
  if (isa == kAvx512) return cpu_avx512::qformer_fwd_range(p, b, e, ws);
  if (isa == kAvx2) return cpu_avx2::qformer_fwd_range(p, b, e, ws);
#endif
  cpu_generic::qformer_fwd_range(p, b, e, ws);
}

void run_bwd(CpuIsa isa, const QfParams& p, int64_t b, int64_t e, float* ws) {
#ifdef FB_X86_DISPATCH
  if (isa == kAvx512) return cpu_avx512::qformer_bwd_range(p, b, e, ws);
  if (isa == kAvx2) return cpu_avx2::qformer_bwd_range(p, b, e, ws);
#endif
  cpu_generic::qformer_bwd_range(p, b, e, ws);
}

struct FreeDeleter {
  void operator()(float* ptr) const { std::free(ptr); }
};

std::unique_ptr<float, FreeDeleter> workspace(int64_t floats) {
  const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64;
  return std::unique_ptr<float, FreeDeleter>(static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64)));
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastbridge::qformer_attn (CPU): ", name, " must be a CPU tensor");
}

std::tuple<at::Tensor, at::Tensor> qformer_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const std::optional<at::Tensor>& key_mask,
                                                        const std::optional<at::Tensor>& bias, double scale,
                                                        double dropout_p, const std::optional<at::Tensor>& rng,
                                                        bool /*allow_tf32*/) {
  check_cpu(q, "q");
  QfParams p;
  QfInputs in = prepare(p, q, k, v, key_mask, bias, scale, dropout_p, rng);
  at::Tensor out = new_output({p.B, p.H, p.Lq, p.D}, q.options());
  at::Tensor stats = new_output({p.B, p.H, p.Lq, 2}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  if (out.numel() == 0) return {out, stats};
  const cpu_layout::Layout L = cpu_layout::make_layout(p, /*bwd=*/false);
  const CpuIsa isa = active_isa();
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    auto ws = workspace(L.total);
    run_fwd(isa, p, begin, end, ws.get());
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qformer_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng, bool /*allow_tf32*/) {
  check_cpu(q, "q");
  QfParams p;
  QfInputs in = prepare(p, q, k, v, key_mask, bias, scale, dropout_p, rng);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({p.B, p.H, p.Lq, p.D}) && out.sizes() == dout.sizes(),
              "fastbridge::qformer_attn_bwd: dout and out must be (B, H, Lq, D)");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastbridge::qformer_attn_bwd: dout and out must have q's dtype");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.sizes() == at::IntArrayRef({p.B, p.H, p.Lq, 2}),
              "fastbridge::qformer_attn_bwd: stats must be float32 (B, H, Lq, 2), as the forward returns it");
  const at::Tensor dout_c = unit_last_stride(dout);
  const at::Tensor out_c = out.contiguous();
  const at::Tensor stats_c = stats.contiguous();
  p.dout = dout_c.data_ptr();
  p.sdo = strides3(dout_c);
  p.out = const_cast<void*>(out_c.data_ptr());
  p.stats = const_cast<float*>(stats_c.data_ptr<float>());
  const bool q_broadcast = q.size(0) != p.B;
  at::Tensor dq = grad_like(q);
  at::Tensor dk = grad_like(k);
  at::Tensor dv = grad_like(v);
  at::Tensor dq_acc;
  if (q_broadcast) {
    dq_acc = at::empty({p.B, p.H, p.Lq, p.D}, q.options().dtype(at::kFloat));
    p.dq_acc = dq_acc.data_ptr<float>();
  } else {
    p.dq = dq.data_ptr();
    p.sdq = strides3(dq);
  }
  p.dk = dk.data_ptr();
  p.sdk = strides3(dk);
  p.dv = dv.data_ptr();
  p.sdv = strides3(dv);
  if (p.B * p.H > 0) {
    const cpu_layout::Layout L = cpu_layout::make_layout(p, /*bwd=*/true);
    const CpuIsa isa = active_isa();
    at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
      auto ws = workspace(L.total);
      run_bwd(isa, p, begin, end, ws.get());
    });
  }
  if (q_broadcast) dq.copy_(dq_acc.sum(0, /*keepdim=*/true));
  return {dq, dk, dv};
}

// The dropout keep mask (B, H, Lq, Lk) of the probabilities of an (out-shaped) `like`: the mask every
// kernel (CPU and CUDA) applies for this rng = [seed, offset] -- for tests and debugging.
at::Tensor qformer_dropout_keep_cpu(const at::Tensor& like, const at::Tensor& rng, int64_t Lk, double dropout_p) {
  const at::Tensor r = rng.contiguous();
  const QfParams p = dropout_keep_params(like, r, Lk, dropout_p);
  at::Tensor keep = at::empty({p.B, p.H, p.Lq, Lk}, like.options().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  at::parallel_for(0, p.B * p.H * p.Lq, 64,
                   [&](int64_t begin, int64_t end) { cpu_generic::qformer_keep_rows(p, begin, end, kp); });
  return keep;
}

}  // namespace

int64_t qformer_cpu_isa() { return active_isa(); }

TORCH_LIBRARY_IMPL(fastbridge, CPU, m) {
  m.impl("qformer_attn_fwd", &qformer_attn_fwd_cpu);
  m.impl("qformer_attn_bwd", &qformer_attn_bwd_cpu);
  m.impl("qformer_dropout_keep", &qformer_dropout_keep_cpu);
}

}  // namespace fastbridge
