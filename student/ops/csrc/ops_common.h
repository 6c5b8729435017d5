// Shared by the C++ CPU and the CUDA kernels of the p2pz ops: the activation table with its first and
// second derivatives, and the output-layout rules that the Python fake kernels (_library.py) mirror.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#ifdef __CUDACC__
#define P2PZ_HD __host__ __device__ __forceinline__
#else
#define P2PZ_HD inline
#endif

namespace p2pz {

// ------------------------------------------------------------------------------------------------
// Layout rules

// upfirdn2d writes channels_last exactly when its input is channels_last (and not also contiguous).
inline at::MemoryFormat upfirdn2d_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// bias_act runs over memory linearly, so it needs a dense tensor; its output has the same strides.
inline at::Tensor dense(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : x.contiguous();
}

// `t` laid out exactly like `like` (a dense tensor of the same shape).
inline at::Tensor same_strides(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

// ------------------------------------------------------------------------------------------------
// Activations

enum Act : int { kLinear, kRelu, kLrelu, kTanh, kSigmoid, kElu, kSelu, kSoftplus, kSwish };

// X-macro over every Act, for the kernels' `switch (act)` dispatch (one template instance per case).
#define P2PZ_FOR_EACH_ACT(X) X(kLinear) X(kRelu) X(kLrelu) X(kTanh) X(kSigmoid) X(kElu) X(kSelu) X(kSoftplus) X(kSwish)

inline Act act_from_name(const std::string& name) {
  static const char* names[] = {"linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish"};
  for (int i = 0; i < 9; ++i)
    if (name == names[i]) return static_cast<Act>(i);
  TORCH_CHECK(false, "bias_act: unknown activation '", name, "'");
  return kLinear;
}

// The checked, dense operands of bias_act / bias_act_grad, shared by the CPU and CUDA entry points.
struct BiasActArgs {
  at::Tensor x, dy, b;  // dy and b undefined when absent; all laid out like x
  int64_t dim;
  Act act;
};

inline BiasActArgs bias_act_args(const at::Tensor& x_in, const at::Tensor& dy_in,
                                 const std::optional<at::Tensor>& b_in, int64_t dim, const std::string& act_name,
                                 int64_t order) {
  TORCH_CHECK(order >= 0 && order <= 2, "bias_act: only derivatives of order 1 and 2 are implemented");
  BiasActArgs a;
  a.act = act_from_name(act_name);
  a.dim = c10::maybe_wrap_dim(dim, x_in.dim());
  a.x = dense(x_in);
  if (order > 0) a.dy = same_strides(dy_in, a.x);
  if (b_in.has_value() && b_in->defined()) {
    a.b = b_in->to(a.x.scalar_type()).contiguous();
    TORCH_CHECK(a.b.dim() == 1 && a.b.numel() == a.x.size(a.dim), "bias_act: b must have shape [x.shape[dim]]");
  }
  return a;
}

P2PZ_HD float fexp(float v) { return expf(v); }
P2PZ_HD double fexp(double v) { return exp(v); }
P2PZ_HD float fexpm1(float v) { return expm1f(v); }
P2PZ_HD double fexpm1(double v) { return expm1(v); }
P2PZ_HD float ftanh(float v) { return tanhf(v); }
P2PZ_HD double ftanh(double v) { return tanh(v); }
P2PZ_HD float flog1p(float v) { return log1pf(v); }
P2PZ_HD double flog1p(double v) { return log1p(v); }

// a = act(t) and d = the ORDER-th derivative of act at t (d is unused for ORDER 0).
// Conventions at kinks follow PyTorch's autograd, so the kernels match the reference exactly.
template <int A, int ORDER, typename T>
P2PZ_HD void activation(T t, T alpha, T& a, T& d) {
  const T one = T(1), zero = T(0);
  if (A == kLinear) {
    a = t;
    d = ORDER == 1 ? one : zero;
  } else if (A == kRelu) {
    a = t > zero ? t : zero;
    d = ORDER == 1 && t > zero ? one : zero;
  } else if (A == kLrelu) {
    const T slope = t > zero ? one : alpha;  // a select, not a branch: the loop vectorises
    a = t * slope;
    d = ORDER == 1 ? slope : zero;
  } else if (A == kTanh) {
    a = ftanh(t);
    const T d1 = one - a * a;
    d = ORDER == 1 ? d1 : T(-2) * a * d1;
  } else if (A == kSigmoid) {
    a = one / (one + fexp(-t));
    const T d1 = a * (one - a);
    d = ORDER == 1 ? d1 : d1 * (one - T(2) * a);
  } else if (A == kElu) {
    a = t > zero ? t : fexpm1(t);
    d = t > zero ? (ORDER == 1 ? one : zero) : fexp(t);
  } else if (A == kSelu) {
    const T scale = T(1.0507009873554804934193349852946), sa = T(1.6732632423543772848170429916717);
    a = t > zero ? scale * t : scale * sa * fexpm1(t);
    d = t > zero ? (ORDER == 1 ? scale : zero) : scale * sa * fexp(t);
  } else if (A == kSoftplus) {  // threshold 20, as torch.nn.functional.softplus
    if (t > T(20)) {
      a = t;
      d = ORDER == 1 ? one : zero;
    } else {
      const T z = fexp(t);
      a = flog1p(z);
      const T s = z / (z + one);
      d = ORDER == 1 ? s : s * (one - s);
    }
  } else {  // kSwish
    const T s = one / (one + fexp(-t));
    a = t * s;
    d = ORDER == 1 ? s * (one + t * (one - s)) : s * (one - s) * (T(2) + t * (one - T(2) * s));
  }
}

// ORDER 0: clamp(act(t) * gain). ORDER k >= 1: dy * d^k/dt^k of the same (clamping passes the gradient
// only where the unclamped value lies within [-clamp, clamp], as torch.clamp does).
template <int A, int ORDER, typename T>
P2PZ_HD T bias_act_value(T t, T dy, T alpha, T gain, T clamp) {
  T a, d;
  activation<A, ORDER, T>(t, alpha, a, d);
  const T s = a * gain;
  if (ORDER == 0) {
    if (clamp < T(0)) return s;
    const T lo = s < -clamp ? -clamp : s;
    return lo > clamp ? clamp : lo;
  }
  const T inside = (clamp < T(0) || (s >= -clamp && s <= clamp)) ? T(1) : T(0);
  return dy * d * gain * inside;
}

// upfirdn2d along one axis: output o uses upsampled sample v = o * down + k - pad0 of tap k (in the
// flipped-filter frame); only v that are multiples of `up` are real input samples i = v / up.
// Output positions of one tap form a progression o = o0 + j * o_step, i = i0 + j * i_step.
struct TapRun {
  int64_t o0 = 0, i0 = 0, n = 0;
};

inline int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

inline TapRun tap_run(int64_t k, int64_t up, int64_t down, int64_t pad0, int64_t in_size, int64_t out_size) {
  const int64_t g = gcd64(up, down), o_step = up / g, i_step = down / g;
  TapRun r;
  for (int64_t o = 0; o < out_size; ++o) {
    const int64_t v = o * down + k - pad0;
    if (v >= 0 && v % up == 0) {  // the first real input sample; later ones only move further right
      if (v / up >= in_size) break;
      r.o0 = o;
      r.i0 = v / up;
      const int64_t n_out = (out_size - 1 - o) / o_step + 1, n_in = (in_size - 1 - r.i0) / i_step + 1;
      r.n = n_out < n_in ? n_out : n_in;
      break;
    }
  }
  return r;
}

}  // namespace p2pz
