// Building blocks of the two-pass ("v2") backwards of rla and gated_update, picked with
// COMET_ROW_KERNELS=v2 for ranks up to kMaxColRank.
//
// The v1 backwards run a block per row and add each row's share of the weight gradients
// (dD, dU: r x d each) into per-block fp32 partials — a read and a write of 2·r·d values per
// row, about twenty times the row's own traffic at r = 8. The v2 backwards split the work:
//   pass 1 ("stats"): a warp per row computes the row's few scalars — its low-rank products
//     a = D·n and b = Uᵀ·dy (zero-padded from r to the rank bucket R) and up to four more
//     (rstd, the gate, ...) — into a row table (M, 2R + 4) of the accumulation type;
//   pass 2 ("columns"): a thread per column walks a range of rows, forms the row's input
//     gradients element by element from the table, and sums the weight gradients of its
//     column over the range in registers, written once per block as a partial (P, r, d)
//     that the host sums over P.
// Each row is read twice (L2 often keeps it between the passes) and written once; the
// partials cost 2r + 1 values per column per range of at least kMinRangeRows rows.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cuda/cuda_utils.cuh"

namespace comet::cuda {

constexpr int kColThreads = 256;  // columns per block of pass 2
constexpr int kMaxColRank = 16;   // the largest rank bucket
constexpr int kMinRangeRows = 64;  // rows per pass-2 block at least: partials small next to the rows

// COMET_ROW_KERNELS=v2 picks the two-pass backwards; unset or "v1" the block-per-row ones — the
// default until v2 has passed a GPU check (bench/device_check.sh tests and times both).
inline bool row_v2() {
  const char* choice = std::getenv("COMET_ROW_KERNELS");
  if (choice == nullptr || *choice == '\0' || std::strcmp(choice, "v1") == 0) return false;
  TORCH_CHECK(std::strcmp(choice, "v2") == 0, "COMET_ROW_KERNELS must be 'v1' or 'v2', got '", choice, "'");
  return true;
}

// The smallest rank bucket (4, 8, 16) holding rank r; 0 past kMaxColRank (v1 then). Buckets
// keep the per-row products in registers with compile-time indices.
inline int rank_bucket(int64_t r) { return r <= 4 ? 4 : r <= 8 ? 8 : r <= kMaxColRank ? kMaxColRank : 0; }

// Calls f(std::integral_constant<int, R>) for bucket R.
template <typename F>
void dispatch_rank_bucket(int R, const F& f) {
  switch (R) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: TORCH_CHECK(false, "comet_ext internal error: no row kernel for rank bucket ", R);
  }
}

// Values per row of the table: a (R), b (R), e (4). A multiple of 4: 16-byte fp32 rows.
template <int R>
constexpr int kStatsWidth = 2 * R + 4;

// One row of the table, read by every thread of a block (a broadcast: L1 serves it).
template <typename acc_t, int R>
struct RowStats {
  acc_t a[R], b[R], e[4];

  __device__ __forceinline__ void load(const acc_t* __restrict__ row) {
    acc_t v[kStatsWidth<R>];
    if constexpr (std::is_same_v<acc_t, float>) {
      // 16-byte loads (the table's rows are 16-byte aligned), unpacked by component: v itself is
      // a 4-byte-aligned local array, no float4 may be stored through it (-G keeps it in memory)
#pragma unroll
      for (int j = 0; j < kStatsWidth<R>; j += 4) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(row + j));
        v[j] = q.x, v[j + 1] = q.y, v[j + 2] = q.z, v[j + 3] = q.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kStatsWidth<R>; ++j) v[j] = row[j];
    }
#pragma unroll
    for (int k = 0; k < R; ++k) a[k] = v[k], b[k] = v[R + k];
#pragma unroll
    for (int j = 0; j < 4; ++j) e[j] = v[2 * R + j];
  }
};

// Writes a row of the table (lane 0 of the warp that computed it; a and b already warp-summed).
template <typename acc_t, int R>
__device__ __forceinline__ void store_stats(acc_t* __restrict__ row, const acc_t (&a)[R], const acc_t (&b)[R],
                                            acc_t e0, acc_t e1, acc_t e2, acc_t e3) {
#pragma unroll
  for (int k = 0; k < R; ++k) row[k] = a[k], row[R + k] = b[k];
  row[2 * R] = e0, row[2 * R + 1] = e1, row[2 * R + 2] = e2, row[2 * R + 3] = e3;
}

// Warp-sums each of the R values; every lane gets the totals.
template <typename acc_t, int R>
__device__ __forceinline__ void warp_sum_all(acc_t (&v)[R]) {
#pragma unroll
  for (int k = 0; k < R; ++k) v[k] = warp_sum(v[k]);
}

// Column k < r of a row-major (r, d) weight at column i, zero for k >= r.
template <typename acc_t, int R, typename scalar_t>
__device__ __forceinline__ void load_column(const scalar_t* __restrict__ w, int64_t r, int64_t d, int64_t i,
                                            acc_t (&out)[R]) {
#pragma unroll
  for (int k = 0; k < R; ++k) out[k] = k < r ? static_cast<acc_t>(w[k * d + i]) : acc_t(0);
}

// Pass 2's launch: blocks of kColThreads columns (x) by ranges of `rows` rows (y), about eight
// blocks per SM, each range at least kMinRangeRows rows and at most 65535 ranges.
struct ColLaunch {
  dim3 grid;
  int64_t rows;    // rows per range
  int64_t ranges;  // = grid.y, the partials' leading size
};

inline ColLaunch col_launch(int64_t M, int64_t d) {
  const int64_t col_blocks = (d + kColThreads - 1) / kColThreads;
  const int64_t wanted = std::max<int64_t>(1, (8 * num_sms() + col_blocks - 1) / col_blocks);
  int64_t rows = std::max<int64_t>({kMinRangeRows, (M + wanted - 1) / wanted, (M + 65534) / 65535});
  const int64_t ranges = std::max<int64_t>(1, (M + rows - 1) / rows);
  TORCH_CHECK(col_blocks <= std::numeric_limits<int>::max(), "comet_ext: hidden size ", d,
              " is too large for one launch");
  return {dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ranges)), rows, ranges};
}

}  // namespace comet::cuda
