// upfirdn2d's kernels, the part the CPU (upfirdn2d.cpp) and CUDA (upfirdn2d.cu) versions share: the
// operand checks, the output's size and memory format (rules that upfirdn2d.py's fake kernel mirrors),
// and the operator's entry point over one device's kernel.
#pragma once

#include "common.h"

namespace p2pz {

// The checked operands of one upfirdn2d call.
struct Upfirdn2dArgs {
  at::Tensor x;  // the input, in the output's memory format
  at::MemoryFormat format;  // that format: Contiguous (NCHW) or ChannelsLast
  at::Tensor f;  // the 2-D filter as given (not yet flipped or scaled)
  int64_t upx, upy, downx, downy, padx0, pady0;
  bool flip_filter;
  double gain;
};

// A device's kernel: fills `y` (non-empty, [N, C, OH, OW] in x's memory format).
using Upfirdn2dKernel = void (*)(const Upfirdn2dArgs& a, at::Tensor& y);

// Output size along one axis: upsampled input, padded, minus the filter's support, then every down-th.
inline int64_t upfirdn2d_out_size(int64_t in, int64_t up, int64_t down, int64_t pad0, int64_t pad1, int64_t taps) {
  return (in * up + pad0 + pad1 - taps + down) / down;
}

// upfirdn2d writes channels_last exactly when its input is channels_last (and not also contiguous).
inline at::MemoryFormat upfirdn2d_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// p2pz::upfirdn2d on the device of `Kernel`.
template <Upfirdn2dKernel Kernel>
at::Tensor upfirdn2d_op(const at::Tensor& x, const at::Tensor& f, int64_t upx, int64_t upy, int64_t downx,
                        int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1, bool flip_filter,
                        double gain) {
  TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be [N, C, H, W]");
  TORCH_CHECK(f.dim() == 2, "upfirdn2d: the operator takes a 2-D filter");
  TORCH_CHECK(upx >= 1 && upy >= 1 && downx >= 1 && downy >= 1, "upfirdn2d: up and down must be >= 1");
  const int64_t oh = upfirdn2d_out_size(x.size(2), upy, downy, pady0, pady1, f.size(0));
  const int64_t ow = upfirdn2d_out_size(x.size(3), upx, downx, padx0, padx1, f.size(1));
  TORCH_CHECK(oh >= 1 && ow >= 1, "upfirdn2d: the output would be empty (", oh, "x", ow, ")");
  const auto format = upfirdn2d_memory_format(x);
  const Upfirdn2dArgs a{x.contiguous(format), format, f, upx, upy, downx, downy, padx0, pady0, flip_filter, gain};
  at::Tensor y = at::empty({x.size(0), x.size(1), oh, ow}, a.x.options().memory_format(format));
  if (y.numel() > 0) Kernel(a, y);
  return y;
}

}  // namespace p2pz
