// bias_act on the CPU: one fused pass over memory instead of PyTorch's four (add, act, scale, clamp),
// and its registration as the CPU kernel of p2pz::bias_act and p2pz::bias_act_grad.
//
// The tensor is walked in memory order. The bias index of element i is (i / stride(dim)) % size(dim),
// valid for any dense layout (channels_last included). Runs of elements sharing one bias value (NCHW,
// dim=1: a whole H*W plane) use a scalar bias; when dim is innermost (stride 1: channels_last, or
// [N, C] features) the inner loop walks the bias vector instead. Both loops vectorise.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "bias_act.h"

namespace p2pz {
namespace {

// out[i] = bias_act_value(x[i] + bias, dy[i]) over a run of n elements; ORDER 0 ignores dy.
template <int A, int ORDER, typename scalar_t, typename acc_t, bool VECTOR_BIAS>
inline void run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ b,
                acc_t scalar_bias, scalar_t* __restrict__ out, int64_t n, acc_t alpha, acc_t gain, acc_t clamp) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t t = static_cast<acc_t>(x[i]) + (VECTOR_BIAS ? static_cast<acc_t>(b[i]) : scalar_bias);
    const acc_t g = ORDER == 0 ? acc_t(0) : static_cast<acc_t>(dy[i]);
    out[i] = static_cast<scalar_t>(bias_act_value<A, ORDER, acc_t>(t, g, alpha, gain, clamp));
  }
}

template <int A, int ORDER, typename scalar_t>
void bias_act_kernel(const BiasActArgs& a, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const acc_t alpha = a.alpha, gain = a.gain, clamp = a.clamp;
  const scalar_t* xp = a.x.data_ptr<scalar_t>();
  const scalar_t* dyp = ORDER == 0 ? nullptr : a.dy.data_ptr<scalar_t>();
  const scalar_t* bp = a.b.defined() ? a.b.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t n = a.x.numel();
  const int64_t size_b = bp ? a.x.size(a.dim) : 1;
  const int64_t step_b = bp ? a.x.stride(a.dim) : n;
  constexpr int64_t kGrain = 16384;

  if (size_b == 1) {  // no bias, or a single value: one flat run
    const acc_t bias = bp ? static_cast<acc_t>(bp[0]) : acc_t(0);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      run<A, ORDER, scalar_t, acc_t, false>(xp + begin, dyp ? dyp + begin : nullptr, nullptr, bias, op + begin,
                                            end - begin, alpha, gain, clamp);
    });
  } else if (step_b == 1) {  // bias varies fastest: rows of size_b elements against the whole bias vector
    const int64_t rows = n / size_b;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / size_b), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * size_b;
        run<A, ORDER, scalar_t, acc_t, true>(xp + o, dyp ? dyp + o : nullptr, bp, acc_t(0), op + o, size_b, alpha,
                                             gain, clamp);
      }
    });
  } else {  // runs of step_b elements with one bias value each
    const int64_t runs = n / step_b;
    at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / step_b), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * step_b;
        run<A, ORDER, scalar_t, acc_t, false>(xp + o, dyp ? dyp + o : nullptr, nullptr,
                                              static_cast<acc_t>(bp[r % size_b]), op + o, step_b, alpha, gain, clamp);
      }
    });
  }
}

template <int ORDER, typename scalar_t>
void dispatch_act(const BiasActArgs& a, at::Tensor& out) {
  switch (a.act) {
#define P2PZ_CASE(A) \
  case A:            \
    return bias_act_kernel<A, ORDER, scalar_t>(a, out);
    P2PZ_FOR_EACH_ACT(P2PZ_CASE)
#undef P2PZ_CASE
  }
}

// order 0: the forward value; order k >= 1: dy times the k-th derivative (see bias_act.h).
void bias_act_cpu(const BiasActArgs& a, at::Tensor& out) {
  P2PZ_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "bias_act_cpu", [&] {
    if (a.order == 0) dispatch_act<0, scalar_t>(a, out);
    if (a.order == 1) dispatch_act<1, scalar_t>(a, out);
    if (a.order == 2) dispatch_act<2, scalar_t>(a, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(p2pz, CPU, m) {
  m.impl("bias_act", &bias_act_op<bias_act_cpu>);
  m.impl("bias_act_grad", &bias_act_grad_op<bias_act_cpu>);
}

}  // namespace p2pz
