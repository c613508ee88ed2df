// Warp-per-row building blocks of the fast rla / gated_update forwards: a warp
// owns one row of d elements, held in registers as kVecs 16-byte vectors per
// lane (lane l's vector i covers elements (i * 32 + l) * W .. + W - 1, W = 16 /
// sizeof(scalar_t)), so a row is read and written once with 16-byte accesses and
// its reductions are warp shuffles, no shared memory, no block barriers. The
// low-rank weights are read straight from global memory: every row reads the same
// ones, so they stay in L1 / L2. Sums are fp32.
//
// The fast path takes float / bfloat16 / float16 rows with d a multiple of W, at
// most 32 * kMaxVecs * W elements, 16-byte aligned rows, and rank <= kMaxWarpRank;
// the block-per-row kernels (row_kernels.cuh) take everything else. At the largest
// rows (16 vectors per lane) the kernels spill a few hundred bytes to L1.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/cuda_utils.cuh"

namespace comet::cuda {

constexpr int kRowWarps = 4;      // rows per block of the fast path
constexpr int kMaxWarpRank = 16;  // its largest low rank
constexpr int kMaxVecs = 16;      // its largest row: 32 * 16 vectors (4096 bf16, 2048 fp32 elements)

template <typename scalar_t>
constexpr bool kWarpRowType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                              std::is_same_v<scalar_t, c10::Half>;

template <typename scalar_t, int kVecs>
struct WarpRow {
  static constexpr int W = 16 / sizeof(scalar_t);
  float v[kVecs][W];

  // First element of this lane's vector i.
  static __device__ __forceinline__ int64_t at(int i, int lane) { return (int64_t(i) * kWarp + lane) * W; }

  // W elements at p (16-byte aligned) as floats.
  static __device__ __forceinline__ void load_vec(const scalar_t* p, float (&out)[W]) {
    alignas(16) scalar_t t[W];
    *reinterpret_cast<uint4*>(t) = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int e = 0; e < W; ++e) out[e] = static_cast<float>(t[e]);
  }

  __device__ __forceinline__ void load(const scalar_t* row, int64_t d, int lane) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (at(i, lane) < d) load_vec(row + at(i, lane), v[i]);
      else
#pragma unroll
        for (int e = 0; e < W; ++e) v[i][e] = 0.f;
    }
  }

  __device__ __forceinline__ void store(scalar_t* row, int64_t d, int lane) const {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (at(i, lane) >= d) continue;
      alignas(16) scalar_t t[W];
#pragma unroll
      for (int e = 0; e < W; ++e) t[e] = static_cast<scalar_t>(v[i][e]);
      *reinterpret_cast<uint4*>(row + at(i, lane)) = *reinterpret_cast<const uint4*>(t);
    }
  }

  // sum_i a_i * w_i over the row (w a global row of d elements, or this row itself when null).
  __device__ __forceinline__ float dot(const scalar_t* w, int64_t d, int lane) const {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (at(i, lane) >= d) continue;
      float wv[W];
      if (w != nullptr) load_vec(w + at(i, lane), wv);
#pragma unroll
      for (int e = 0; e < W; ++e) s += v[i][e] * (w != nullptr ? wv[e] : v[i][e]);
    }
    return warp_sum(s);
  }

  // sum_i a_i * b_i of two global rows, streamed (not kept in registers).
  static __device__ __forceinline__ float dot_rows(const scalar_t* a, const scalar_t* b, int64_t d, int lane) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (at(i, lane) >= d) continue;
      float av[W], bv[W];
      load_vec(a + at(i, lane), av);
      load_vec(b + at(i, lane), bv);
#pragma unroll
      for (int e = 0; e < W; ++e) s += av[e] * bv[e];
    }
    return warp_sum(s);
  }

  // a_i = g * b_i + (1 - g) * a_i (b a global row).
  __device__ __forceinline__ void blend(float g, const scalar_t* b, int64_t d, int lane) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (at(i, lane) >= d) continue;
      float bv[W];
      load_vec(b + at(i, lane), bv);
#pragma unroll
      for (int e = 0; e < W; ++e) v[i][e] = g * bv[e] + (1.f - g) * v[i][e];
    }
  }

  // a_i *= s * w_i (w a global row).
  __device__ __forceinline__ void scale(float s, const scalar_t* w, int64_t d, int lane) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (at(i, lane) >= d) continue;
      float wv[W];
      load_vec(w + at(i, lane), wv);
#pragma unroll
      for (int e = 0; e < W; ++e) v[i][e] *= s * wv[e];
    }
  }

  // a += U (D a): D (r, d), U (d, r), both row-major, r <= kMaxWarpRank.
  __device__ __forceinline__ void add_low_rank(const scalar_t* down, const scalar_t* up, int r, int64_t d,
                                               int lane) {
    float h[kMaxWarpRank];
#pragma unroll
    for (int k = 0; k < kMaxWarpRank; ++k) h[k] = k < r ? dot(down + k * d, d, lane) : 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (at(i, lane) >= d) continue;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const scalar_t* u = up + (at(i, lane) + e) * r;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < kMaxWarpRank; ++k)
          if (k < r) s += static_cast<float>(u[k]) * h[k];
        v[i][e] += s;
      }
    }
  }
};

// Vectors per lane the fast path needs for rows of d elements of scalar_t (a power of two),
// or 0 when it does not take them.
template <typename scalar_t>
inline int warp_row_vecs(int64_t d, int64_t r) {
  constexpr int W = 16 / sizeof(scalar_t);
  if (!kWarpRowType<scalar_t> || d <= 0 || d % W != 0 || r > kMaxWarpRank) return 0;
  const int64_t per_lane = (d / W + kWarp - 1) / kWarp;
  for (int vecs = 1; vecs <= kMaxVecs; vecs *= 2)
    if (per_lane <= vecs) return vecs;
  return 0;
}

// Calls f(std::integral_constant<int, vecs>) for the vecs warp_row_vecs chose.
template <typename F>
inline void dispatch_warp_row_vecs(int vecs, const F& f) {
  switch (vecs) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: TORCH_CHECK(false, "comet_ext internal error: no warp-row kernel for ", vecs, " vectors per lane");
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks for M rows, kRowWarps rows per block.
inline unsigned warp_row_grid(int64_t M) {
  const int64_t blocks = (M + kRowWarps - 1) / kRowWarps;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "comet_ext: ", M, " rows are too many for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace comet::cuda
