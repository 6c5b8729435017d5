// bias_act on CUDA: one fused elementwise pass (bias, activation or its derivative, gain, clamp), and its
// registration as the CUDA kernel of p2pz::bias_act and p2pz::bias_act_grad.
//
// Each thread handles LOOP elements spaced a block apart (coalesced), walking the dense tensor in memory
// order; the bias index of element i is (i / stride(dim)) % size(dim), valid for any dense layout.
// Math runs in float for half/bfloat16/float and in double for double (common.h).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "bias_act.h"

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
void launch(const BiasActArgs& a, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = a.x.numel();
  const int64_t blocks = (n + kThreads * kLoop - 1) / (kThreads * kLoop);
  TORCH_CHECK(blocks <= INT32_MAX, "bias_act: tensor too large");
  const scalar_t* bp = a.b.defined() ? a.b.data_ptr<scalar_t>() : nullptr;
  const int64_t size_b = bp ? a.x.size(a.dim) : 1, step_b = bp ? std::max<int64_t>(a.x.stride(a.dim), 1) : 1;
  const scalar_t* dyp = ORDER == 0 ? nullptr : a.dy.data_ptr<scalar_t>();
  const acc_t alpha = a.alpha, gain = a.gain, clamp = a.clamp;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (a.act) {
#define P2PZ_CASE(A)                                                                                         \
  case A:                                                                                                    \
    bias_act_kernel<A, ORDER, scalar_t, acc_t><<<(unsigned)blocks, kThreads, 0, stream>>>(                   \
        a.x.data_ptr<scalar_t>(), dyp, bp, out.data_ptr<scalar_t>(), n, step_b, size_b, alpha, gain, clamp); \
    break;
    P2PZ_FOR_EACH_ACT(P2PZ_CASE)
#undef P2PZ_CASE
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// order 0: the forward value; order k >= 1: dy times the k-th derivative (see bias_act.h).
void bias_act_cuda(const BiasActArgs& a, at::Tensor& out) {
  check_cuda(a.x, "bias_act");
  const c10::cuda::CUDAGuard guard(a.x.device());  // the launches go to x's GPU and its current stream
  P2PZ_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "bias_act_cuda", [&] {
    if (a.order == 0) launch<0, scalar_t>(a, out);
    if (a.order == 1) launch<1, scalar_t>(a, out);
    if (a.order == 2) launch<2, scalar_t>(a, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(p2pz, CUDA, m) {
  m.impl("bias_act", &bias_act_op<bias_act_cuda>);
  m.impl("bias_act_grad", &bias_act_grad_op<bias_act_cuda>);
}

}  // namespace p2pz
