// CUDA ring-buffer FIFO: fifo_push (in place, touches only the new rows) and
// fifo_view (gather oldest-first, optional rotate-half RoPE). Length values
// live on the device and are clamped in the kernels rather than synced to the
// host for checking; the CPU kernels check them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"

namespace comet::cuda {
namespace {

constexpr int kThreads = 256;

// One block per (sample, pushed row); threads stride over the row's elements.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    push_kernel(scalar_t* __restrict__ buffer,      // (B, C, row)
                const scalar_t* __restrict__ rows,  // (B, n, row)
                const int64_t* __restrict__ head,   // (B,)
                const int64_t* __restrict__ length, // (B,)
                const int64_t* __restrict__ counts, // (B,)
                int64_t C, int64_t n_max, int64_t row, int64_t buf_bstride, int64_t buf_rstride,
                int64_t rows_bstride, int64_t rows_rstride) {
  const int64_t b = blockIdx.y, i = blockIdx.x;
  const int64_t n = min(max(counts[b], int64_t(0)), n_max);
  if (i >= n || i < n - C) return;
  const int64_t len = min(max(length[b], int64_t(0)), C);
  const int64_t slot = (head[b] + len + i) % C;
  scalar_t* dst = buffer + b * buf_bstride + slot * buf_rstride;
  const scalar_t* src = rows + b * rows_bstride + i * rows_rstride;
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x) dst[e] = src[e];
}

__global__ void advance_kernel(int64_t* head, int64_t* length, const int64_t* counts, int64_t B,
                               int64_t C, int64_t n_max) {
  const int64_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t n = min(max(counts[b], int64_t(0)), n_max);
  const int64_t len = min(max(length[b], int64_t(0)), C);
  const int64_t new_len = min(len + n, C);
  head[b] = (head[b] + len + n - new_len) % C;
  length[b] = new_len;
}

// One block per (sample, slot i of the oldest-first view).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    view_kernel(const scalar_t* __restrict__ buffer,  // (B, C, H, D) contiguous
                scalar_t* __restrict__ out,           // (B, C, H, D) contiguous
                const int64_t* __restrict__ head, const int64_t* __restrict__ length,
                const float* __restrict__ cos,  // (C, D) or null
                const float* __restrict__ sin,  // (C, D) or null
                int64_t C, int64_t row, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.y, i = blockIdx.x;
  scalar_t* dst = out + (b * C + i) * row;
  const int64_t len = min(max(length[b], int64_t(0)), C);
  if (i >= len) {
    for (int64_t e = threadIdx.x; e < row; e += blockDim.x) dst[e] = scalar_t(0);
    return;
  }
  const int64_t slot = (head[b] + i) % C;
  const scalar_t* src = buffer + (b * C + slot) * row;
  if (cos == nullptr) {
    for (int64_t e = threadIdx.x; e < row; e += blockDim.x) dst[e] = src[e];
    return;
  }
  const int64_t half = D / 2;
  const float* c = cos + i * D;
  const float* s = sin + i * D;
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x) {
    const int64_t col = e % D;
    const acc_t x = static_cast<acc_t>(src[e]);
    const acc_t partner = static_cast<acc_t>(col < half ? -src[e + half] : src[e - half]);
    dst[e] = static_cast<scalar_t>(x * c[col] + partner * s[col]);
  }
}

void fifo_push_cuda(at::Tensor& buffer, at::Tensor& head, at::Tensor& length,
                    const at::Tensor& rows, const at::Tensor& counts) {
  const char* op = "fifo_push";
  check_push_args(op, buffer, head, length, rows, counts);
  check_dense_rows(op, buffer, "buffer");
  check_dense_rows(op, rows, "rows");
  COMET_CHECK(counts.scalar_type() == at::kLong, op, "'counts' must be int64 on CUDA, got ",
              counts.scalar_type());
  const int64_t B = buffer.size(0), C = buffer.size(1), n = rows.size(1);
  if (B == 0 || C == 0) return;
  const c10::cuda::CUDAGuard guard(buffer.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    COMET_DISPATCH_FLOATING(buffer.scalar_type(), "fifo_push_cuda", [&] {
      push_kernel<scalar_t><<<dim3(n, B), kThreads, 0, stream>>>(
          buffer.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(), head.data_ptr<int64_t>(),
          length.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), C, n, row_numel(buffer),
          buffer.stride(0), buffer.stride(1), rows.stride(0), rows.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  advance_kernel<<<(B + 127) / 128, 128, 0, stream>>>(head.data_ptr<int64_t>(),
                                                      length.data_ptr<int64_t>(),
                                                      counts.data_ptr<int64_t>(), B, C, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fifo_view_cuda(const at::Tensor& buffer, const at::Tensor& head,
                          const at::Tensor& length, const c10::optional<at::Tensor>& cos,
                          const c10::optional<at::Tensor>& sin) {
  const char* op = "fifo_view";
  check_fifo_state(op, buffer, head, length);
  check_float(buffer, op, "buffer");
  auto [cs, sn] = check_rope_tables(op, buffer, cos, sin);
  const int64_t B = buffer.size(0), C = buffer.size(1);
  const int64_t D = cs.defined() ? buffer.size(3) : 1;
  const at::Tensor buf = buffer.contiguous();
  at::Tensor out = at::empty(buffer.sizes(), buffer.options());
  if (B == 0 || C == 0 || out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(buffer.device());
  COMET_DISPATCH_FLOATING(buf.scalar_type(), "fifo_view_cuda", [&] {
    view_kernel<scalar_t><<<dim3(C, B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        buf.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), head.data_ptr<int64_t>(),
        length.data_ptr<int64_t>(), cs.defined() ? cs.data_ptr<float>() : nullptr,
        sn.defined() ? sn.data_ptr<float>() : nullptr, C, row_numel(buf), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CUDA, m) {
  m.impl("fifo_push", &fifo_push_cuda);
  m.impl("fifo_view", &fifo_view_cuda);
}

}  // namespace comet::cuda
