// Shared helpers of the CUDA kernels: block reductions, type conversion, per-sample lengths,
// launch checks.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace comet::cuda {

constexpr int kWarp = 32;

// Per-sample int64 values (lengths, FIFO heads, counts) as the kernels index them: dense (B,).
// Strided or expanded views and int32 are accepted, as on the CPU.
inline at::Tensor dense_lengths(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums N values per thread across the block; every thread gets the N totals.
// scratch: shared memory of at least N * (blockDim.x / 32) elements.
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N], T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i * warps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    T t = 0;
    for (int w = 0; w < warps; ++w) t += scratch[i * warps + w];
    v[i] = t;
  }
}

inline int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

}  // namespace comet::cuda
