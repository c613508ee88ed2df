// Building blocks of rla and gated_update, in the accumulation type: RMSNorm on
// one row, the low-rank adapter on a block of rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/cpu_utils.h"

namespace comet::cpu {

// n = x * rstd * w; returns rstd.
template <typename acc_t>
inline acc_t rms_forward(const acc_t* x, const acc_t* w, int64_t d, acc_t eps, acc_t* n) {
  acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const acc_t rstd = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) n[i] = x[i] * rstd * w[i];
  return rstd;
}

// Given dn = dL/dn: dx (written) and dw += dn * x * rstd.
template <typename acc_t>
inline void rms_backward(const acc_t* x, const acc_t* w, acc_t rstd, const acc_t* dn, int64_t d,
                         acc_t* dx, acc_t* dw) {
  acc_t dot = 0;  // sum_i dn_i w_i x_i
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < d; ++i) dot += dn[i] * w[i] * x[i];
  const acc_t c = dot * rstd * rstd * rstd / static_cast<acc_t>(d);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    dw[i] += dn[i] * x[i] * rstd;
    dx[i] = dn[i] * w[i] * rstd - x[i] * c;
  }
}

// The low-rank part on a block of m rows (row-major, leading dimension d), as
// GEMMs so the weights are streamed once per block, not once per row.
// Weights in the accumulation type: down (r, d), down_t (d, r), up (d, r), up_t (r, d).
template <typename acc_t>
struct LowRank {
  const acc_t *down, *down_t, *up, *up_t;
  int64_t r, d;
};

// H = N down^T (m, r); Y = N + H up^T (m, d).
template <typename acc_t>
inline void lowrank_forward(const LowRank<acc_t>& w, int64_t m, const acc_t* N, acc_t* H, acc_t* Y) {
  block_gemm(m, w.r, w.d, N, w.d, w.down_t, w.r, H, w.r, false);
  std::copy_n(N, m * w.d, Y);
  block_gemm(m, w.d, w.r, H, w.r, w.up_t, w.d, Y, w.d, true);
}

// Given dY (m, d) and the forward's N, H: dN = dY + (dY up) down (written),
// d_up_t += H^T dY, d_down += (dY up)^T N. Scratch: dH (m, r), t (r, m).
template <typename acc_t>
inline void lowrank_backward(const LowRank<acc_t>& w, int64_t m, const acc_t* dY, const acc_t* N,
                             const acc_t* H, acc_t* dH, acc_t* t, acc_t* dN, acc_t* d_down,
                             acc_t* d_up_t) {
  const int64_t r = w.r, d = w.d;
  block_gemm(m, r, d, dY, d, w.up, r, dH, r, false);
  transpose(H, m, r, t);
  block_gemm(r, d, m, t, m, dY, d, d_up_t, d, true);
  std::copy_n(dY, m * d, dN);
  block_gemm(m, d, r, dH, r, w.down, d, dN, d, true);
  transpose(dH, m, r, t);
  block_gemm(r, d, m, t, m, N, d, d_down, d, true);
}

// The adapter's weights converted once per call to the accumulation type, in
// both orientations the GEMMs above read.
struct LowRankWeights {
  at::Tensor down, down_t, up, up_t;
  LowRankWeights(const at::Tensor& down_w, const at::Tensor& up_w, at::ScalarType acc)
      : down(down_w.to(acc).contiguous()),
        down_t(down.t().contiguous()),
        up(up_w.to(acc).contiguous()),
        up_t(up.t().contiguous()) {}
  template <typename acc_t>
  LowRank<acc_t> get() const {
    return {down.data_ptr<acc_t>(), down_t.data_ptr<acc_t>(), up.data_ptr<acc_t>(),
            up_t.data_ptr<acc_t>(), down.size(0), down.size(1)};
  }
};

}  // namespace comet::cpu
