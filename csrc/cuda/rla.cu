// CUDA rla: y = n + up(down(n)), n = RMSNorm(x) * w or x. The forward runs a warp
// per row with the row in registers (row_warp.cuh) where it can, else — and the
// backward always — one block per row at a time (a grid-stride loop over rows) with
// the row's n in shared memory and the low-rank products as block reductions. Weight
// gradients go to per-block partial slices (no atomics, deterministic) summed afterwards.
// COMET_ROW_KERNELS=v2 runs the two-pass backward instead (row_cols.cuh).
#include <torch/library.h>

#include "checks.h"
#include "cuda/row_cols.cuh"
#include "cuda/row_kernels.cuh"
#include "cuda/row_warp.cuh"

namespace comet::cuda {
namespace {

// n = x * rstd * w into shared memory (n = x without a norm weight); returns rstd (1 without).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t normed_row(const scalar_t* xr, const scalar_t* w, int64_t d, acc_t eps,
                                            acc_t* scratch, acc_t* n) {
  acc_t rstd = 1;
  if (w != nullptr) rstd = rsqrt(row_dot<acc_t>(xr, xr, d, scratch) / d + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    n[i] = static_cast<acc_t>(xr[i]) * (w != nullptr ? rstd * static_cast<acc_t>(w[i]) : acc_t(1));
  return rstd;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    rla_forward_kernel(const scalar_t* __restrict__ x,     // (M, d), row stride xs
                       const scalar_t* __restrict__ down,  // (r, d)
                       const scalar_t* __restrict__ up,    // (d, r)
                       const scalar_t* __restrict__ w,     // (d,) or null
                       scalar_t* __restrict__ y,           // (M, d)
                       int64_t M, int64_t d, int64_t r, int64_t xs, acc_t eps) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* n = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* h = n + d;
  acc_t* scratch = h + r;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const scalar_t* xr = x + row * xs;
    const acc_t rstd = normed_row(xr, w, d, eps, scratch, n);
    row_project(down, n, r, d, scratch, h);
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
      y[row * d + i] = static_cast<scalar_t>(n[i] + row_expand(up, h, r, i));
    __syncthreads();
  }
}

template <typename scalar_t, int kVecs>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    rla_forward_warp_kernel(const scalar_t* __restrict__ x,     // (M, d), row stride xs
                            const scalar_t* __restrict__ down,  // (r, d)
                            const scalar_t* __restrict__ up,    // (d, r)
                            const scalar_t* __restrict__ w,     // (d,) or null
                            scalar_t* __restrict__ y,           // (M, d)
                            int64_t M, int64_t d, int r, int64_t xs, float eps) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= M) return;
  WarpRow<scalar_t, kVecs> n;
  n.load(x + row * xs, d, lane);
  if (w != nullptr) n.scale(rsqrtf(n.dot(nullptr, d, lane) / d + eps), w, d, lane);
  n.add_low_rank(down, up, r, d, lane);
  n.store(y + row * d, d, lane);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    rla_backward_kernel(const scalar_t* __restrict__ gy,    // (M, d), row stride gs
                        const scalar_t* __restrict__ x,     // (M, d), row stride xs
                        const scalar_t* __restrict__ down,  // (r, d)
                        const scalar_t* __restrict__ up,    // (d, r)
                        const scalar_t* __restrict__ w,     // (d,) or null
                        scalar_t* __restrict__ dx,          // (M, d)
                        acc_t* __restrict__ d_down,         // (grid, r, d) partials
                        acc_t* __restrict__ d_up_t,         // (grid, r, d) partials
                        acc_t* __restrict__ d_w,            // (grid, d) partials or null
                        int64_t M, int64_t d, int64_t r, int64_t xs, int64_t gs, acc_t eps) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* n = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* h = n + d;
  acc_t* dh = h + r;
  acc_t* scratch = dh + r;
  acc_t* pd_down = d_down + blockIdx.x * r * d;
  acc_t* pd_up = d_up_t + blockIdx.x * r * d;
  acc_t* pd_w = d_w != nullptr ? d_w + blockIdx.x * d : nullptr;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const scalar_t* xr = x + row * xs;
    const scalar_t* gr = gy + row * gs;
    const acc_t rstd = normed_row(xr, w, d, eps, scratch, n);
    row_project(down, n, r, d, scratch, h);
    row_project_t(up, gr, r, d, scratch, dh);
    // dn_i = dy_i + sum_k down[k, i] dh_k; the weight partials need n, h, dh.
    acc_t part[1] = {0};
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const acc_t g = static_cast<acc_t>(gr[i]);
      acc_t dn = g;
      for (int64_t k = 0; k < r; ++k) {
        dn += static_cast<acc_t>(down[k * d + i]) * dh[k];
        pd_up[k * d + i] += g * h[k];
        pd_down[k * d + i] += dh[k] * n[i];
      }
      if (w != nullptr) part[0] += dn * static_cast<acc_t>(w[i]) * static_cast<acc_t>(xr[i]);
      else dx[row * d + i] = static_cast<scalar_t>(dn);
    }
    if (w != nullptr) {
      block_sum<1>(part, scratch);
      const acc_t c = part[0] * rstd * rstd * rstd / d;
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        acc_t dn = static_cast<acc_t>(gr[i]);
        for (int64_t k = 0; k < r; ++k) dn += static_cast<acc_t>(down[k * d + i]) * dh[k];
        const acc_t xi = static_cast<acc_t>(xr[i]);
        pd_w[i] += dn * xi * rstd;
        dx[row * d + i] = static_cast<scalar_t>(dn * static_cast<acc_t>(w[i]) * rstd - xi * c);
      }
    }
    __syncthreads();
  }
}

// v2 backward, pass 1, a warp per row: the row's table entry [h | dh | rstd, c, 0, 0], with
// h = D n, dh = Uᵀ dy and c = rstd³/d · Σ_i dn_i w_i x_i (the RMSNorm backward's row term,
// dn = dy + Dᵀ dh); without a norm rstd = 1 and c = 0. One sweep over the row: n = rstd·w·x
// makes h = rstd·h' with h' = D(w·x), and Σ_i dn_i w_i x_i = Σ_i dy_i w_i x_i + Σ_k dh_k h'_k, so
// nothing waits for rstd or dh. U comes transposed (r, d): its reads coalesce like D's.
template <typename scalar_t, typename acc_t, int R>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    rla_backward_stats_kernel(const scalar_t* __restrict__ gy,    // (M, d), row stride gs
                              const scalar_t* __restrict__ x,     // (M, d), row stride xs
                              const scalar_t* __restrict__ down,  // (r, d)
                              const scalar_t* __restrict__ up_t,  // (r, d): up transposed
                              const scalar_t* __restrict__ w,     // (d,) or null
                              acc_t* __restrict__ stats,          // (M, kStatsWidth<R>)
                              int64_t M, int64_t d, int64_t r, int64_t xs, int64_t gs, acc_t eps) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= M) return;  // whole warps: the shuffles below see all 32 lanes
  const scalar_t* xr = x + row * xs;
  const scalar_t* gr = gy + row * gs;
  acc_t ss = 0, p = 0, h[R] = {}, dh[R] = {};  // h holds h' = D(w x) until rstd is known
  for (int64_t i = lane; i < d; i += kWarp) {
    const acc_t xv = static_cast<acc_t>(xr[i]), g = static_cast<acc_t>(gr[i]);
    const acc_t wx = w != nullptr ? static_cast<acc_t>(w[i]) * xv : xv;
    ss += xv * xv;
    p += g * wx;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k >= r) break;
      h[k] += static_cast<acc_t>(down[k * d + i]) * wx;
      dh[k] += static_cast<acc_t>(up_t[k * d + i]) * g;
    }
  }
  warp_sum_all(h);
  warp_sum_all(dh);
  acc_t rstd = 1, c = 0;
  if (w != nullptr) {
    rstd = rsqrt(warp_sum(ss) / d + eps);
    acc_t q = warp_sum(p);
#pragma unroll
    for (int k = 0; k < R; ++k) q += dh[k] * h[k];  // zero past r
    c = q * rstd * rstd * rstd / d;
#pragma unroll
    for (int k = 0; k < R; ++k) h[k] *= rstd;
  }
  if (lane == 0) store_stats(stats + row * kStatsWidth<R>, h, dh, rstd, c, acc_t(0), acc_t(0));
}

// v2 backward, pass 2, a thread per column i over rows [y·rows, (y+1)·rows): dx from the table,
// and the column's weight-gradient sums over the range into partial y.
template <typename scalar_t, typename acc_t, int R>
__global__ void __launch_bounds__(kColThreads)
    rla_backward_cols_kernel(const scalar_t* __restrict__ gy,    // (M, d), row stride gs
                             const scalar_t* __restrict__ x,     // (M, d), row stride xs
                             const scalar_t* __restrict__ down,  // (r, d)
                             const scalar_t* __restrict__ w,     // (d,) or null
                             const acc_t* __restrict__ stats,    // (M, kStatsWidth<R>)
                             scalar_t* __restrict__ dx,          // (M, d)
                             acc_t* __restrict__ d_down,         // (ranges, r, d) partials
                             acc_t* __restrict__ d_up_t,         // (ranges, r, d) partials
                             acc_t* __restrict__ d_w,            // (ranges, d) partials or null
                             int64_t M, int64_t d, int64_t r, int64_t xs, int64_t gs, int64_t rows) {
  const int64_t i = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (i >= d) return;  // no barriers in this kernel
  const int64_t range = blockIdx.y, last = std::min(M, (range + 1) * rows);
  acc_t dcol[R];
  load_column(down, r, d, i, dcol);
  const acc_t wi = w != nullptr ? static_cast<acc_t>(w[i]) : acc_t(1);
  acc_t a_down[R] = {}, a_up[R] = {}, a_w = 0;
  // unrolled: the loads of the next rows issue before this row's sums need them (more bytes in
  // flight per warp; the rows are independent but for the accumulators). Not in fp64, where
  // the doubled accumulators would spill.
  constexpr int kUnroll = sizeof(acc_t) == 4 ? 4 : 1;
#pragma unroll kUnroll
  for (int64_t m = range * rows; m < last; ++m) {
    RowStats<acc_t, R> st;  // a = h, b = dh, e = (rstd, c)
    st.load(stats + m * kStatsWidth<R>);
    const acc_t g = static_cast<acc_t>(gy[m * gs + i]), xv = static_cast<acc_t>(x[m * xs + i]);
    acc_t dn = g;
#pragma unroll
    for (int k = 0; k < R; ++k) dn += dcol[k] * st.b[k];  // b is zero past r
    const acc_t n = w != nullptr ? xv * st.e[0] * wi : xv;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      a_down[k] += st.b[k] * n;
      a_up[k] += g * st.a[k];
    }
    if (w != nullptr) {
      a_w += dn * xv * st.e[0];
      dx[m * d + i] = static_cast<scalar_t>(dn * wi * st.e[0] - xv * st.e[1]);
    } else {
      dx[m * d + i] = static_cast<scalar_t>(dn);
    }
  }
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if (k >= r) break;
    d_down[(range * r + k) * d + i] = a_down[k];
    d_up_t[(range * r + k) * d + i] = a_up[k];
  }
  if (d_w != nullptr) d_w[range * d + i] = a_w;
}

at::Tensor rla_cuda(const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
                    const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_rla_args("rla", x, down, up, norm_weight, eps);
  const int64_t M = x.size(0), d = x.size(1), r = down.size(0);
  at::Tensor y = at::empty({M, d}, x.options());
  if (M == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dw = down.contiguous(), uw = up.contiguous();
  const at::Tensor w = norm_weight.has_value() ? norm_weight->contiguous() : at::Tensor();
  COMET_DISPATCH_FLOATING(x.scalar_type(), "rla_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (kWarpRowType<scalar_t>) {
      const int vecs = warp_row_vecs<scalar_t>(d, r);
      if (vecs > 0 && x.stride(0) % (16 / sizeof(scalar_t)) == 0 && aligned16(x.data_ptr()) &&
          aligned16(dw.data_ptr()) && (!w.defined() || aligned16(w.data_ptr()))) {
        dispatch_warp_row_vecs(vecs, [&](auto v) {
          rla_forward_warp_kernel<scalar_t, decltype(v)::value>
              <<<warp_row_grid(M), kRowWarps * kWarp, 0, at::cuda::getCurrentCUDAStream()>>>(
                  x.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), uw.data_ptr<scalar_t>(),
                  w.defined() ? w.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), M, d, int(r),
                  x.stride(0), static_cast<float>(eps));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
    }
    const size_t smem = row_smem<acc_t>(d, 1, r, 1);
    auto kernel = rla_forward_kernel<scalar_t, acc_t>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, "rla", "hidden size d=", d, " in ",
               x.scalar_type());
    kernel<<<row_grid(M), kRowThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), uw.data_ptr<scalar_t>(),
        w.defined() ? w.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), M, d, r, x.stride(0),
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// The v2 backward (row_cols.cuh) into partials of `ranges` slices; r <= kMaxColRank.
template <typename scalar_t, typename acc_t>
void rla_backward_v2(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw, const at::Tensor& uw,
                     const at::Tensor& w, double eps, const ColLaunch& launch, at::Tensor& dx, at::Tensor& d_down,
                     at::Tensor& d_up_t, at::Tensor& d_w) {
  const int64_t M = x.size(0), d = x.size(1), r = dw.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor ut = uw.t().contiguous();  // (r, d): pass 1 reads it along d, coalesced
  dispatch_rank_bucket(rank_bucket(r), [&](auto bucket) {
    constexpr int R = decltype(bucket)::value;
    at::Tensor stats = at::empty({M, kStatsWidth<R>}, x.options().dtype(acc_dtype(x.scalar_type())));
    const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    rla_backward_stats_kernel<scalar_t, acc_t, R><<<warp_row_grid(M), kRowWarps * kWarp, 0, stream>>>(
        grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), ut.data_ptr<scalar_t>(), wp,
        stats.data_ptr<acc_t>(), M, d, r, x.stride(0), grad_y.stride(0), static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rla_backward_cols_kernel<scalar_t, acc_t, R><<<launch.grid, kColThreads, 0, stream>>>(
        grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), wp, stats.data_ptr<acc_t>(),
        dx.data_ptr<scalar_t>(), d_down.data_ptr<acc_t>(), d_up_t.data_ptr<acc_t>(),
        w.defined() ? d_w.data_ptr<acc_t>() : nullptr, M, d, r, x.stride(0), grad_y.stride(0), launch.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
    const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_rla_backward_args("rla_backward", grad_y, x, down, up, norm_weight, eps);
  const int64_t M = x.size(0), d = x.size(1), r = down.size(0);
  const bool has_norm = norm_weight.has_value();
  const auto acc = acc_dtype(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());  // before row_grid / col_launch: they ask this device for its SMs
  const bool v2 = M > 0 && rank_bucket(r) > 0 && row_v2();
  const ColLaunch launch = v2 ? col_launch(M, d) : ColLaunch{};
  // v1 adds into its per-block partials (zeros); v2 writes every partial once
  const int64_t parts = v2 ? launch.ranges : row_grid(M);
  const auto make = [&](at::IntArrayRef size) {
    return v2 ? at::empty(size, x.options().dtype(acc)) : at::zeros(size, x.options().dtype(acc));
  };
  at::Tensor dx = at::empty({M, d}, x.options());
  at::Tensor d_down = make({parts, r, d}), d_up_t = make({parts, r, d}), d_w = make({parts, has_norm ? d : 0});
  if (M > 0) {
    const at::Tensor dw = down.contiguous(), uw = up.contiguous();
    const at::Tensor w = has_norm ? norm_weight->contiguous() : at::Tensor();
    COMET_DISPATCH_FLOATING(x.scalar_type(), "rla_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (v2) {
        rla_backward_v2<scalar_t, acc_t>(grad_y, x, dw, uw, w, eps, launch, dx, d_down, d_up_t, d_w);
        return;
      }
      const size_t smem = row_smem<acc_t>(d, 1, r, 2);
      auto kernel = rla_backward_kernel<scalar_t, acc_t>;
      allow_smem(reinterpret_cast<const void*>(kernel), smem, "rla_backward", "hidden size d=", d, " in ",
                 x.scalar_type());
      kernel<<<static_cast<unsigned>(parts), kRowThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
          grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
          uw.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<scalar_t>() : nullptr,
          dx.data_ptr<scalar_t>(), d_down.data_ptr<acc_t>(), d_up_t.data_ptr<acc_t>(),
          has_norm ? d_w.data_ptr<acc_t>() : nullptr, M, d, r, x.stride(0), grad_y.stride(0),
          static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dt = x.scalar_type();
  return {dx, d_down.sum(0).to(dt), d_up_t.sum(0).t().contiguous().to(dt),
          has_norm ? d_w.sum(0).to(dt) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CUDA, m) {
  m.impl("rla", &rla_cuda);
  m.impl("rla_backward", &rla_backward_cuda);
}

}  // namespace comet::cuda
