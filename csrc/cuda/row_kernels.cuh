// Block-per-row building blocks of the CUDA rla and gated_update kernels: a
// block of kRowThreads threads owns one row of d elements at a time (element i
// belongs to thread i % blockDim.x). All sums are in the accumulation type.
#pragma once

#include "cuda/cuda_utils.cuh"

namespace comet::cuda {

constexpr int kRowThreads = 256;

// sum_i a[i] * b[i] over the row, a and b global rows; every thread gets the total.
template <typename acc_t, typename A, typename B>
__device__ __forceinline__ acc_t row_dot(const A* a, const B* b, int64_t d, acc_t* scratch) {
  acc_t v[1] = {0};
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    v[0] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  block_sum<1>(v, scratch);
  return v[0];
}

// out[k] = sum_i term(k, i) for k < r, summed over the row by the whole block;
// out (shared memory) is visible to all threads on return.
template <typename acc_t, typename Term>
__device__ __forceinline__ void row_sums(int64_t r, int64_t d, acc_t* scratch, acc_t* out, Term term) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __syncthreads();
  for (int64_t k = 0; k < r; ++k) {
    acc_t s = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s += term(k, i);
    s = warp_sum(s);
    if (lane == 0) scratch[k * warps + warp] = s;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < r; k += blockDim.x) {
    acc_t t = 0;
    for (int w2 = 0; w2 < warps; ++w2) t += scratch[k * warps + w2];
    out[k] = t;
  }
  __syncthreads();
}

// h[k] = sum_i W[k, i] * n[i]: W (r, d) global, n in shared memory.
template <typename acc_t, typename W>
__device__ __forceinline__ void row_project(const W* w, const acc_t* n, int64_t r, int64_t d,
                                            acc_t* scratch, acc_t* h) {
  row_sums(r, d, scratch, h, [&](int64_t k, int64_t i) { return static_cast<acc_t>(w[k * d + i]) * n[i]; });
}

// sum_k U[i, k] * h[k]: U (d, r) row-major global.
template <typename acc_t, typename W>
__device__ __forceinline__ acc_t row_expand(const W* u, const acc_t* h, int64_t r, int64_t i) {
  acc_t s = 0;
  for (int64_t k = 0; k < r; ++k) s += static_cast<acc_t>(u[i * r + k]) * h[k];
  return s;
}

// dh[k] = sum_i U[i, k] * g[i]: U (d, r) global, g a global row.
template <typename acc_t, typename W, typename G>
__device__ __forceinline__ void row_project_t(const W* u, const G* g, int64_t r, int64_t d,
                                              acc_t* scratch, acc_t* dh) {
  row_sums(r, d, scratch, dh, [&](int64_t k, int64_t i) {
    return static_cast<acc_t>(u[i * r + k]) * static_cast<acc_t>(g[i]);
  });
}

// Shared memory a row kernel needs: rows of d, vectors of r, reduction scratch.
template <typename acc_t>
inline size_t row_smem(int64_t d, int64_t rows_of_d, int64_t r, int64_t vecs_of_r) {
  const int64_t warps = kRowThreads / kWarp;
  return sizeof(acc_t) * (rows_of_d * d + vecs_of_r * r + std::max<int64_t>(r, 1) * warps + warps);
}

inline int row_grid(int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 4 * num_sms())));
}

}  // namespace comet::cuda
