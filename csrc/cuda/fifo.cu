// CUDA ring-buffer FIFO: fifo_push (in place, touches only the new rows), its
// functional twin and backward, and fifo_view (gather oldest-first, optional
// rotate-half RoPE) with its backward (the transposed scatter). Length values
// live on the device and are clamped in the kernels rather than synced to the
// host for checking; the CPU kernels check them. Rows move N elements per access —
// 16 bytes where the row length, strides, RoPE halves and pointers allow, else one.
// Samples run along grid.y, in strides of at most 65535 (its limit).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"

namespace comet::cuda {
namespace {

constexpr int kThreads = 256;

// N consecutive elements moved as one access.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <typename scalar_t, int N>
__device__ __forceinline__ void copy_row(scalar_t* dst, const scalar_t* src, int64_t row) {
  using P = Pack<scalar_t, N>;
  for (int64_t e = int64_t(threadIdx.x) * N; e < row; e += int64_t(blockDim.x) * N)
    *reinterpret_cast<P*>(dst + e) = *reinterpret_cast<const P*>(src + e);
}

template <typename scalar_t, int N>
__device__ __forceinline__ void zero_row(scalar_t* dst, int64_t row) {
  Pack<scalar_t, N> zero;
#pragma unroll
  for (int j = 0; j < N; ++j) zero.v[j] = scalar_t(0);
  for (int64_t e = int64_t(threadIdx.x) * N; e < row; e += int64_t(blockDim.x) * N)
    *reinterpret_cast<Pack<scalar_t, N>*>(dst + e) = zero;
}

constexpr int64_t kMaxGridY = 65535;

// Ring slot of the row i places after the oldest. head is normalised into [0, C) here (the CPU
// kernels reject a head outside it; the device's values are not synced to the host to check).
__device__ __forceinline__ int64_t ring_slot(int64_t head, int64_t i, int64_t C) {
  return ((head % C) + C + i % C) % C;
}

// A grid of (x, samples) blocks; the kernels stride over samples past grid.y's limit. x (rows
// per sample: pushed rows or the capacity) is one block each, up to grid.x's 2^31 - 1.
dim3 per_sample_grid(int64_t x, int64_t B) {
  TORCH_CHECK(x <= std::numeric_limits<int>::max(), "comet_ext: ", x,
              " rows per sample are too many for one FIFO launch (at most 2^31 - 1)");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::min(B, kMaxGridY)));
}

// 16 bytes' worth of elements when every pointer is 16-byte aligned and every count (row
// lengths, strides, RoPE half widths, in elements) a multiple of that; else 1.
template <typename scalar_t>
int pack_width(std::initializer_list<const void*> pointers, std::initializer_list<int64_t> counts) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  for (int64_t c : counts)
    if (c % kWide != 0) return 1;
  return kWide;
}

// f(std::integral_constant<int, N>) with N = width (16 bytes of scalar_t) or 1.
template <typename scalar_t, typename F>
void with_pack_width(int width, const F& f) {
  if (width == 16 / int(sizeof(scalar_t))) f(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  else f(std::integral_constant<int, 1>{});
}

// One block per (sample, pushed row); threads stride over the row's elements.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads)
    push_kernel(scalar_t* __restrict__ buffer,      // (B, C, row)
                const scalar_t* __restrict__ rows,  // (B, n, row)
                const int64_t* __restrict__ head,   // (B,)
                const int64_t* __restrict__ length, // (B,)
                const int64_t* __restrict__ counts, // (B,)
                int64_t B, int64_t C, int64_t n_max, int64_t row, int64_t buf_bstride,
                int64_t buf_rstride, int64_t rows_bstride, int64_t rows_rstride) {
  const int64_t i = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t n = min(max(counts[b], int64_t(0)), n_max);
    if (i >= n || i < n - C) continue;
    const int64_t len = min(max(length[b], int64_t(0)), C);
    scalar_t* dst = buffer + b * buf_bstride + ring_slot(head[b], len + i, C) * buf_rstride;
    const scalar_t* src = rows + b * rows_bstride + i * rows_rstride;
    copy_row<scalar_t, N>(dst, src, row);
  }
}

__global__ void advance_kernel(int64_t* head, int64_t* length, const int64_t* counts, int64_t B,
                               int64_t C, int64_t n_max) {
  const int64_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t n = min(max(counts[b], int64_t(0)), n_max);
  const int64_t len = min(max(length[b], int64_t(0)), C);
  const int64_t new_len = min(len + n, C);
  head[b] = ring_slot(head[b], len + n - new_len, C);
  length[b] = new_len;
}

// dst = RoPE(src) (Backward: its transpose) for one (H, D) row with table rows c, s (D,).
template <bool Backward, typename scalar_t, int N, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ void rope_row(scalar_t* dst, const scalar_t* src, const acc_t* c, const acc_t* s,
                                         int64_t row, int64_t D) {
  using P = Pack<scalar_t, N>;
  const int64_t half = D / 2;
  for (int64_t e = int64_t(threadIdx.x) * N; e < row; e += int64_t(blockDim.x) * N) {
    const int64_t col = e % D;  // the N columns from col lie in one half (half % N == 0)
    const bool first = col < half;
    const P x = *reinterpret_cast<const P*>(src + e);
    const P partner = *reinterpret_cast<const P*>(src + (first ? e + half : e - half));
    P y;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t cj = col + j;
      // Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2. Transposed: y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1.
      const acc_t sn = Backward ? (first ? s[cj + half] : -s[cj - half]) : (first ? -s[cj] : s[cj]);
      y.v[j] = static_cast<scalar_t>(static_cast<acc_t>(x.v[j]) * c[cj] + static_cast<acc_t>(partner.v[j]) * sn);
    }
    *reinterpret_cast<P*>(dst + e) = y;
  }
}

// One block per (sample, slot i of the oldest-first view). Backward = false:
// out[b, i] = RoPE(in[b, slot]) (zeros past length). Backward = true: the
// transpose, out[b, slot] = RoPE^T(in[b, i]) into a zeroed out.
template <bool Backward, typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads)
    view_kernel(const scalar_t* __restrict__ in,   // (B, C, H, D) contiguous
                scalar_t* __restrict__ out,        // (B, C, H, D) contiguous
                const int64_t* __restrict__ head, const int64_t* __restrict__ length,
                const at::opmath_type<scalar_t>* __restrict__ cos,  // (C, D) or null
                const at::opmath_type<scalar_t>* __restrict__ sin,  // (C, D) or null
                int64_t B, int64_t C, int64_t row, int64_t D) {
  const int64_t i = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t len = min(max(length[b], int64_t(0)), C);
    if (i >= len) {
      if (!Backward) zero_row<scalar_t, N>(out + (b * C + i) * row, row);
      continue;
    }
    const int64_t slot = b * C + ring_slot(head[b], i, C);
    const scalar_t* src = in + (Backward ? b * C + i : slot) * row;
    scalar_t* dst = out + (Backward ? slot : b * C + i) * row;
    if (cos == nullptr) copy_row<scalar_t, N>(dst, src, row);
    else rope_row<Backward, scalar_t, N>(dst, src, cos + i * D, sin + i * D, row, D);
  }
}

// grad_rows[b, i] = grad_buffer[b, slot(i)] for the pushed rows that were kept,
// then that slot's gradient is zeroed (its old content was overwritten).
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads)
    push_backward_kernel(scalar_t* __restrict__ grad_buffer,  // (B, C, row), in: grad of the output
                         scalar_t* __restrict__ grad_rows,    // (B, n, row), zeroed
                         const int64_t* __restrict__ head, const int64_t* __restrict__ length,
                         const int64_t* __restrict__ counts, int64_t B, int64_t C, int64_t n_max,
                         int64_t row) {
  const int64_t i = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t n = min(max(counts[b], int64_t(0)), n_max);
    if (i >= n || i < n - C) continue;
    const int64_t len = min(max(length[b], int64_t(0)), C);
    scalar_t* g = grad_buffer + (b * C + ring_slot(head[b], len + i, C)) * row;
    scalar_t* dst = grad_rows + (b * n_max + i) * row;
    copy_row<scalar_t, N>(dst, g, row);
    zero_row<scalar_t, N>(g, row);  // each thread zeroes the very elements it has just copied
  }
}

void fifo_push_cuda(at::Tensor& buffer, at::Tensor& head, at::Tensor& length,
                    const at::Tensor& rows, const at::Tensor& counts) {
  const char* op = "fifo_push";
  check_push_args(op, buffer, head, length, rows, counts);
  check_dense_rows(op, buffer, "buffer");
  check_dense_rows(op, rows, "rows");
  check_inplace_push(op, buffer, head, length, rows, counts);
  const int64_t B = buffer.size(0), C = buffer.size(1), n = rows.size(1);
  if (B == 0 || C == 0) return;
  const c10::cuda::CUDAGuard guard(buffer.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor cnt = dense_lengths(counts);
  if (n > 0) {
    COMET_DISPATCH_FLOATING(buffer.scalar_type(), "fifo_push_cuda", [&] {
      const int width = pack_width<scalar_t>(
          {buffer.data_ptr(), rows.data_ptr()},
          {row_numel(buffer), buffer.stride(0), buffer.stride(1), rows.stride(0), rows.stride(1)});
      with_pack_width<scalar_t>(width, [&](auto w) {
        push_kernel<scalar_t, decltype(w)::value><<<per_sample_grid(n, B), kThreads, 0, stream>>>(
            buffer.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(), head.data_ptr<int64_t>(),
            length.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), B, C, n, row_numel(buffer),
            buffer.stride(0), buffer.stride(1), rows.stride(0), rows.stride(1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  advance_kernel<<<(B + 127) / 128, 128, 0, stream>>>(head.data_ptr<int64_t>(),
                                                      length.data_ptr<int64_t>(),
                                                      cnt.data_ptr<int64_t>(), B, C, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool Backward>
at::Tensor view_or_scatter_cuda(const char* op, const at::Tensor& input, const at::Tensor& head,
                                const at::Tensor& length, const c10::optional<at::Tensor>& cos,
                                const c10::optional<at::Tensor>& sin) {
  auto [cs, sn] = check_view_args(op, input, Backward ? "grad_view" : "buffer", head, length, cos, sin);
  const int64_t B = input.size(0), C = input.size(1);
  const int64_t D = cs.defined() ? input.size(3) : 1;
  const at::Tensor in = input.contiguous();
  at::Tensor out = Backward ? at::zeros(input.sizes(), input.options())
                            : at::empty(input.sizes(), input.options());
  if (B == 0 || C == 0 || out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor hd = dense_lengths(head), len = dense_lengths(length);
  COMET_DISPATCH_FLOATING(in.scalar_type(), "fifo_view_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // the tables' dtype (check_rope_tables)
    // with RoPE a pack must not straddle the two halves of a head's D columns
    const int width = pack_width<scalar_t>({in.data_ptr(), out.data_ptr()},
                                           {row_numel(in), cs.defined() ? D / 2 : 0});
    with_pack_width<scalar_t>(width, [&](auto w) {
      view_kernel<Backward, scalar_t, decltype(w)::value>
          <<<per_sample_grid(C, B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), hd.data_ptr<int64_t>(),
              len.data_ptr<int64_t>(), cs.defined() ? cs.data_ptr<acc_t>() : nullptr,
              sn.defined() ? sn.data_ptr<acc_t>() : nullptr, B, C, row_numel(in), D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor fifo_view_cuda(const at::Tensor& buffer, const at::Tensor& head, const at::Tensor& length,
                          const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin) {
  return view_or_scatter_cuda<false>("fifo_view", buffer, head, length, cos, sin);
}

at::Tensor fifo_view_backward_cuda(const at::Tensor& grad_view, const at::Tensor& head,
                                   const at::Tensor& length, const c10::optional<at::Tensor>& cos,
                                   const c10::optional<at::Tensor>& sin) {
  return view_or_scatter_cuda<true>("fifo_view_backward", grad_view, head, length, cos, sin);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fifo_push_functional_cuda(
    const at::Tensor& buffer, const at::Tensor& head, const at::Tensor& length,
    const at::Tensor& rows, const at::Tensor& counts) {
  at::Tensor buf = buffer.clone(at::MemoryFormat::Contiguous);
  at::Tensor hd = head.clone(at::MemoryFormat::Contiguous);
  at::Tensor len = length.clone(at::MemoryFormat::Contiguous);
  fifo_push_cuda(buf, hd, len, rows.contiguous(), counts);
  return {buf, hd, len};
}

std::tuple<at::Tensor, at::Tensor> fifo_push_backward_cuda(const at::Tensor& grad_buffer_out,
                                                           const at::Tensor& head,
                                                           const at::Tensor& length,
                                                           const at::Tensor& counts, int64_t num_rows) {
  const char* op = "fifo_push_backward";
  check_fifo_state(op, grad_buffer_out, head, length);
  check_lengths(counts, grad_buffer_out.size(0), grad_buffer_out, op, "counts");
  COMET_CHECK(num_rows >= 0, op, "'num_rows' must be >= 0, got ", num_rows);
  const int64_t B = grad_buffer_out.size(0), C = grad_buffer_out.size(1);
  at::Tensor grad_buffer = grad_buffer_out.clone(at::MemoryFormat::Contiguous);
  std::vector<int64_t> rows_shape = grad_buffer_out.sizes().vec();
  rows_shape[1] = num_rows;
  at::Tensor grad_rows = at::zeros(rows_shape, grad_buffer_out.options());
  if (B == 0 || C == 0 || num_rows == 0 || grad_rows.numel() == 0) return {grad_buffer, grad_rows};
  const c10::cuda::CUDAGuard guard(grad_buffer_out.device());
  const at::Tensor hd = dense_lengths(head), len = dense_lengths(length), cnt = dense_lengths(counts);
  COMET_DISPATCH_FLOATING(grad_buffer.scalar_type(), "fifo_push_backward_cuda", [&] {
    const int width = pack_width<scalar_t>({grad_buffer.data_ptr(), grad_rows.data_ptr()}, {row_numel(grad_buffer)});
    with_pack_width<scalar_t>(width, [&](auto w) {
      push_backward_kernel<scalar_t, decltype(w)::value>
          <<<per_sample_grid(num_rows, B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_buffer.data_ptr<scalar_t>(), grad_rows.data_ptr<scalar_t>(), hd.data_ptr<int64_t>(),
              len.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), B, C, num_rows, row_numel(grad_buffer));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_buffer, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CUDA, m) {
  m.impl("fifo_push", &fifo_push_cuda);
  m.impl("fifo_push_functional", &fifo_push_functional_cuda);
  m.impl("fifo_push_backward", &fifo_push_backward_cuda);
  m.impl("fifo_view", &fifo_view_cuda);
  m.impl("fifo_view_backward", &fifo_view_backward_cuda);
}

}  // namespace comet::cuda
