// What the kernels of both ops (bias_act, upfirdn2d) share, on the CPU and on CUDA: the dtypes they
// run on, the type they accumulate in, and the check that a CUDA entry point got CUDA tensors.
// Everything specific to one op lives in that op's own header (bias_act.h, upfirdn2d.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

// Every kernel is instantiated for float64, float32, float16 and bfloat16.
#define P2PZ_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace p2pz {

// Accumulator type: double for double, float for float / half / bfloat16 (PyTorch's own rule).
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// The dispatcher picks the CUDA kernel when any argument is a CUDA tensor; x itself must be one.
inline void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
}

}  // namespace p2pz
