// bias_act's kernels, the part the CPU (bias_act.cpp) and CUDA (bias_act.cu) versions share: the
// activation table with first and second derivatives, the checked operands, and the two operators'
// entry points over one device's kernel. The Python fake kernel (bias_act.py) mirrors the layout rule.
#pragma once

#include <optional>
#include <string>

#include "common.h"

#ifdef __CUDACC__
#define P2PZ_HD __host__ __device__ __forceinline__
#else
#define P2PZ_HD inline
#endif

namespace p2pz {

// ------------------------------------------------------------------------------------------------
// Activations

enum Act : int { kLinear, kRelu, kLrelu, kTanh, kSigmoid, kElu, kSelu, kSoftplus, kSwish };

// X-macro over every Act, for the kernels' `switch (act)` dispatch (one template instance per case).
#define P2PZ_FOR_EACH_ACT(X) X(kLinear) X(kRelu) X(kLrelu) X(kTanh) X(kSigmoid) X(kElu) X(kSelu) X(kSoftplus) X(kSwish)

inline Act act_from_name(c10::string_view name) {
  static const char* names[] = {"linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish"};
  for (int i = 0; i < 9; ++i)
    if (name == names[i]) return static_cast<Act>(i);
  TORCH_CHECK(false, "bias_act: unknown activation '", std::string(name), "'");
  return kLinear;
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

// ------------------------------------------------------------------------------------------------
// Operands and entry points

// The checked, dense operands of one bias_act (order 0) or bias_act_grad (order >= 1) call.
struct BiasActArgs {
  at::Tensor x, dy, b;  // dy and b undefined when absent; all laid out like x
  int64_t dim;
  Act act;
  double alpha, gain, clamp;
  int64_t order;
};

// A device's kernel: fills `out` (non-empty, laid out like a.x) with the value of order a.order.
using BiasActKernel = void (*)(const BiasActArgs& a, at::Tensor& out);

// The kernels run over memory linearly, so they need a dense x; the output gets its strides (the rule
// that bias_act.py's fake kernel mirrors), and dy is copied to them when its own differ.
inline BiasActArgs bias_act_args(const at::Tensor& x, const at::Tensor& dy, const std::optional<at::Tensor>& b,
                                 int64_t dim, c10::string_view act, double alpha, double gain, double clamp,
                                 int64_t order) {
  TORCH_CHECK(order >= 0 && order <= 2, "bias_act: only derivatives of order 1 and 2 are implemented");
  BiasActArgs a{};
  a.act = act_from_name(act);
  a.dim = c10::maybe_wrap_dim(dim, x.dim());
  a.x = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  if (order > 0) a.dy = dy.strides() == a.x.strides() ? dy : at::empty_like(a.x).copy_(dy);
  if (b.has_value() && b->defined()) {
    a.b = b->to(a.x.scalar_type()).contiguous();
    TORCH_CHECK(a.b.dim() == 1 && a.b.numel() == a.x.size(a.dim), "bias_act: b must have shape [x.shape[dim]]");
  }
  a.alpha = alpha;
  a.gain = gain;
  a.clamp = clamp;
  a.order = order;
  return a;
}

inline at::Tensor run_bias_act(BiasActKernel kernel, const BiasActArgs& a) {
  at::Tensor out = at::empty_like(a.x);
  if (out.numel() > 0) kernel(a, out);
  return out;
}

// p2pz::bias_act on the device of `Kernel`: y = clamp(act(x + b) * gain).
template <BiasActKernel Kernel>
at::Tensor bias_act_op(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim, c10::string_view act,
                       double alpha, double gain, double clamp) {
  return run_bias_act(Kernel, bias_act_args(x, at::Tensor(), b, dim, act, alpha, gain, clamp, 0));
}

// p2pz::bias_act_grad on the device of `Kernel`: dy times the order-th derivative of bias_act in x.
template <BiasActKernel Kernel>
at::Tensor bias_act_grad_op(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& b,
                            int64_t dim, c10::string_view act, double alpha, double gain, double clamp,
                            int64_t order) {
  TORCH_CHECK(order >= 1, "bias_act_grad: order must be >= 1");
  return run_bias_act(Kernel, bias_act_args(x, dy, b, dim, act, alpha, gain, clamp, order));
}

}  // namespace p2pz
