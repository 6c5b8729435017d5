// upfirdn2d on CUDA: shared-memory tiles for the common cases, a generic kernel for everything else; and
// its registration as the CUDA kernel of p2pz::upfirdn2d.
//
// Both compute, per output pixel, y[oy, ox] = sum_{ky, kx} taps[ky, kx] * u[oy*down + ky - pad0, ...]
// where u is the zero-stuffed input, visiting only the taps that land on real input samples (polyphase).
// `taps` is the filter already flipped for a convolution (or not, with flip_filter) and scaled by gain.
//
// * Tiled kernel (NCHW, up/down in {1, 2}, filters up to 4x4 / 8x8, StyleGAN2's [1,3,3,1] cases): one
//   block computes a TILE_H x TILE_W output tile of one plane; it loads the taps and the input tile that
//   the tile needs into shared memory once, then every thread reads only shared memory.
// * Generic kernel (any up/down/filter, any layout through strides): one thread per output pixel,
//   reading input and taps from global memory.
// Indices are 64-bit in the generic kernel; the tiled one is chosen only when 32-bit offsets suffice.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "upfirdn2d.h"

namespace p2pz {
namespace {

__device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) { return (a >= 0 ? a : a - (b - 1)) / b; }

struct Params {
  int64_t N, C, H, W, OH, OW;
  int64_t sx_n, sx_c, sx_h, sx_w;  // input strides (elements)
  int64_t sy_n, sy_c, sy_h, sy_w;  // output strides
  int upx, upy, downx, downy, padx0, pady0, fh, fw;
};

// ---------------------------------------------------------------------------------------------------
// Generic kernel

template <typename scalar_t, typename acc_t>
__global__ void upfirdn2d_generic(const scalar_t* __restrict__ x, const acc_t* __restrict__ taps,
                                  scalar_t* __restrict__ y, Params p) {
  const int64_t total = p.N * p.C * p.OH * p.OW;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ox = idx % p.OW, oy = (idx / p.OW) % p.OH, c = (idx / (p.OW * p.OH)) % p.C,
                  n = idx / (p.OW * p.OH * p.C);
    const scalar_t* xp = x + n * p.sx_n + c * p.sx_c;
    // First tap whose upsampled position is a real sample, and the input index it reads.
    const int64_t vy0 = oy * p.downy - p.pady0, vx0 = ox * p.downx - p.padx0;
    const int ky0 = (int)(((-vy0) % p.upy + p.upy) % p.upy), kx0 = (int)(((-vx0) % p.upx + p.upx) % p.upx);
    acc_t acc = 0;
    for (int ky = ky0; ky < p.fh; ky += p.upy) {
      const int64_t iy = floor_div(vy0 + ky, p.upy);
      if (iy < 0 || iy >= p.H) continue;
      for (int kx = kx0; kx < p.fw; kx += p.upx) {
        const int64_t ix = floor_div(vx0 + kx, p.upx);
        if (ix < 0 || ix >= p.W) continue;
        acc += taps[ky * p.fw + kx] * static_cast<acc_t>(xp[iy * p.sx_h + ix * p.sx_w]);
      }
    }
    y[n * p.sy_n + c * p.sy_c + oy * p.sy_h + ox * p.sy_w] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// Tiled kernel (NCHW contiguous input and output)

template <typename scalar_t, typename acc_t, int UP, int DOWN, int FMAX, int TILE_W, int TILE_H>
__global__ void upfirdn2d_tiled(const scalar_t* __restrict__ x, const acc_t* __restrict__ taps,
                                scalar_t* __restrict__ y, Params p) {
  constexpr int IN_W = ((TILE_W - 1) * DOWN + FMAX - 1) / UP + 1;  // input tile covering the output tile
  constexpr int IN_H = ((TILE_H - 1) * DOWN + FMAX - 1) / UP + 1;
  __shared__ acc_t sf[FMAX][FMAX];
  __shared__ acc_t sx[IN_H][IN_W + 1];  // +1 column against bank conflicts

  const int tid = threadIdx.x;
  // Taps, zero-padded to FMAX x FMAX: extra taps contribute nothing.
  for (int i = tid; i < FMAX * FMAX; i += blockDim.x) {
    const int ky = i / FMAX, kx = i % FMAX;
    sf[ky][kx] = (ky < p.fh && kx < p.fw) ? taps[ky * p.fw + kx] : acc_t(0);
  }

  const int64_t plane = blockIdx.z;  // n * C + c
  const int oy0 = blockIdx.y * TILE_H, ox0 = blockIdx.x * TILE_W;
  // First input row / column the tile reads (ceil of the first upsampled position over UP).
  const int iy0 = (int)floor_div((int64_t)oy0 * DOWN - p.pady0 + UP - 1, UP);
  const int ix0 = (int)floor_div((int64_t)ox0 * DOWN - p.padx0 + UP - 1, UP);
  const scalar_t* xp = x + plane * p.H * p.W;
  for (int i = tid; i < IN_H * IN_W; i += blockDim.x) {
    const int ly = i / IN_W, lx = i % IN_W, iy = iy0 + ly, ix = ix0 + lx;
    sx[ly][lx] = (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W) ? static_cast<acc_t>(xp[iy * p.W + ix]) : acc_t(0);
  }
  __syncthreads();

  scalar_t* yp = y + plane * p.OH * p.OW;
  for (int i = tid; i < TILE_W * TILE_H; i += blockDim.x) {
    const int oy = oy0 + i / TILE_W, ox = ox0 + i % TILE_W;
    if (oy >= p.OH || ox >= p.OW) continue;
    const int vy = oy * DOWN - p.pady0, vx = ox * DOWN - p.padx0;
    const int py = (int)(((-vy) % UP + UP) % UP), px = (int)(((-vx) % UP + UP) % UP);  // first real tap
    const int ly = (int)floor_div(vy + py, UP) - iy0, lx = (int)floor_div(vx + px, UP) - ix0;
    acc_t acc = 0;
#pragma unroll
    for (int ty = 0; ty < FMAX / UP; ++ty) {
#pragma unroll
      for (int tx = 0; tx < FMAX / UP; ++tx) {
        const int ky = py + ty * UP, kx = px + tx * UP;
        if (ky < FMAX && kx < FMAX) acc += sf[ky][kx] * sx[ly + ty][lx + tx];
      }
    }
    yp[(int64_t)oy * p.OW + ox] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t, int UP, int DOWN, int FMAX, int TILE_W, int TILE_H>
void launch_tiled(const scalar_t* x, const acc_t* taps, scalar_t* y, const Params& p, cudaStream_t stream) {
  const dim3 grid((p.OW + TILE_W - 1) / TILE_W, (p.OH + TILE_H - 1) / TILE_H, p.N * p.C);
  upfirdn2d_tiled<scalar_t, acc_t, UP, DOWN, FMAX, TILE_W, TILE_H><<<grid, 256, 0, stream>>>(x, taps, y, p);
}

// Picks a tiled kernel for (up, down, filter size), or returns false for the generic one.
template <typename scalar_t, typename acc_t>
bool try_tiled(const scalar_t* x, const acc_t* taps, scalar_t* y, const Params& p, cudaStream_t stream) {
  if (p.upx != p.upy || p.downx != p.downy) return false;
  const int up = p.upx, down = p.downx, fmax = p.fh > p.fw ? p.fh : p.fw;
  if (fmax > 8 || (up > 1 && down > 1)) return false;
#define P2PZ_TILE(U, D, F, TW, TH)                                                  \
  if (up == U && down == D && fmax <= F) {                                          \
    launch_tiled<scalar_t, acc_t, U, D, F, TW, TH>(x, taps, y, p, stream);          \
    return true;                                                                    \
  }
  P2PZ_TILE(1, 1, 4, 64, 16)
  P2PZ_TILE(1, 1, 8, 64, 16)
  P2PZ_TILE(2, 1, 4, 64, 16)
  P2PZ_TILE(2, 1, 8, 64, 16)
  P2PZ_TILE(1, 2, 4, 32, 16)
  P2PZ_TILE(1, 2, 8, 32, 16)
#undef P2PZ_TILE
  return false;
}

void upfirdn2d_cuda(const Upfirdn2dArgs& a, at::Tensor& y) {
  check_cuda(a.x, "upfirdn2d");
  const c10::cuda::CUDAGuard guard(a.x.device());  // the launches go to x's GPU and its current stream
  const at::Tensor& x = a.x;
  const int64_t N = x.size(0), C = x.size(1);
  Params p{N, C, x.size(2), x.size(3), y.size(2), y.size(3),
           x.stride(0), x.stride(1), x.stride(2), x.stride(3),
           y.stride(0), y.stride(1), y.stride(2), y.stride(3),
           (int)a.upx, (int)a.upy, (int)a.downx, (int)a.downy, (int)a.padx0, (int)a.pady0,
           (int)a.f.size(0), (int)a.f.size(1)};
  const bool nchw = a.format == at::MemoryFormat::Contiguous;
  const bool small = x.numel() < INT32_MAX && y.numel() < INT32_MAX && N * C <= 65535;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  P2PZ_DISPATCH_FLOATING_TYPES(x.scalar_type(), "upfirdn2d_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    // Taps in the formula's frame (a convolution flips the filter), gain folded in.
    at::Tensor taps = a.flip_filter ? a.f : a.f.flip({0, 1});
    taps = (taps.to(x.device(), acc_dtype) * a.gain).contiguous();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t* tp = taps.data_ptr<acc_t>();
    if (!(nchw && small && try_tiled<scalar_t, acc_t>(xp, tp, yp, p, stream))) {
      const int64_t total = y.numel();
      const int threads = 256;
      const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 16);
      upfirdn2d_generic<scalar_t, acc_t><<<(unsigned)blocks, threads, 0, stream>>>(xp, tp, yp, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(p2pz, CUDA, m) { m.impl("upfirdn2d", &upfirdn2d_op<upfirdn2d_cuda>); }

}  // namespace p2pz
