// CPU ring-buffer FIFO. Sample b holds length[b] rows, the oldest at slot
// head[b]; slot of the i-th oldest row = (head[b] + i) % capacity.
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace comet::cpu {
namespace {

// head[b] in [0, C) (0 when C == 0) and length[b] in [0, C].
void check_state_values(const char* op, const std::vector<int64_t>& hd,
                        const std::vector<int64_t>& len, int64_t C) {
  for (size_t b = 0; b < hd.size(); ++b) {
    COMET_CHECK(len[b] >= 0 && len[b] <= C, op, "'length'[", b, "] = ", len[b],
                " must lie in [0, ", C, "] (the capacity)");
    COMET_CHECK(hd[b] >= 0 && (hd[b] < C || (C == 0 && hd[b] == 0)), op, "'head'[", b, "] = ",
                hd[b], " must lie in [0, ", C, ") (the capacity)");
  }
}

// Checks the per-sample state values and the rows to push; returns counts on the host.
std::vector<int64_t> check_push(const char* op, const at::Tensor& buffer, const at::Tensor& head,
                                const at::Tensor& length, const at::Tensor& rows,
                                const at::Tensor& counts) {
  check_push_args(op, buffer, head, length, rows, counts);
  const int64_t B = buffer.size(0), C = buffer.size(1);
  const auto cnt = read_lengths(counts, B, 0);
  const auto hd = read_lengths(head, B, 0);
  const auto len = read_lengths(length, B, 0);
  for (int64_t b = 0; b < B; ++b) {
    COMET_CHECK(cnt[b] >= 0 && cnt[b] <= rows.size(1), op, "'counts'[", b, "] = ", cnt[b],
                " must lie in [0, ", rows.size(1), "] (the rows given per sample)");
  }
  check_state_values(op, hd, len, C);
  return cnt;
}

// Row i of sample b in a (B, S, *F) tensor whose trailing dims are contiguous.
inline char* row_ptr(const at::Tensor& t, int64_t b, int64_t i) {
  return static_cast<char*>(t.data_ptr()) + (b * t.stride(0) + i * t.stride(1)) * t.element_size();
}

// Writes rows[b, max(0, n-C):n] after the newest row; only those slots are touched.
void push_inplace(at::Tensor& buffer, at::Tensor& head, at::Tensor& length, const at::Tensor& rows,
                  const std::vector<int64_t>& cnt) {
  const int64_t B = buffer.size(0), C = buffer.size(1);
  if (C == 0 || B == 0) return;
  const int64_t row_bytes = row_numel(buffer) * buffer.element_size();
  int64_t* hd = head.data_ptr<int64_t>();
  int64_t* len = length.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cnt[b];
    for (int64_t i = std::max<int64_t>(0, n - C); i < n; ++i)
      std::memcpy(row_ptr(buffer, b, (hd[b] + len[b] + i) % C), row_ptr(rows, b, i), row_bytes);
    const int64_t new_len = std::min(len[b] + n, C);
    hd[b] = (hd[b] + len[b] + n - new_len) % C;
    len[b] = new_len;
  }
}

void fifo_push_cpu(at::Tensor& buffer, at::Tensor& head, at::Tensor& length, const at::Tensor& rows,
                   const at::Tensor& counts) {
  const char* op = "fifo_push";
  const auto cnt = check_push(op, buffer, head, length, rows, counts);
  check_dense_rows(op, buffer, "buffer");
  check_dense_rows(op, rows, "rows");
  check_inplace_push(op, buffer, head, length, rows, counts);
  push_inplace(buffer, head, length, rows, cnt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fifo_push_functional_cpu(
    const at::Tensor& buffer, const at::Tensor& head, const at::Tensor& length,
    const at::Tensor& rows, const at::Tensor& counts) {
  const char* op = "fifo_push_functional";
  const auto cnt = check_push(op, buffer, head, length, rows, counts);
  check_dense_rows(op, rows, "rows");
  at::Tensor buf = buffer.clone(at::MemoryFormat::Contiguous);
  at::Tensor hd = head.clone(at::MemoryFormat::Contiguous);
  at::Tensor len = length.clone(at::MemoryFormat::Contiguous);
  push_inplace(buf, hd, len, rows, cnt);
  return {buf, hd, len};
}

std::tuple<at::Tensor, at::Tensor> fifo_push_backward_cpu(const at::Tensor& grad_buffer_out,
                                                          const at::Tensor& head,
                                                          const at::Tensor& length,
                                                          const at::Tensor& counts,
                                                          int64_t num_rows) {
  const char* op = "fifo_push_backward";
  check_fifo_state(op, grad_buffer_out, head, length);
  check_lengths(counts, grad_buffer_out.size(0), grad_buffer_out, op, "counts");
  COMET_CHECK(num_rows >= 0, op, "'num_rows' must be >= 0, got ", num_rows);
  const int64_t B = grad_buffer_out.size(0), C = grad_buffer_out.size(1);
  const auto cnt = read_lengths(counts, B, 0);
  const auto hd = read_lengths(head, B, 0);
  const auto len = read_lengths(length, B, 0);
  check_state_values(op, hd, len, C);
  at::Tensor grad_buffer = grad_buffer_out.clone(at::MemoryFormat::Contiguous);
  std::vector<int64_t> rows_shape = grad_buffer_out.sizes().vec();
  rows_shape[1] = num_rows;
  at::Tensor grad_rows = at::zeros(rows_shape, grad_buffer_out.options());
  if (C == 0) return {grad_buffer, grad_rows};
  for (int64_t b = 0; b < B; ++b) {
    COMET_CHECK(cnt[b] >= 0 && cnt[b] <= num_rows, op, "'counts'[", b, "] = ", cnt[b],
                " must lie in [0, ", num_rows, "]");
    // A pushed row's gradient is what its slot received; the slot's old content
    // was overwritten, so the incoming buffer gets none there.
    for (int64_t i = std::max<int64_t>(0, cnt[b] - C); i < cnt[b]; ++i) {
      const int64_t slot = (hd[b] + len[b] + i) % C;
      grad_rows[b][i].copy_(grad_buffer[b][slot]);
      grad_buffer[b][slot].zero_();
    }
  }
  return {grad_buffer, grad_rows};
}

// Rotate-half RoPE (as HF's apply_rotary_pos_emb) of one (H, D) row with one
// table row; Transposed applies its transpose (the backward), which for the
// usual tables (equal halves) is the rotation by the opposite angle.
template <bool Transposed, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void rope_row(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t H, int64_t D,
              const acc_t* __restrict__ cos, const acc_t* __restrict__ sin) {
  const int64_t half = D / 2;
  for (int64_t hh = 0; hh < H; ++hh) {
    const scalar_t* x = src + hh * D;
    scalar_t* y = dst + hh * D;
#pragma omp simd
    for (int64_t c = 0; c < half; ++c) {
      const acc_t x1 = static_cast<acc_t>(x[c]), x2 = static_cast<acc_t>(x[c + half]);
      const acc_t s1 = Transposed ? -sin[c + half] : sin[c];
      const acc_t s2 = Transposed ? -sin[c] : sin[c + half];
      y[c] = static_cast<scalar_t>(x1 * cos[c] - x2 * s1);
      y[c + half] = static_cast<scalar_t>(x2 * cos[c + half] + x1 * s2);
    }
  }
}

// The view (Backward = false): out[b, i] = RoPE(in[b, slot(b, i)]) for i < length[b],
// zeros after. Its transpose (Backward = true): out[b, slot(b, i)] = RoPE^T(in[b, i]),
// zeros in the slots no row came from.
template <bool Backward>
at::Tensor view_or_scatter(const char* op, const at::Tensor& input, const at::Tensor& head,
                           const at::Tensor& length, const c10::optional<at::Tensor>& cos,
                           const c10::optional<at::Tensor>& sin) {
  auto [cs, sn] = check_view_args(op, input, Backward ? "grad_view" : "buffer", head, length, cos, sin);
  const int64_t B = input.size(0), C = input.size(1);
  const auto hd = read_lengths(head, B, 0);
  const auto len = read_lengths(length, B, 0);
  check_state_values(op, hd, len, C);
  const at::Tensor in = input.contiguous();
  at::Tensor out = Backward ? at::zeros(input.sizes(), input.options())
                            : at::empty(input.sizes(), input.options());
  if (out.numel() == 0) return out;
  const int64_t row = row_numel(in);
  COMET_DISPATCH_FLOATING(in.scalar_type(), "fifo_view_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // the tables' dtype (check_rope_tables)
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / C, i = idx % C;
        const int64_t slot = b * C + (hd[b] + i) % C;
        if (i >= len[b]) {
          if (!Backward) std::fill_n(dst + idx * row, row, scalar_t(0));
          continue;
        }
        const scalar_t* s = src + (Backward ? idx : slot) * row;
        scalar_t* d = dst + (Backward ? slot : idx) * row;
        if (cs.defined())
          rope_row<Backward>(s, d, in.size(2), in.size(3), cs.data_ptr<acc_t>() + i * in.size(3),
                             sn.data_ptr<acc_t>() + i * in.size(3));
        else
          std::copy_n(s, row, d);
      }
    });
  });
  return out;
}

at::Tensor fifo_view_cpu(const at::Tensor& buffer, const at::Tensor& head, const at::Tensor& length,
                         const c10::optional<at::Tensor>& cos,
                         const c10::optional<at::Tensor>& sin) {
  return view_or_scatter<false>("fifo_view", buffer, head, length, cos, sin);
}

at::Tensor fifo_view_backward_cpu(const at::Tensor& grad_view, const at::Tensor& head,
                                  const at::Tensor& length, const c10::optional<at::Tensor>& cos,
                                  const c10::optional<at::Tensor>& sin) {
  return view_or_scatter<true>("fifo_view_backward", grad_view, head, length, cos, sin);
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CPU, m) {
  m.impl("fifo_push", &fifo_push_cpu);
  m.impl("fifo_push_functional", &fifo_push_functional_cpu);
  m.impl("fifo_push_backward", &fifo_push_backward_cpu);
  m.impl("fifo_view", &fifo_view_cpu);
  m.impl("fifo_view_backward", &fifo_view_backward_cpu);
}

}  // namespace comet::cpu
