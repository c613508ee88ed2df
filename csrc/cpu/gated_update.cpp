// CPU gated_update, one fused pass per memory slot (row):
//   c = RMSNorm(readout) * w;  g = sigmoid(gate . [c ; s]);  s' = g s + (1 - g) c
//   (s' = c without a state);  memory = s' + up(down(s')).
// With gate_snap < 1, a gate g > gate_snap blends as exactly 1 (s' = s).
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/row_ops.h"

namespace comet::cpu {
namespace {

constexpr int64_t kMinRows = 16;

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t d) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

// The gate the blend uses: exactly 1 above the snap threshold, else g.
template <typename acc_t>
inline acc_t snapped(acc_t g, acc_t gate_snap) {
  return g > gate_snap ? acc_t(1) : g;
}

// g = sigmoid(gate . [c ; s]); out = g' s + (1 - g') c with g' = snapped(g) (out may alias s).
// Returns g (unsnapped: the backward's straight-through derivative needs it).
template <typename acc_t>
inline acc_t gate_blend(const acc_t* c, const acc_t* s, const acc_t* gate, int64_t d, acc_t gate_snap,
                        acc_t* out) {
  const acc_t g = sigmoid(dot(gate, c, d) + dot(gate + d, s, d));
  const acc_t gs = snapped(g, gate_snap);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) out[j] = gs * s[j] + (acc_t(1) - gs) * c[j];
  return g;
}

// Given ds = dL/d(out) of gate_blend: dc and d_state (written), d_gate += dz [c ; s].
// Straight through the snap: the blend uses g', the gate's derivative is sigmoid'(z) = g (1 - g).
template <typename acc_t>
inline void gate_blend_backward(const acc_t* c, const acc_t* s, const acc_t* gate, acc_t g,
                                acc_t gate_snap, const acc_t* ds, int64_t d, acc_t* dc,
                                acc_t* d_gate, acc_t* d_state) {
  const acc_t gs = snapped(g, gate_snap);
  acc_t dg = 0;
#pragma omp simd reduction(+ : dg)
  for (int64_t j = 0; j < d; ++j) dg += ds[j] * (s[j] - c[j]);
  const acc_t dz = dg * g * (acc_t(1) - g);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    dc[j] = (acc_t(1) - gs) * ds[j] + dz * gate[j];
    d_gate[j] += dz * c[j];
    d_gate[d + j] += dz * s[j];
    d_state[j] = gs * ds[j] + dz * gate[d + j];
  }
}

// dst += src (converted).
template <typename scalar_t, typename acc_t>
inline void add_row(const scalar_t* src, int64_t d, acc_t* dst) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dst[j] += static_cast<acc_t>(src[j]);
}

constexpr int64_t kBlock = 64;  // rows per block

template <typename scalar_t>
void forward_kernel(const at::Tensor& R, const at::Tensor& S, const at::Tensor& w_f,
                    const at::Tensor& gate_f, const LowRankWeights& lw, double eps,
                    double gate_snap, at::Tensor& new_state, at::Tensor& memory) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = R.size(0), d = R.size(1);
  const LowRank<acc_t> lr = lw.get<acc_t>();
  const acc_t* w = w_f.data_ptr<acc_t>();
  const acc_t* gw = gate_f.data_ptr<acc_t>();
  for_each_part(M, num_parts(M, kMinRows), [&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> x(d), c(d), Sn(kBlock * d), H(kBlock * lr.r), G(kBlock * d);
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t m = std::min(kBlock, end - i0);
      for (int64_t i = 0; i < m; ++i) {
        acc_t* sn = &Sn[i * d];
        load_row(R.data_ptr<scalar_t>() + (i0 + i) * R.stride(0), d, x.data());
        if (S.defined()) {
          rms_forward(x.data(), w, d, static_cast<acc_t>(eps), c.data());
          load_row(S.data_ptr<scalar_t>() + (i0 + i) * S.stride(0), d, sn);
          gate_blend(c.data(), sn, gw, d, static_cast<acc_t>(gate_snap), sn);
        } else {
          rms_forward(x.data(), w, d, static_cast<acc_t>(eps), sn);
        }
        store_row(sn, d, new_state.data_ptr<scalar_t>() + (i0 + i) * d);
      }
      lowrank_forward(lr, m, Sn.data(), H.data(), G.data());
      for (int64_t i = 0; i < m; ++i)
        store_row(&G[i * d], d, memory.data_ptr<scalar_t>() + (i0 + i) * d);
    }
  });
}

struct Grads {
  at::Tensor readout, state, norm, gate, down, up_t;  // norm/gate/down/up_t: per-part partials
};

template <typename scalar_t>
void backward_kernel(const at::Tensor& GS, const at::Tensor& GM, const at::Tensor& R,
                     const at::Tensor& S, const at::Tensor& w_f, const at::Tensor& gate_f,
                     const LowRankWeights& lw, double eps, double gate_snap, int64_t parts,
                     Grads& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = R.size(0), d = R.size(1);
  const LowRank<acc_t> lr = lw.get<acc_t>();
  const int64_t r = lr.r;
  const acc_t* w = w_f.data_ptr<acc_t>();
  const acc_t* gw = gate_f.data_ptr<acc_t>();
  const bool has_state = S.defined();
  const acc_t snap = static_cast<acc_t>(gate_snap);
  for_each_part(M, parts, [&](int64_t p, int64_t begin, int64_t end) {
    // Per block: X readout, C candidate, S0 old state, Sn new state, g gates.
    std::vector<acc_t> X(kBlock * d), C(kBlock * d), S0(kBlock * d), Sn(kBlock * d);
    std::vector<acc_t> dG(kBlock * d), dSn(kBlock * d), dc(d), dx(d), ds0(d);
    std::vector<acc_t> H(kBlock * r), dH(kBlock * r), T(kBlock * r), rstd(kBlock), g(kBlock);
    acc_t* pd_w = out.norm.data_ptr<acc_t>() + p * d;
    acc_t* pd_gate = out.gate.data_ptr<acc_t>() + p * 2 * d;
    acc_t* pd_down = out.down.data_ptr<acc_t>() + p * r * d;
    acc_t* pd_up = out.up_t.data_ptr<acc_t>() + p * r * d;
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t m = std::min(kBlock, end - i0);
      for (int64_t i = 0; i < m; ++i) {  // recompute the forward rows
        load_row(R.data_ptr<scalar_t>() + (i0 + i) * R.stride(0), d, &X[i * d]);
        rstd[i] = rms_forward(&X[i * d], w, d, static_cast<acc_t>(eps), &C[i * d]);
        if (has_state) {
          load_row(S.data_ptr<scalar_t>() + (i0 + i) * S.stride(0), d, &S0[i * d]);
          g[i] = gate_blend(&C[i * d], &S0[i * d], gw, d, snap, &Sn[i * d]);
        } else {
          std::copy_n(&C[i * d], d, &Sn[i * d]);
        }
        load_row(GM.data_ptr<scalar_t>() + (i0 + i) * GM.stride(0), d, &dG[i * d]);
      }
      // d new_state = grad_new_state + RLA^T grad_memory.
      block_gemm(m, r, d, Sn.data(), d, lr.down_t, r, H.data(), r, false);
      lowrank_backward(lr, m, dG.data(), Sn.data(), H.data(), dH.data(), T.data(), dSn.data(),
                       pd_down, pd_up);
      for (int64_t i = 0; i < m; ++i) {
        acc_t* ds = &dSn[i * d];
        add_row(GS.data_ptr<scalar_t>() + (i0 + i) * GS.stride(0), d, ds);
        if (has_state) {
          gate_blend_backward(&C[i * d], &S0[i * d], gw, g[i], snap, ds, d, dc.data(), pd_gate,
                              ds0.data());
          store_row(ds0.data(), d, out.state.data_ptr<scalar_t>() + (i0 + i) * d);
          rms_backward(&X[i * d], w, rstd[i], dc.data(), d, dx.data(), pd_w);
        } else {
          rms_backward(&X[i * d], w, rstd[i], ds, d, dx.data(), pd_w);
        }
        store_row(dx.data(), d, out.readout.data_ptr<scalar_t>() + (i0 + i) * d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gated_update_cpu(const at::Tensor& readout,
                                                    const c10::optional<at::Tensor>& state,
                                                    const at::Tensor& norm_weight,
                                                    const at::Tensor& gate_weight,
                                                    const at::Tensor& down, const at::Tensor& up,
                                                    double eps, double gate_snap) {
  check_gated_update_args("gated_update", readout, state, norm_weight, gate_weight, down, up, eps,
                          gate_snap);
  const int64_t M = readout.size(0) * readout.size(1), d = readout.size(2);
  at::Tensor new_state = at::empty(readout.sizes(), readout.options());
  at::Tensor memory = at::empty(readout.sizes(), readout.options());
  if (M == 0) return {new_state, memory};
  const auto acc = acc_dtype(readout.scalar_type());
  const LowRankWeights lw(down, up, acc);
  const at::Tensor w_f = norm_weight.to(acc).contiguous(), gate_f = gate_weight.to(acc).contiguous();
  const at::Tensor R = readout.reshape({M, d});
  const at::Tensor S = state.has_value() ? state->reshape({M, d}) : at::Tensor();
  COMET_DISPATCH_FLOATING(readout.scalar_type(), "gated_update_cpu", [&] {
    forward_kernel<scalar_t>(R, S, w_f, gate_f, lw, eps, gate_snap, new_state, memory);
  });
  return {new_state, memory};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_update_backward_cpu(const at::Tensor& grad_new_state, const at::Tensor& grad_memory,
                          const at::Tensor& readout, const c10::optional<at::Tensor>& state,
                          const at::Tensor& norm_weight, const at::Tensor& gate_weight,
                          const at::Tensor& down, const at::Tensor& up, double eps,
                          double gate_snap) {
  check_gated_update_backward_args("gated_update_backward", grad_new_state, grad_memory, readout, state,
                                   norm_weight, gate_weight, down, up, eps, gate_snap);
  const int64_t M = readout.size(0) * readout.size(1), d = readout.size(2), r = down.size(0);
  const auto acc = acc_dtype(readout.scalar_type());
  const auto acc_opts = readout.options().dtype(acc);
  const bool has_state = state.has_value();
  const int64_t parts = num_parts(M, kMinRows);
  Grads out;
  out.readout = at::empty(readout.sizes(), readout.options());
  out.state = has_state ? at::empty(readout.sizes(), readout.options())
                        : at::empty({0}, readout.options());
  out.norm = at::zeros({parts, d}, acc_opts);
  out.gate = at::zeros({parts, 2 * d}, acc_opts);
  out.down = at::zeros({parts, r, d}, acc_opts);
  out.up_t = at::zeros({parts, r, d}, acc_opts);
  if (M > 0) {
    const LowRankWeights lw(down, up, acc);
    const at::Tensor w_f = norm_weight.to(acc).contiguous();
    const at::Tensor gate_f = gate_weight.to(acc).contiguous();
    const at::Tensor R = readout.reshape({M, d});
    const at::Tensor S = has_state ? state->reshape({M, d}) : at::Tensor();
    COMET_DISPATCH_FLOATING(readout.scalar_type(), "gated_update_backward_cpu", [&] {
      backward_kernel<scalar_t>(grad_new_state.reshape({M, d}), grad_memory.reshape({M, d}), R, S,
                                w_f, gate_f, lw, eps, gate_snap, parts, out);
    });
  }
  const auto dt = readout.scalar_type();
  return {out.readout,
          out.state,
          out.norm.sum(0).to(dt),
          out.gate.sum(0).view({1, 2 * d}).to(dt),
          out.down.sum(0).to(dt),
          out.up_t.sum(0).t().contiguous().to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CPU, m) {
  m.impl("gated_update", &gated_update_cpu);
  m.impl("gated_update_backward", &gated_update_backward_cpu);
}

}  // namespace comet::cpu
