// upfirdn2d on the CPU: polyphase FIR resampling, parallel over (image plane, output row) or, for small
// NCHW planes, over blocks of planes; and its registration as the CPU kernel of p2pz::upfirdn2d.
//
// For every output row, each filter row that lands on a real (not zero-inserted) input row adds
// weight * input row to the row's accumulator, one filter tap at a time. The output columns a tap
// reaches form an arithmetic progression (TapRun), so the accumulator is kept phase-major (column o at
// phase o % o_step, slot o / o_step) and the input row is deinterleaved the same way: every inner loop is
// then a contiguous multiply-add that the compiler vectorises.
//
// Layouts: NCHW runs one plane per (n, c) with one value per pixel; channels_last runs one plane per n
// with C contiguous values per pixel (the inner loop goes over channels).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "upfirdn2d.h"

namespace p2pz {
namespace {

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

struct Geometry {
  int64_t planes, minor, in_h, in_w, out_h, out_w;
  int64_t upx, upy, downx, downy, padx0, pady0;
  int64_t fh, fw;
};

// One output row at a time, for planes stored [H, W, minor] (NCHW: minor 1; channels-last: minor C).
template <typename scalar_t, typename acc_t>
class RowFilter {
 public:
  RowFilter(const std::vector<acc_t>& taps, const Geometry& g, int64_t max_minor) : taps_(taps), g_(g) {
    // Column progressions per horizontal tap; they do not depend on the row.
    runs_.resize(g.fw);
    for (int64_t kx = 0; kx < g.fw; ++kx) runs_[kx] = tap_run(kx, g.upx, g.downx, g.padx0, g.in_w, g.out_w);
    const int64_t gx = gcd64(g.upx, g.downx);
    o_step_ = g.upx / gx;
    i_step_ = g.downx / gx;
    out_slots_ = (g.out_w + o_step_ - 1) / o_step_;  // accumulator columns per phase
    in_slots_ = (g.in_w + i_step_ - 1) / i_step_;
    acc_size_ = o_step_ * out_slots_ * max_minor;
    xrow_size_ = i_step_ * in_slots_ * max_minor;
  }
  int64_t acc_size() const { return acc_size_; }
  int64_t xrow_size() const { return xrow_size_; }

  // Output row oy of the plane `in` (minor M values per pixel) into `out` (that row, out_w * M values);
  // acc and xrow: scratch of acc_size() and xrow_size().
  void run(const scalar_t* in, scalar_t* out, int64_t oy, int64_t M, acc_t* acc, acc_t* xrow) const {
    const Geometry& g = g_;
    std::fill(acc, acc + o_step_ * out_slots_ * M, acc_t(0));
    for (int64_t ky = 0; ky < g.fh; ++ky) {
      const int64_t v = oy * g.downy + ky - g.pady0;
      if (v < 0 || v % g.upy != 0 || v / g.upy >= g.in_h) continue;  // a zero row or padding
      const scalar_t* src = in + (v / g.upy) * g.in_w * M;
      // Deinterleave (and widen) the input row: column i to phase i % i_step, slot i / i_step. The
      // common case (no downsampling, same type) reads the input row in place.
      const acc_t* row = xrow;
      if (i_step_ == 1 && std::is_same_v<scalar_t, acc_t>) {
        row = reinterpret_cast<const acc_t*>(src);
      } else if (M == 1 && i_step_ == 2) {  // NCHW, 2x downsampling: split even and odd columns (vectorises)
        acc_t* __restrict__ even = xrow;
        acc_t* __restrict__ odd = xrow + in_slots_;
        const int64_t pairs = g.in_w / 2;
        for (int64_t s = 0; s < pairs; ++s) {
          even[s] = static_cast<acc_t>(src[2 * s]);
          odd[s] = static_cast<acc_t>(src[2 * s + 1]);
        }
        if (g.in_w % 2) even[pairs] = static_cast<acc_t>(src[g.in_w - 1]);
      } else {
        for (int64_t ph = 0; ph < i_step_; ++ph) {
          acc_t* __restrict__ d = xrow + ph * in_slots_ * M;
          for (int64_t i = ph, s = 0; i < g.in_w; i += i_step_, ++s)
            for (int64_t c = 0; c < M; ++c) d[s * M + c] = static_cast<acc_t>(src[i * M + c]);
        }
      }
      const acc_t* frow = taps_.data() + ky * g.fw;
      for (int64_t kx = 0; kx < g.fw; ++kx) {
        const TapRun& run = runs_[kx];
        const acc_t wgt = frow[kx];
        if (run.n == 0 || wgt == acc_t(0)) continue;
        acc_t* __restrict__ a = acc + ((run.o0 % o_step_) * out_slots_ + run.o0 / o_step_) * M;
        const acc_t* __restrict__ s = row + ((run.i0 % i_step_) * in_slots_ + run.i0 / i_step_) * M;
        const int64_t n = run.n * M;
        for (int64_t j = 0; j < n; ++j) a[j] += wgt * s[j];
      }
    }
    if (M == 1 && o_step_ == 2) {  // NCHW, 2x upsampling: interleave the two phases (vectorises)
      const acc_t* __restrict__ a0 = acc;
      const acc_t* __restrict__ a1 = acc + out_slots_;
      scalar_t* __restrict__ d = out;
      const int64_t pairs = g.out_w / 2;
      for (int64_t s = 0; s < pairs; ++s) {
        d[2 * s] = static_cast<scalar_t>(a0[s]);
        d[2 * s + 1] = static_cast<scalar_t>(a1[s]);
      }
      if (g.out_w % 2) d[g.out_w - 1] = static_cast<scalar_t>(a0[pairs]);
      return;
    }
    for (int64_t ph = 0; ph < o_step_; ++ph) {
      const acc_t* __restrict__ a = acc + ph * out_slots_ * M;
      for (int64_t o = ph, s = 0; o < g.out_w; o += o_step_, ++s)
        for (int64_t c = 0; c < M; ++c) out[o * M + c] = static_cast<scalar_t>(a[s * M + c]);
    }
  }

 private:
  const std::vector<acc_t>& taps_;
  const Geometry& g_;
  std::vector<TapRun> runs_;
  int64_t o_step_ = 1, i_step_ = 1, out_slots_ = 0, in_slots_ = 0, acc_size_ = 0, xrow_size_ = 0;
};

// Rows of any layout, parallel over (plane, output row).
template <typename scalar_t, typename acc_t>
void filter_by_rows(const scalar_t* x, scalar_t* y, const std::vector<acc_t>& taps, const Geometry& g) {
  const int64_t M = g.minor;
  const RowFilter<scalar_t, acc_t> filter(taps, g, M);
  const int64_t in_plane = g.in_h * g.in_w * M, out_plane = g.out_h * g.out_w * M;
  const int64_t rows = g.planes * g.out_h;
  const int64_t work_per_row = std::max<int64_t>(1, g.out_w * M * g.fw * g.fh / (g.upx * g.upy));
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(filter.acc_size()), xrow(filter.xrow_size());
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r / g.out_h, oy = r % g.out_h;
      filter.run(x + p * in_plane, y + p * out_plane + oy * g.out_w * M, oy, M, acc.data(), xrow.data());
    }
  });
}

// NCHW planes up to 128 pixels wide: a row holds too little work for its set-up (at 8x8 the rows ran
// ~15x slower than the same tensor channels-last; at 64 px still ~2.5x slower than this path; wider,
// the blocks no longer fit in cache and rows win). Blocks of kPlaneBlock planes are transposed into a
// [H, W, block] buffer, filtered there as channels-last rows (the block is the minor axis) and
// transposed back, all in cache. Figures: docs/results/ops.md.
constexpr int64_t kPlaneBlock = 16;
constexpr int64_t kPlaneBlockMaxWidth = 128;

// dst[b * dst_b + i * dst_i] = src[b * src_b + i * src_i] for b < nb, i < ni, by 16 x 16 tiles (in L1).
template <typename scalar_t>
void transpose_tiles(const scalar_t* src, int64_t src_b, int64_t src_i, scalar_t* dst, int64_t dst_b,
                     int64_t dst_i, int64_t nb, int64_t ni) {
  constexpr int64_t T = 16;
  for (int64_t i0 = 0; i0 < ni; i0 += T) {
    const int64_t i1 = std::min(ni, i0 + T);
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = i0; i < i1; ++i) dst[b * dst_b + i * dst_i] = src[b * src_b + i * src_i];
  }
}

template <typename scalar_t, typename acc_t>
void filter_by_plane_blocks(const scalar_t* x, scalar_t* y, const std::vector<acc_t>& taps, const Geometry& g) {
  const RowFilter<scalar_t, acc_t> filter(taps, g, kPlaneBlock);
  const int64_t in_pixels = g.in_h * g.in_w, out_pixels = g.out_h * g.out_w;
  const int64_t blocks = (g.planes + kPlaneBlock - 1) / kPlaneBlock;
  const int64_t work_per_block = std::max<int64_t>(1, out_pixels * kPlaneBlock * g.fw * g.fh / (g.upx * g.upy));
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_block);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(filter.acc_size()), xrow(filter.xrow_size());
    std::vector<scalar_t> in(in_pixels * kPlaneBlock), out(out_pixels * kPlaneBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * kPlaneBlock, M = std::min(kPlaneBlock, g.planes - p0);
      transpose_tiles(x + p0 * in_pixels, in_pixels, 1, in.data(), 1, M, M, in_pixels);
      for (int64_t oy = 0; oy < g.out_h; ++oy)
        filter.run(in.data(), out.data() + oy * g.out_w * M, oy, M, acc.data(), xrow.data());
      transpose_tiles(out.data(), 1, M, y + p0 * out_pixels, out_pixels, 1, M, out_pixels);
    }
  });
}

template <typename scalar_t, typename acc_t>
void upfirdn2d_kernel(const scalar_t* x, scalar_t* y, const std::vector<acc_t>& taps, const Geometry& g) {
  if (g.minor == 1 && std::max(g.in_w, g.out_w) <= kPlaneBlockMaxWidth && g.planes > 1)
    filter_by_plane_blocks<scalar_t, acc_t>(x, y, taps, g);
  else
    filter_by_rows<scalar_t, acc_t>(x, y, taps, g);
}

void upfirdn2d_cpu(const Upfirdn2dArgs& a, at::Tensor& y) {
  const at::Tensor& x = a.x;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t fh = a.f.size(0), fw = a.f.size(1);
  const bool cl = a.format == at::MemoryFormat::ChannelsLast;
  Geometry g{cl ? N : N * C, cl ? C : 1, H, W, y.size(2), y.size(3), a.upx, a.upy, a.downx, a.downy, a.padx0,
             a.pady0, fh, fw};
  const at::Tensor fc = a.f.to(at::kDouble).contiguous();
  const double* fp = fc.data_ptr<double>();

  P2PZ_DISPATCH_FLOATING_TYPES(x.scalar_type(), "upfirdn2d_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    // Taps in the frame of the formula y[o] = sum_k taps[k] * u[o * down + k - pad0]: a convolution
    // flips the filter; flip_filter (correlation) keeps it as is. The gain is folded in.
    std::vector<acc_t> taps(fh * fw);
    for (int64_t ky = 0; ky < fh; ++ky)
      for (int64_t kx = 0; kx < fw; ++kx) {
        const double v = a.flip_filter ? fp[ky * fw + kx] : fp[(fh - 1 - ky) * fw + (fw - 1 - kx)];
        taps[ky * fw + kx] = static_cast<acc_t>(v * a.gain);
      }
    upfirdn2d_kernel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), taps, g);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(p2pz, CPU, m) { m.impl("upfirdn2d", &upfirdn2d_op<upfirdn2d_cpu>); }

}  // namespace p2pz
