// CPU rla: y = n + up(down(n)), n = RMSNorm(x) * w (or x). Rows are processed
// in blocks held in fp32 scratch: the norm per row, the low-rank part as GEMMs
// per block. Weight gradients reduce over per-slice partials.
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/row_ops.h"

namespace comet::cpu {
namespace {

constexpr int64_t kBlock = 64;  // rows per block
constexpr int64_t kMinRows = 16;

template <typename scalar_t>
void rla_forward_kernel(const at::Tensor& x, const LowRankWeights& lw, const at::Tensor& w_f,
                        double eps, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), d = x.size(1);
  const LowRank<acc_t> lr = lw.get<acc_t>();
  const acc_t* w = w_f.defined() ? w_f.data_ptr<acc_t>() : nullptr;
  for_each_part(M, num_parts(M, kMinRows), [&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> X(kBlock * d), Nb(kBlock * d), H(kBlock * lr.r), Y(kBlock * d);
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t m = std::min(kBlock, end - i0);
      for (int64_t i = 0; i < m; ++i) {
        load_row(x.data_ptr<scalar_t>() + (i0 + i) * x.stride(0), d, &X[i * d]);
        if (w) rms_forward(&X[i * d], w, d, static_cast<acc_t>(eps), &Nb[i * d]);
      }
      lowrank_forward(lr, m, w ? Nb.data() : X.data(), H.data(), Y.data());
      for (int64_t i = 0; i < m; ++i) store_row(&Y[i * d], d, y.data_ptr<scalar_t>() + (i0 + i) * d);
    }
  });
}

template <typename scalar_t>
void rla_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const LowRankWeights& lw,
                         const at::Tensor& w_f, double eps, int64_t parts, at::Tensor& dx,
                         at::Tensor& d_down, at::Tensor& d_up_t, at::Tensor& d_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), d = x.size(1);
  const LowRank<acc_t> lr = lw.get<acc_t>();
  const int64_t r = lr.r;
  const acc_t* w = w_f.defined() ? w_f.data_ptr<acc_t>() : nullptr;
  for_each_part(M, parts, [&](int64_t p, int64_t begin, int64_t end) {
    std::vector<acc_t> X(kBlock * d), Nb(kBlock * d), dY(kBlock * d), dN(kBlock * d), dX(d);
    std::vector<acc_t> H(kBlock * r), dH(kBlock * r), T(kBlock * r), rstd(kBlock);
    acc_t* pd_down = d_down.data_ptr<acc_t>() + p * r * d;
    acc_t* pd_up = d_up_t.data_ptr<acc_t>() + p * r * d;
    acc_t* pd_w = w ? d_w.data_ptr<acc_t>() + p * d : nullptr;
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t m = std::min(kBlock, end - i0);
      for (int64_t i = 0; i < m; ++i) {
        load_row(x.data_ptr<scalar_t>() + (i0 + i) * x.stride(0), d, &X[i * d]);
        load_row(grad_y.data_ptr<scalar_t>() + (i0 + i) * grad_y.stride(0), d, &dY[i * d]);
        if (w) rstd[i] = rms_forward(&X[i * d], w, d, static_cast<acc_t>(eps), &Nb[i * d]);
      }
      const acc_t* NN = w ? Nb.data() : X.data();
      block_gemm(m, r, d, NN, d, lr.down_t, r, H.data(), r, false);
      lowrank_backward(lr, m, dY.data(), NN, H.data(), dH.data(), T.data(), dN.data(), pd_down,
                       pd_up);
      for (int64_t i = 0; i < m; ++i) {
        scalar_t* out = dx.data_ptr<scalar_t>() + (i0 + i) * d;
        if (w) {
          rms_backward(&X[i * d], w, rstd[i], &dN[i * d], d, dX.data(), pd_w);
          store_row(dX.data(), d, out);
        } else {
          store_row(&dN[i * d], d, out);
        }
      }
    }
  });
}

at::Tensor rla_cpu(const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
                   const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_rla_args("rla", x, down, up, norm_weight, eps);
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.size(0) == 0) return y;
  const auto acc = acc_dtype(x.scalar_type());
  const LowRankWeights lw(down, up, acc);
  const at::Tensor w_f = norm_weight.has_value() ? norm_weight->to(acc).contiguous() : at::Tensor();
  COMET_DISPATCH_FLOATING(x.scalar_type(), "rla_cpu",
                          [&] { rla_forward_kernel<scalar_t>(x, lw, w_f, eps, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
    const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_rla_backward_args("rla_backward", grad_y, x, down, up, norm_weight, eps);
  const int64_t M = x.size(0), d = x.size(1), r = down.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const bool has_norm = norm_weight.has_value();
  const int64_t parts = num_parts(M, kMinRows);
  at::Tensor dx = at::empty({M, d}, x.options());
  at::Tensor d_down = at::zeros({parts, r, d}, acc_opts);
  at::Tensor d_up_t = at::zeros({parts, r, d}, acc_opts);
  at::Tensor d_w = at::zeros({parts, has_norm ? d : 0}, acc_opts);
  if (M > 0) {
    const LowRankWeights lw(down, up, acc);
    const at::Tensor w_f = has_norm ? norm_weight->to(acc).contiguous() : at::Tensor();
    COMET_DISPATCH_FLOATING(x.scalar_type(), "rla_backward_cpu", [&] {
      rla_backward_kernel<scalar_t>(grad_y, x, lw, w_f, eps, parts, dx, d_down, d_up_t, d_w);
    });
  }
  const auto dt = x.scalar_type();
  return {dx, d_down.sum(0).to(dt), d_up_t.sum(0).t().contiguous().to(dt),
          has_norm ? d_w.sum(0).to(dt) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CPU, m) {
  m.impl("rla", &rla_cpu);
  m.impl("rla_backward", &rla_backward_cpu);
}

}  // namespace comet::cpu
