// Per-row building blocks of rla and gated_update, in the accumulation type.
// Weights arrive pre-converted: down (r, d) and up_t = up^T (r, d), both
// row-major, so every inner loop runs over the hidden dimension and vectorises.
#pragma once

#include <cmath>
#include <cstdint>

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

// h = down n (r values).
template <typename acc_t>
inline void lowrank_project(const acc_t* n, const acc_t* down, int64_t r, int64_t d, acc_t* h) {
  for (int64_t k = 0; k < r; ++k) {
    const acc_t* dk = down + k * d;
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < d; ++i) acc += dk[i] * n[i];
    h[k] = acc;
  }
}

// y = n + up h.
template <typename acc_t>
inline void lowrank_expand(const acc_t* n, const acc_t* up_t, const acc_t* h, int64_t r, int64_t d,
                           acc_t* y) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] = n[i];
  for (int64_t k = 0; k < r; ++k) {
    const acc_t* uk = up_t + k * d;
    const acc_t hk = h[k];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) y[i] += uk[i] * hk;
  }
}

// Given dy: dn = dy + down^T (up^T dy) (written), d_up_t += h dy^T, d_down += dh n^T.
template <typename acc_t>
inline void lowrank_backward(const acc_t* dy, const acc_t* n, const acc_t* h, const acc_t* down,
                             const acc_t* up_t, int64_t r, int64_t d, acc_t* dh, acc_t* dn,
                             acc_t* d_down, acc_t* d_up_t) {
  for (int64_t k = 0; k < r; ++k) {
    const acc_t* uk = up_t + k * d;
    acc_t* duk = d_up_t + k * d;
    const acc_t hk = h[k];
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < d; ++i) {
      acc += uk[i] * dy[i];
      duk[i] += hk * dy[i];
    }
    dh[k] = acc;
  }
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) dn[i] = dy[i];
  for (int64_t k = 0; k < r; ++k) {
    const acc_t* dk = down + k * d;
    acc_t* ddk = d_down + k * d;
    const acc_t g = dh[k];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      dn[i] += dk[i] * g;
      ddk[i] += g * n[i];
    }
  }
}

}  // namespace comet::cpu
