// bias_act on the CPU: one fused pass over memory instead of PyTorch's four (add, act, scale, clamp).
//
// The tensor is walked in memory order. The bias index of element i is (i / stride(dim)) % size(dim),
// valid for any dense layout (channels_last included). Runs of elements sharing one bias value (NCHW,
// dim=1: a whole H*W plane) use a scalar bias; when dim is innermost (stride 1: channels_last, or
// [N, C] features) the inner loop walks the bias vector instead. Both loops vectorise.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops_common.h"

namespace p2pz {
namespace {

struct Params {
  double alpha, gain, clamp;
};

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
void bias_act_kernel(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& b, at::Tensor& out, int64_t dim,
                     const Params& prm) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t alpha = prm.alpha, gain = prm.gain, clamp = prm.clamp;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* dyp = ORDER == 0 ? nullptr : dy.data_ptr<scalar_t>();
  const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t n = x.numel();
  const int64_t size_b = bp ? x.size(dim) : 1;
  const int64_t step_b = bp ? x.stride(dim) : n;
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
void dispatch_act(Act act, const at::Tensor& x, const at::Tensor& dy, const at::Tensor& b, at::Tensor& out,
                  int64_t dim, const Params& prm) {
  switch (act) {
#define P2PZ_CASE(A) \
  case A:            \
    return bias_act_kernel<A, ORDER, scalar_t>(x, dy, b, out, dim, prm);
    P2PZ_FOR_EACH_ACT(P2PZ_CASE)
#undef P2PZ_CASE
  }
}

// order 0: the forward value; order k >= 1: dy times the k-th derivative (see ops_common.h).
at::Tensor bias_act_any(const at::Tensor& x_in, const at::Tensor& dy_in, const std::optional<at::Tensor>& b_in,
                        int64_t dim, const std::string& act_name, double alpha, double gain, double clamp,
                        int64_t order) {
  const BiasActArgs args = bias_act_args(x_in, dy_in, b_in, dim, act_name, order);
  const at::Tensor &x = args.x, &dy = args.dy, &b = args.b;
  const Act act = args.act;
  dim = args.dim;
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const Params prm{alpha, gain, clamp};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
    if (order == 0) dispatch_act<0, scalar_t>(act, x, dy, b, out, dim, prm);
    if (order == 1) dispatch_act<1, scalar_t>(act, x, dy, b, out, dim, prm);
    if (order == 2) dispatch_act<2, scalar_t>(act, x, dy, b, out, dim, prm);
  });
  return out;
}

at::Tensor bias_act_cpu(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                        c10::string_view act, double alpha, double gain, double clamp) {
  return bias_act_any(x, at::Tensor(), b, dim, std::string(act), alpha, gain, clamp, 0);
}

at::Tensor bias_act_grad_cpu(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& b,
                             int64_t dim, c10::string_view act, double alpha, double gain, double clamp,
                             int64_t order) {
  TORCH_CHECK(order >= 1, "bias_act_grad: order must be >= 1");
  return bias_act_any(x, dy, b, dim, std::string(act), alpha, gain, clamp, order);
}

}  // namespace

TORCH_LIBRARY_IMPL(p2pz, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_grad", &bias_act_grad_cpu);
}

}  // namespace p2pz
