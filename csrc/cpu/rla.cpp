// CPU rla: y = n + up(down(n)), n = RMSNorm(x) * w (or x). One pass per row,
// the row held in fp32 scratch; weight gradients reduce over per-slice partials.
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/row_ops.h"

namespace comet::cpu {
namespace {

constexpr int64_t kMinRows = 16;

at::Tensor rla_cpu(const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
                   const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_rla_args("rla", x, down, up, norm_weight, eps);
  const int64_t M = x.size(0), d = x.size(1), r = down.size(0);
  at::Tensor y = at::empty({M, d}, x.options());
  if (M == 0) return y;
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor down_f = down.to(acc).contiguous();
  const at::Tensor up_t = up.t().to(acc).contiguous();
  const at::Tensor w_f = norm_weight.has_value() ? norm_weight->to(acc).contiguous() : at::Tensor();
  COMET_DISPATCH_FLOATING(x.scalar_type(), "rla_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* dw = down_f.data_ptr<acc_t>();
    const acc_t* uw = up_t.data_ptr<acc_t>();
    const acc_t* w = w_f.defined() ? w_f.data_ptr<acc_t>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, M, kMinRows, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xr(d), n(d), h(r), yr(d);
      for (int64_t i = begin; i < end; ++i) {
        load_row(xp + i * xs, d, xr.data());
        if (w) rms_forward(xr.data(), w, d, static_cast<acc_t>(eps), n.data());
        lowrank_project(w ? n.data() : xr.data(), dw, r, d, h.data());
        lowrank_expand(w ? n.data() : xr.data(), uw, h.data(), r, d, yr.data());
        store_row(yr.data(), d, yp + i * d);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
    const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_rla_args("rla_backward", x, down, up, norm_weight, eps);
  COMET_CHECK(grad_y.sizes() == x.sizes(), "rla_backward", "'grad_y' must have the shape of x ",
              shape_str(x), ", got ", shape_str(grad_y));
  check_same_dtype(grad_y, x, "rla_backward", "grad_y", "x");
  check_same_device(grad_y, x, "rla_backward", "grad_y", "x");
  check_last_contiguous(grad_y, "rla_backward", "grad_y");
  const int64_t M = x.size(0), d = x.size(1), r = down.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  const bool has_norm = norm_weight.has_value();
  const int64_t parts = num_parts(M, kMinRows);
  at::Tensor dx = at::empty({M, d}, x.options());
  at::Tensor d_down = at::zeros({parts, r, d}, x.options().dtype(acc));
  at::Tensor d_up_t = at::zeros({parts, r, d}, x.options().dtype(acc));
  at::Tensor d_w = at::zeros({parts, has_norm ? d : 0}, x.options().dtype(acc));
  const at::Tensor down_f = down.to(acc).contiguous();
  const at::Tensor up_t = up.t().to(acc).contiguous();
  const at::Tensor w_f = has_norm ? norm_weight->to(acc).contiguous() : at::Tensor();
  if (M > 0) {
    COMET_DISPATCH_FLOATING(x.scalar_type(), "rla_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* dwn = down_f.data_ptr<acc_t>();
      const acc_t* uw = up_t.data_ptr<acc_t>();
      const acc_t* w = has_norm ? w_f.data_ptr<acc_t>() : nullptr;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = grad_y.data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      const int64_t xs = x.stride(0), gs = grad_y.stride(0);
      for_each_part(M, parts, [&](int64_t p, int64_t begin, int64_t end) {
        std::vector<acc_t> xr(d), n(d), h(r), dh(r), dy(d), dn(d), dxr(d);
        acc_t* pd_down = d_down.data_ptr<acc_t>() + p * r * d;
        acc_t* pd_up = d_up_t.data_ptr<acc_t>() + p * r * d;
        acc_t* pd_w = has_norm ? d_w.data_ptr<acc_t>() + p * d : nullptr;
        for (int64_t i = begin; i < end; ++i) {
          load_row(xp + i * xs, d, xr.data());
          load_row(gp + i * gs, d, dy.data());
          acc_t rstd = 0;
          if (w) rstd = rms_forward(xr.data(), w, d, static_cast<acc_t>(eps), n.data());
          const acc_t* nn = w ? n.data() : xr.data();
          lowrank_project(nn, dwn, r, d, h.data());
          lowrank_backward(dy.data(), nn, h.data(), dwn, uw, r, d, dh.data(), dn.data(), pd_down,
                           pd_up);
          if (w) {
            rms_backward(xr.data(), w, rstd, dn.data(), d, dxr.data(), pd_w);
            store_row(dxr.data(), d, dxp + i * d);
          } else {
            store_row(dn.data(), d, dxp + i * d);
          }
        }
      });
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
