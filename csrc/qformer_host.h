// Host-side helpers shared by the CPU and CUDA implementations of the fastbridge::qformer_attn_*
// ops: argument checks, parameter blocks, poisoned outputs, dropout constants.
// (Python validates every argument first, with ValueErrors naming it; these checks are the C++ API's.)
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "qformer_params.h"

namespace fastbridge {

inline bool poison_enabled() {
  const char* e = std::getenv("FASTBRIDGE_POISON");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

// at::empty, filled with NaN when FASTBRIDGE_POISON=1 (an element a kernel forgets to write fails the
// tests instead of passing on stale memory).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_enabled() && t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

inline ElemType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElemType::f32;
    case at::kHalf:
      return ElemType::f16;
    case at::kBFloat16:
      return ElemType::bf16;
    default:
      TORCH_CHECK(false, "fastbridge::qformer_attn: q, k, v must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// Last dimension contiguous (any other strides are kept).
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline QfStrides strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The gradient of an input: laid out like the input where that layout is dense with a unit last stride
// (as autograd wants a leaf's grad: no re-layout copy), else contiguous. Poisoned like new_output.
// fastbridge/ops/qformer_cross_attention.py's fake kernel applies the same rule.
inline at::Tensor grad_like(const at::Tensor& t) {
  at::Tensor g = at::empty_like(t);
  if (g.dim() > 0 && g.size(-1) > 1 && g.stride(-1) != 1) g = at::empty(t.sizes(), t.options());
  if (poison_enabled() && g.numel() > 0) g.fill_(std::numeric_limits<float>::quiet_NaN());
  return g;
}

struct QfInputs {
  at::Tensor q, k, v, key_mask, bias, rng;  // key_mask / bias / rng undefined when absent
};

// Dropout seed / offset from a contiguous int64 rng = [seed, offset]: read here from a CPU tensor, or
// left on the device for the kernels to read (rng_dev: the values a CUDA graph replay draws anew).
inline void set_rng(QfParams& p, const at::Tensor& r) {
  if (r.device().is_cpu()) {
    p.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
    p.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
    p.rng_dev = nullptr;
  } else {
    p.rng_dev = r.data_ptr<int64_t>();
  }
}

// Checks shapes / dtypes / devices and fills the input part of `p`; returns the tensors kept alive.
inline QfInputs prepare(QfParams& p, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                        const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias,
                        double scale, double dropout_p, const std::optional<at::Tensor>& rng) {
  std::memset(&p, 0, sizeof(p));
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4,
              "fastbridge::qformer_attn: q, k, v must be 4-d (B, H, L, D)");
  TORCH_CHECK(k_.sizes() == v_.sizes(), "fastbridge::qformer_attn: k and v must have the same shape");
  const int64_t B = k_.size(0), H = k_.size(1), Lk = k_.size(2), D = k_.size(3);
  TORCH_CHECK((q_.size(0) == B || q_.size(0) == 1) && q_.size(1) == H && q_.size(3) == D,
              "fastbridge::qformer_attn: q must be (B or 1, H, Lq, D) with k's B, H, D");
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
              "fastbridge::qformer_attn: q, k, v must have the same dtype");
  TORCH_CHECK(q_.device() == k_.device() && q_.device() == v_.device(),
              "fastbridge::qformer_attn: q, k, v must be on the same device");
  TORCH_CHECK(Lk >= 1, "fastbridge::qformer_attn: k must hold at least one key");
  QfInputs in;
  in.q = unit_last_stride(q_);
  in.k = unit_last_stride(k_);
  in.v = unit_last_stride(v_);
  p.dtype = elem_type(in.q);
  p.B = B;
  p.H = H;
  p.Lq = q_.size(2);
  p.Lk = Lk;
  p.D = D;
  TORCH_CHECK(B * H * std::max<int64_t>(p.Lq, 1) < (int64_t(1) << 32),
              "fastbridge::qformer_attn: B * H * Lq must be < 2^32 (dropout counter)");
  p.q = in.q.data_ptr();
  p.sq = strides3(in.q);
  if (in.q.size(0) == 1) p.sq.b = 0;  // one query batch broadcast over the B images
  p.k = in.k.data_ptr();
  p.sk = strides3(in.k);
  p.v = in.v.data_ptr();
  p.sv = strides3(in.v);
  if (key_mask.has_value() && key_mask->defined()) {
    const at::Tensor& m = *key_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == Lk,
                "fastbridge::qformer_attn: key_mask must be bool (B, Lk)");
    TORCH_CHECK(m.device() == q_.device(), "fastbridge::qformer_attn: key_mask must be on q's device");
    in.key_mask = m;
    p.key_mask = m.data_ptr<bool>();
    p.km_b = m.stride(0);
    p.km_k = m.stride(1);
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_floating_point() && bias->dim() <= 4,
                "fastbridge::qformer_attn: bias must be a float tensor broadcastable to (B, H, Lq, Lk)");
    TORCH_CHECK(bias->device() == q_.device(), "fastbridge::qformer_attn: bias must be on q's device");
    at::Tensor bf = bias->scalar_type() == at::kFloat ? *bias : bias->to(at::kFloat);
    while (bf.dim() < 4) bf = bf.unsqueeze(0);
    bf = bf.expand({B, H, p.Lq, Lk});  // a view: broadcast dimensions get stride 0
    in.bias = bf;
    p.bias = bf.data_ptr<float>();
    p.bs_b = bf.stride(0);
    p.bs_h = bf.stride(1);
    p.bs_q = bf.stride(2);
    p.bs_k = bf.stride(3);
  }
  p.scale = static_cast<float>(scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastbridge::qformer_attn: dropout_p must be in [0, 1)");
  p.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng.has_value() && rng->defined() && rng->scalar_type() == at::kLong && rng->numel() >= 2 &&
                    (rng->device().is_cpu() || rng->device() == q_.device()),
                "fastbridge::qformer_attn: dropout needs rng, an int64 tensor [seed, offset] on the CPU or on q's "
                "device");
    in.rng = rng->contiguous();
    set_rng(p, in.rng);
    p.keep_threshold = static_cast<uint32_t>(std::ceil((1.0 - dropout_p) * 16777216.0));
    p.rescale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  return in;
}

// Parameters of fastbridge::qformer_dropout_keep (the debug op returning the dropout mask of an
// out-shaped `like` for rng = [seed, offset]); shared by the CPU and CUDA implementations.
// `rng` must be contiguous and outlive the launch.
inline QfParams dropout_keep_params(const at::Tensor& like, const at::Tensor& rng, int64_t Lk, double dropout_p) {
  TORCH_CHECK(like.dim() == 4, "fastbridge::qformer_dropout_keep: like must be (B, H, Lq, D)");
  TORCH_CHECK(dropout_p > 0.0 && dropout_p < 1.0, "fastbridge::qformer_dropout_keep: dropout_p must be in (0, 1)");
  QfParams p;
  std::memset(&p, 0, sizeof(p));
  p.B = like.size(0);
  p.H = like.size(1);
  p.Lq = like.size(2);
  p.Lk = Lk;
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.numel() >= 2 && (rng.device().is_cpu() || rng.device() == like.device()),
              "fastbridge::qformer_dropout_keep: rng must be an int64 tensor [seed, offset] on the CPU or on like's device");
  set_rng(p, rng);  // rng contiguous (the caller keeps it alive)
  p.keep_threshold = static_cast<uint32_t>(std::ceil((1.0 - dropout_p) * 16777216.0));
  return p;
}

}  // namespace fastbridge
