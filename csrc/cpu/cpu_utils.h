// Small building blocks shared by the CPU kernels: a vectorisable exp, a
// row-major block GEMM, element conversion, and per-sample length reading.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace comet::cpu {

// exp(x) for float arrays, within 1.01 ulp of exp (every 61st float in
// [-100, 100] against the double exp). Written with plain compares and no
// library call so that loops over it vectorise (8 lanes with AVX2): GCC leaves
// std::fmin / std::fmax / std::nearbyint as calls into libm without -ffast-math,
// and it turns the clamps into blends only under -fno-trapping-math (setup.py).
// exp(-inf), and anything below the float range, is exactly 0 (the exponent
// clamps to 0, so the scale is +0); NaN stays NaN (it survives the clamps,
// and NaN * 0 is NaN); +inf and anything above 88 give exp(88).
inline float exp_scalar(float x) {
  x = x < -88.7f ? -88.7f : x;  // n >= -128 below: the exponent stays in int range
  x = x > 88.0f ? 88.0f : x;
  const float log2e = 1.44269504088896341f;
  // Round to nearest (nearbyint's default mode) by adding and removing
  // 1.5 * 2^23, which leaves no fraction bits; |x * log2e| < 128 here.
  const float round = 12582912.0f;
  const float n = (x * log2e + round) - round;
  // Cody-Waite split of ln 2 keeps r exact to float precision.
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = std::max(static_cast<int32_t>(n) + 127, 0) << 23;  // 2^n, or +0 below the range
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));  // (not std::bit_cast: GCC 10 lacks it)
  return p * scale;
}
inline double exp_scalar(double x) { return std::exp(x); }

// s[j] = exp(s[j] - mx) for j < n; returns the sum.
template <typename acc_t>
inline acc_t exp_row(acc_t* s, int64_t n, acc_t mx) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_scalar(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

// max(init, s[0..n)), or NaN if any s[j] is NaN (vectorises: NaN is tracked apart).
template <typename acc_t>
inline acc_t row_max_nan(const acc_t* s, int64_t n, acc_t init) {
  acc_t mx = init;
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    mx = s[j] > mx ? s[j] : mx;
    nan |= s[j] != s[j];
  }
  return nan ? std::numeric_limits<acc_t>::quiet_NaN() : mx;
}

// p[c] = exp(p[c] - lse[c]) for c < n.
template <typename acc_t>
inline void exp_row_minus(acc_t* p, const acc_t* lse, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) p[c] = exp_scalar(p[c] - lse[c]);
}

// ds[c] = p[c] * (ds[c] - delta[c]): the softmax backward of one row.
template <typename acc_t>
inline void softmax_grad_row(const acc_t* p, const acc_t* delta, int64_t n, acc_t* ds) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) ds[c] = p[c] * (ds[c] - delta[c]);
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n, acc_t alpha) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) x[c] *= alpha;
}

// C[M,N] (+)= A[M,K] . B[K,N], all row-major with leading dimensions, as plain loops.
template <typename T>
inline void loop_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                      T* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * lda + k];
      const T* b = B + k * ldb;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// C[M,N] (+)= A[M,K] . B[K,N], all row-major with leading dimensions.
inline void block_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                       const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
#else  // a torch without the fp32 batch-reduce GEMM: plain loops (correct, slower)
  loop_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
#endif
}
// float64 exists for gradcheck only: plain loops are enough.
inline void block_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                       const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  loop_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// out (cols, rows) = in (rows, cols)^T, both row-major and dense.
template <typename T>
inline void transpose(const T* in, int64_t rows, int64_t cols, T* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = in[i * cols + j];
}

template <typename acc_t, typename scalar_t>
inline void load_row(const scalar_t* src, int64_t n, acc_t* dst, acc_t scale = acc_t(1)) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * scale;
}

// float -> bfloat16, round to nearest even, NaN kept: the same result as
// c10's conversion, written as plain integer ops so the store loop vectorises.
inline c10::BFloat16 to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t r = f != f ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(r, c10::BFloat16::from_bits());
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = to_bfloat16(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// How many row slices a row-parallel kernel uses: one per thread, none smaller
// than min_rows. Kernels that reduce over rows keep one accumulator per slice,
// so the result does not depend on how the pool schedules the slices.
inline int64_t num_parts(int64_t rows, int64_t min_rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / min_rows));
}

// Runs fn(part, begin, end) over `parts` contiguous slices of [0, rows) in parallel.
template <typename F>
inline void for_each_part(int64_t rows, int64_t parts, const F& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) fn(p, rows * p / parts, rows * (p + 1) / parts);
  });
}

// Per-sample lengths as int64 on the host; `fallback` when the tensor is absent.
inline std::vector<int64_t> read_lengths(const c10::optional<at::Tensor>& t, int64_t batch,
                                         int64_t fallback) {
  std::vector<int64_t> out(batch, fallback);
  if (t.has_value() && t->defined()) {
    const at::Tensor l = t->to(at::kLong).contiguous();
    std::memcpy(out.data(), l.data_ptr<int64_t>(), batch * sizeof(int64_t));
  }
  return out;
}

}  // namespace comet::cpu
