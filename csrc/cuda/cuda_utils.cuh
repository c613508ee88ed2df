// Shared helpers of the CUDA kernels: block reductions, type conversion, per-sample lengths,
// launch checks.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"

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

// Lets `kernel` take `bytes` of dynamic shared memory on the current device, or refuses the call
// naming the op, what asked for that much (`what...`: the size that sets it) and this GPU's limit:
// past it the launch would fail with a bare "invalid argument".
template <typename... What>
void allow_smem(const void* kernel, size_t bytes, const char* op, const What&... what) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  COMET_CHECK(bytes <= prop->sharedMemPerBlockOptin, op, what..., " needs ", bytes,
              " bytes of shared memory per block on CUDA; this GPU (", prop->name, ", sm_", prop->major,
              prop->minor, ") gives at most ", prop->sharedMemPerBlockOptin, " (the CPU kernel has no such limit)");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

// CUDA allows at most 65535 blocks along a grid's y and z: a kernel that puts heads or samples
// there is refused past it with a message naming the op and the dimension.
inline void check_grid_yz(const char* op, const char* name, int64_t blocks) {
  COMET_CHECK(blocks <= 65535, op, name, " of ", blocks, " exceeds the 65535 CUDA blocks this kernel "
              "launches along a grid dimension; split it into parts of at most 65535");
}

}  // namespace comet::cuda
