// CPU gated_update, one fused pass per memory slot (row):
//   c = RMSNorm(readout) * w;  g = sigmoid(gate . [c ; s]);  s' = g s + (1 - g) c
//   (s' = c without a state);  memory = s' + up(down(s')).
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

// g = sigmoid(gate . [c ; s]); out = g s + (1 - g) c (out may alias s). Returns g.
template <typename acc_t>
inline acc_t gate_blend(const acc_t* c, const acc_t* s, const acc_t* gate, int64_t d, acc_t* out) {
  const acc_t g = sigmoid(dot(gate, c, d) + dot(gate + d, s, d));
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) out[j] = g * s[j] + (acc_t(1) - g) * c[j];
  return g;
}

// Given ds = dL/d(out) of gate_blend: dc (written), d_gate += dz [c ; s], d_state (stored).
template <typename acc_t, typename scalar_t>
inline void gate_blend_backward(const acc_t* c, const acc_t* s, const acc_t* gate, acc_t g,
                                const acc_t* ds, int64_t d, acc_t* dc, acc_t* d_gate,
                                scalar_t* d_state) {
  acc_t dg = 0;
#pragma omp simd reduction(+ : dg)
  for (int64_t j = 0; j < d; ++j) dg += ds[j] * (s[j] - c[j]);
  const acc_t dz = dg * g * (acc_t(1) - g);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    dc[j] = (acc_t(1) - g) * ds[j] + dz * gate[j];
    d_gate[j] += dz * c[j];
    d_gate[d + j] += dz * s[j];
    d_state[j] = static_cast<scalar_t>(g * ds[j] + dz * gate[d + j]);
  }
}

// dst += src (converted).
template <typename scalar_t, typename acc_t>
inline void add_row(const scalar_t* src, int64_t d, acc_t* dst) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dst[j] += static_cast<acc_t>(src[j]);
}

// Weights in the accumulation type; up transposed to (r, d).
struct Weights {
  at::Tensor norm, gate, down, up_t;
  Weights(const at::Tensor& norm_weight, const at::Tensor& gate_weight, const at::Tensor& down_w,
          const at::Tensor& up_w, at::ScalarType acc)
      : norm(norm_weight.to(acc).contiguous()),
        gate(gate_weight.to(acc).contiguous()),
        down(down_w.to(acc).contiguous()),
        up_t(up_w.t().to(acc).contiguous()) {}
};

std::tuple<at::Tensor, at::Tensor> gated_update_cpu(const at::Tensor& readout,
                                                    const c10::optional<at::Tensor>& state,
                                                    const at::Tensor& norm_weight,
                                                    const at::Tensor& gate_weight,
                                                    const at::Tensor& down, const at::Tensor& up,
                                                    double eps) {
  check_gated_update_args("gated_update", readout, state, norm_weight, gate_weight, down, up, eps);
  const int64_t M = readout.size(0) * readout.size(1), d = readout.size(2), r = down.size(0);
  at::Tensor new_state = at::empty(readout.sizes(), readout.options());
  at::Tensor memory = at::empty(readout.sizes(), readout.options());
  if (M == 0) return {new_state, memory};
  const Weights wts(norm_weight, gate_weight, down, up, acc_dtype(readout.scalar_type()));
  const at::Tensor R = readout.reshape({M, d});
  const at::Tensor S = state.has_value() ? state->reshape({M, d}) : at::Tensor();
  COMET_DISPATCH_FLOATING(readout.scalar_type(), "gated_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = wts.norm.data_ptr<acc_t>();
    const acc_t* gw = wts.gate.data_ptr<acc_t>();
    const acc_t* dw = wts.down.data_ptr<acc_t>();
    const acc_t* uw = wts.up_t.data_ptr<acc_t>();
    at::parallel_for(0, M, kMinRows, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(d), c(d), s(d), h(r), mem(d);
      for (int64_t i = begin; i < end; ++i) {
        load_row(R.data_ptr<scalar_t>() + i * R.stride(0), d, x.data());
        rms_forward(x.data(), w, d, static_cast<acc_t>(eps), c.data());
        if (S.defined()) {
          load_row(S.data_ptr<scalar_t>() + i * S.stride(0), d, s.data());
          gate_blend(c.data(), s.data(), gw, d, s.data());
        } else {
          std::copy(c.begin(), c.end(), s.begin());
        }
        lowrank_project(s.data(), dw, r, d, h.data());
        lowrank_expand(s.data(), uw, h.data(), r, d, mem.data());
        store_row(s.data(), d, new_state.data_ptr<scalar_t>() + i * d);
        store_row(mem.data(), d, memory.data_ptr<scalar_t>() + i * d);
      }
    });
  });
  return {new_state, memory};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_update_backward_cpu(const at::Tensor& grad_new_state, const at::Tensor& grad_memory,
                          const at::Tensor& readout, const c10::optional<at::Tensor>& state,
                          const at::Tensor& norm_weight, const at::Tensor& gate_weight,
                          const at::Tensor& down, const at::Tensor& up, double eps) {
  const char* op = "gated_update_backward";
  check_gated_update_args(op, readout, state, norm_weight, gate_weight, down, up, eps);
  for (const auto& [g, name] : {std::pair{&grad_new_state, "grad_new_state"},
                                std::pair{&grad_memory, "grad_memory"}}) {
    COMET_CHECK(g->sizes() == readout.sizes(), op, "'", name, "' must have the shape of readout ",
                shape_str(readout), ", got ", shape_str(*g));
    check_same_dtype(*g, readout, op, name, "readout");
    check_same_device(*g, readout, op, name, "readout");
    check_last_contiguous(*g, op, name);
  }
  const int64_t M = readout.size(0) * readout.size(1), d = readout.size(2), r = down.size(0);
  const auto acc = acc_dtype(readout.scalar_type());
  const auto acc_opts = readout.options().dtype(acc);
  const bool has_state = state.has_value();
  const int64_t parts = num_parts(M, kMinRows);
  at::Tensor d_readout = at::empty(readout.sizes(), readout.options());
  at::Tensor d_state = has_state ? at::empty(readout.sizes(), readout.options())
                                 : at::empty({0}, readout.options());
  at::Tensor d_w = at::zeros({parts, d}, acc_opts);
  at::Tensor d_gate = at::zeros({parts, 2 * d}, acc_opts);
  at::Tensor d_down = at::zeros({parts, r, d}, acc_opts);
  at::Tensor d_up_t = at::zeros({parts, r, d}, acc_opts);
  if (M > 0) {
    const Weights wts(norm_weight, gate_weight, down, up, acc);
    const at::Tensor R = readout.reshape({M, d});
    const at::Tensor S = has_state ? state->reshape({M, d}) : at::Tensor();
    const at::Tensor GS = grad_new_state.reshape({M, d});
    const at::Tensor GM = grad_memory.reshape({M, d});
    COMET_DISPATCH_FLOATING(readout.scalar_type(), "gated_update_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* w = wts.norm.data_ptr<acc_t>();
      const acc_t* gw = wts.gate.data_ptr<acc_t>();
      const acc_t* dw = wts.down.data_ptr<acc_t>();
      const acc_t* uw = wts.up_t.data_ptr<acc_t>();
      for_each_part(M, parts, [&](int64_t p, int64_t begin, int64_t end) {
        std::vector<acc_t> x(d), c(d), s(d), sn(d), h(r), dh(r), gm(d), ds(d), dc(d), dx(d);
        acc_t* pd_w = d_w.data_ptr<acc_t>() + p * d;
        acc_t* pd_gate = d_gate.data_ptr<acc_t>() + p * 2 * d;
        acc_t* pd_down = d_down.data_ptr<acc_t>() + p * r * d;
        acc_t* pd_up = d_up_t.data_ptr<acc_t>() + p * r * d;
        for (int64_t i = begin; i < end; ++i) {
          // Recompute the forward row.
          load_row(R.data_ptr<scalar_t>() + i * R.stride(0), d, x.data());
          const acc_t rstd = rms_forward(x.data(), w, d, static_cast<acc_t>(eps), c.data());
          acc_t g = 0;
          if (has_state) {
            load_row(S.data_ptr<scalar_t>() + i * S.stride(0), d, s.data());
            g = gate_blend(c.data(), s.data(), gw, d, sn.data());
          } else {
            std::copy(c.begin(), c.end(), sn.begin());
          }
          lowrank_project(sn.data(), dw, r, d, h.data());
          // d s' = grad_new_state + RLA^T grad_memory.
          load_row(GM.data_ptr<scalar_t>() + i * GM.stride(0), d, gm.data());
          lowrank_backward(gm.data(), sn.data(), h.data(), dw, uw, r, d, dh.data(), ds.data(),
                           pd_down, pd_up);
          add_row(GS.data_ptr<scalar_t>() + i * GS.stride(0), d, ds.data());
          if (has_state) {
            gate_blend_backward(c.data(), s.data(), gw, g, ds.data(), d, dc.data(), pd_gate,
                                d_state.data_ptr<scalar_t>() + i * d);
          } else {
            std::copy(ds.begin(), ds.end(), dc.begin());
          }
          rms_backward(x.data(), w, rstd, dc.data(), d, dx.data(), pd_w);
          store_row(dx.data(), d, d_readout.data_ptr<scalar_t>() + i * d);
        }
      });
    });
  }
  const auto dt = readout.scalar_type();
  return {d_readout,
          d_state,
          d_w.sum(0).to(dt),
          d_gate.sum(0).view({1, 2 * d}).to(dt),
          d_down.sum(0).to(dt),
          d_up_t.sum(0).t().contiguous().to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CPU, m) {
  m.impl("gated_update", &gated_update_cpu);
  m.impl("gated_update_backward", &gated_update_backward_cpu);
}

}  // namespace comet::cpu
