// bias_act on CUDA: one fused elementwise pass (bias, activation or its derivative, gain, clamp).
//
// Each thread handles LOOP elements spaced a block apart (coalesced), walking the dense tensor in memory
// order; the bias index of element i is (i / stride(dim)) % size(dim), valid for any dense layout.
// Math runs in float for half/bfloat16/float and in double for double (ops_common.h).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops_common.h"

namespace p2pz {
namespace {

constexpr int kThreads = 128;
constexpr int kLoop = 4;

template <int A, int ORDER, typename scalar_t, typename acc_t>
__global__ void bias_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                const scalar_t* __restrict__ b, scalar_t* __restrict__ out, int64_t n,
                                int64_t step_b, int64_t size_b, acc_t alpha, acc_t gain, acc_t clamp) {
  int64_t i = (int64_t)blockIdx.x * kThreads * kLoop + threadIdx.x;
  for (int k = 0; k < kLoop && i < n; ++k, i += kThreads) {
    const acc_t bias = b ? static_cast<acc_t>(b[(i / step_b) % size_b]) : acc_t(0);
    const acc_t t = static_cast<acc_t>(x[i]) + bias;
    const acc_t g = ORDER == 0 ? acc_t(0) : static_cast<acc_t>(dy[i]);
    out[i] = static_cast<scalar_t>(bias_act_value<A, ORDER, acc_t>(t, g, alpha, gain, clamp));
  }
}

template <int ORDER, typename scalar_t>
void launch(Act act, const at::Tensor& x, const at::Tensor& dy, const at::Tensor& b, at::Tensor& out, int64_t dim,
            double alpha, double gain, double clamp) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = x.numel();
  const int64_t blocks = (n + kThreads * kLoop - 1) / (kThreads * kLoop);
  TORCH_CHECK(blocks <= INT32_MAX, "bias_act: tensor too large");
  const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
  const int64_t size_b = bp ? x.size(dim) : 1, step_b = bp ? std::max<int64_t>(x.stride(dim), 1) : 1;
  const scalar_t* dyp = ORDER == 0 ? nullptr : dy.data_ptr<scalar_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (act) {
#define P2PZ_CASE(A)                                                                                       \
  case A:                                                                                                  \
    bias_act_kernel<A, ORDER, scalar_t, acc_t><<<(unsigned)blocks, kThreads, 0, stream>>>(                \
        x.data_ptr<scalar_t>(), dyp, bp, out.data_ptr<scalar_t>(), n, step_b, size_b, (acc_t)alpha,     \
        (acc_t)gain, (acc_t)clamp);                                                                        \
    break;
    P2PZ_FOR_EACH_ACT(P2PZ_CASE)
#undef P2PZ_CASE
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bias_act_any(const at::Tensor& x_in, const at::Tensor& dy_in, const std::optional<at::Tensor>& b_in,
                        int64_t dim, const std::string& act_name, double alpha, double gain, double clamp,
                        int64_t order) {
  TORCH_CHECK(x_in.is_cuda(), "bias_act: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const BiasActArgs args = bias_act_args(x_in, dy_in, b_in, dim, act_name, order);
  const at::Tensor &x = args.x, &dy = args.dy, &b = args.b;
  const Act act = args.act;
  dim = args.dim;
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
    if (order == 0) launch<0, scalar_t>(act, x, dy, b, out, dim, alpha, gain, clamp);
    if (order == 1) launch<1, scalar_t>(act, x, dy, b, out, dim, alpha, gain, clamp);
    if (order == 2) launch<2, scalar_t>(act, x, dy, b, out, dim, alpha, gain, clamp);
  });
  return out;
}

at::Tensor bias_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                         c10::string_view act, double alpha, double gain, double clamp) {
  return bias_act_any(x, at::Tensor(), b, dim, std::string(act), alpha, gain, clamp, 0);
}

at::Tensor bias_act_grad_cuda(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& b,
                              int64_t dim, c10::string_view act, double alpha, double gain, double clamp,
                              int64_t order) {
  TORCH_CHECK(order >= 1, "bias_act_grad: order must be >= 1");
  return bias_act_any(x, dy, b, dim, std::string(act), alpha, gain, clamp, order);
}

}  // namespace

TORCH_LIBRARY_IMPL(p2pz, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_grad", &bias_act_grad_cuda);
}

}  // namespace p2pz
