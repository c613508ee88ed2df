// Argument checks shared by the CPU and CUDA implementations of each op.
// Values inside length tensors are checked by the CPU kernels (the host can
// read them for free); CUDA kernels clamp them instead of syncing.
#pragma once

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <utility>
#include <vector>

#include "common.h"

namespace comet {

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, double scale,
                                 const c10::optional<at::Tensor>& q_lens,
                                 const c10::optional<at::Tensor>& k_lens) {
  check_defined(q, op, "q");
  check_defined(k, op, "k");
  check_defined(v, op, "v");
  check_dim(q, 4, op, "q", "(batch, queries, q_heads, head_dim)");
  check_dim(k, 4, op, "k", "(batch, keys, kv_heads, head_dim)");
  check_dim(v, 4, op, "v", "(batch, keys, kv_heads, head_dim)");
  check_float(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  COMET_CHECK(k.sizes() == v.sizes(), op, "'k' and 'v' must have the same shape, got ",
              shape_str(k), " and ", shape_str(v));
  check_size(k, 0, q.size(0), op, "k", "batch");
  check_size(k, 3, q.size(3), op, "k", "head_dim (as q)");
  COMET_CHECK(q.size(3) > 0, op, "head_dim must be positive, got q of shape ", shape_str(q));
  COMET_CHECK(q.size(2) > 0 && k.size(2) > 0, op,
              "q_heads and kv_heads must be positive, got q ", shape_str(q), " and k ",
              shape_str(k));
  COMET_CHECK(q.size(2) % k.size(2) == 0, op, "q_heads (", q.size(2),
              ") must be a multiple of kv_heads (", k.size(2), ") for grouped-query attention");
  check_last_contiguous(q, op, "q");
  check_last_contiguous(k, op, "k");
  check_last_contiguous(v, op, "v");
  COMET_CHECK(std::isfinite(scale), op, "'scale' must be finite, got ", scale);
  if (q_lens.has_value()) check_lengths(*q_lens, q.size(0), q, op, "q_lens");
  if (k_lens.has_value()) check_lengths(*k_lens, q.size(0), q, op, "k_lens");
}

inline void check_attention_backward_args(const char* op, const at::Tensor& grad_out,
                                          const at::Tensor& grad_lse, const at::Tensor& q,
                                          const at::Tensor& out, const at::Tensor& lse) {
  check_defined(grad_out, op, "grad_out");
  check_defined(grad_lse, op, "grad_lse");
  check_defined(out, op, "out");
  check_defined(lse, op, "lse");
  COMET_CHECK(out.sizes() == q.sizes(), op, "'out' must have the shape of q ", shape_str(q),
              ", got ", shape_str(out));
  COMET_CHECK(grad_out.sizes() == q.sizes(), op, "'grad_out' must have the shape of q ",
              shape_str(q), ", got ", shape_str(grad_out));
  const std::vector<int64_t> lse_shape = {q.size(0), q.size(2), q.size(1)};
  COMET_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), op,
              "'lse' must have shape (batch, q_heads, queries) = (", q.size(0), ", ", q.size(2),
              ", ", q.size(1), "), got ", shape_str(lse));
  COMET_CHECK(grad_lse.sizes() == lse.sizes(), op, "'grad_lse' must have the shape of lse ",
              shape_str(lse), ", got ", shape_str(grad_lse));
  check_same_dtype(grad_out, q, op, "grad_out", "q");
  check_same_dtype(out, q, op, "out", "q");
  const auto acc = acc_dtype(q.scalar_type());
  COMET_CHECK(lse.scalar_type() == acc && grad_lse.scalar_type() == acc, op,
              "'lse' and 'grad_lse' must be ", acc, ", got ", lse.scalar_type(), " and ",
              grad_lse.scalar_type());
  for (const auto* t : {&grad_out, &grad_lse, &out, &lse}) check_same_device(*t, q, op, "gradient/saved tensor", "q");
  check_last_contiguous(grad_out, op, "grad_out");
  check_last_contiguous(out, op, "out");
}

// x (M,d) against an RLA's down (r,d) and up (d,r) weights and optional norm weight (d,).
inline void check_rla_weights(const char* op, const at::Tensor& x, const char* x_name,
                              const at::Tensor& down, const at::Tensor& up,
                              const at::Tensor* norm_weight) {
  const int64_t d = x.size(-1);
  check_defined(down, op, "down");
  check_defined(up, op, "up");
  check_dim(down, 2, op, "down", "(rank, hidden) like nn.Linear(hidden, rank).weight");
  check_dim(up, 2, op, "up", "(hidden, rank) like nn.Linear(rank, hidden).weight");
  COMET_CHECK(down.size(1) == d, op, "'down' must have shape (rank, ", d, ") for hidden size ", d,
              " of '", x_name, "', got ", shape_str(down));
  COMET_CHECK(down.size(0) > 0, op, "'down' must have a positive rank, got ", shape_str(down));
  COMET_CHECK(up.size(0) == d && up.size(1) == down.size(0), op, "'up' must have shape (", d, ", ",
              down.size(0), "), got ", shape_str(up));
  check_same_dtype(down, x, op, "down", x_name);
  check_same_dtype(up, x, op, "up", x_name);
  check_same_device(down, x, op, "down", x_name);
  check_same_device(up, x, op, "up", x_name);
  if (norm_weight != nullptr) {
    COMET_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == d, op,
                "'norm_weight' must have shape (", d, ",), got ", shape_str(*norm_weight));
    check_same_dtype(*norm_weight, x, op, "norm_weight", x_name);
    check_same_device(*norm_weight, x, op, "norm_weight", x_name);
  }
}

inline void check_rla_args(const char* op, const at::Tensor& x, const at::Tensor& down,
                           const at::Tensor& up, const c10::optional<at::Tensor>& norm_weight,
                           double eps) {
  check_defined(x, op, "x");
  check_dim(x, 2, op, "x", "(rows, hidden)");
  check_float(x, op, "x");
  COMET_CHECK(x.size(1) > 0, op, "'x' must have a positive hidden size, got ", shape_str(x));
  check_last_contiguous(x, op, "x");
  check_rla_weights(op, x, "x", down, up, norm_weight.has_value() ? &*norm_weight : nullptr);
  COMET_CHECK(std::isfinite(eps) && eps >= 0, op, "'eps' must be finite and >= 0, got ", eps);
}

// grad_y of rla_backward: x's shape, dtype and device, unit last stride.
inline void check_rla_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                    const at::Tensor& down, const at::Tensor& up,
                                    const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_rla_args(op, x, down, up, norm_weight, eps);
  COMET_CHECK(grad_y.sizes() == x.sizes(), op, "'grad_y' must have the shape of x ", shape_str(x),
              ", got ", shape_str(grad_y));
  check_same_dtype(grad_y, x, op, "grad_y", "x");
  check_same_device(grad_y, x, op, "grad_y", "x");
  check_last_contiguous(grad_y, op, "grad_y");
}

inline void check_gated_update_args(const char* op, const at::Tensor& readout,
                                    const c10::optional<at::Tensor>& state,
                                    const at::Tensor& norm_weight, const at::Tensor& gate_weight,
                                    const at::Tensor& down, const at::Tensor& up, double eps,
                                    double gate_snap) {
  check_defined(readout, op, "readout");
  check_dim(readout, 3, op, "readout", "(batch, slots, hidden)");
  check_float(readout, op, "readout");
  const int64_t d = readout.size(2);
  COMET_CHECK(d > 0, op, "'readout' must have a positive hidden size, got ", shape_str(readout));
  check_last_contiguous(readout, op, "readout");
  if (state.has_value()) {
    COMET_CHECK(state->sizes() == readout.sizes(), op, "'state' must have the shape of readout ",
                shape_str(readout), ", got ", shape_str(*state));
    check_same_dtype(*state, readout, op, "state", "readout");
    check_same_device(*state, readout, op, "state", "readout");
    check_last_contiguous(*state, op, "state");
  }
  check_defined(norm_weight, op, "norm_weight");
  check_rla_weights(op, readout, "readout", down, up, &norm_weight);
  check_defined(gate_weight, op, "gate_weight");
  COMET_CHECK(gate_weight.dim() == 2 && gate_weight.size(0) == 1 && gate_weight.size(1) == 2 * d,
              op, "'gate_weight' must have shape (1, ", 2 * d,
              ") like nn.Linear(2*hidden, 1).weight, got ", shape_str(gate_weight));
  check_same_dtype(gate_weight, readout, op, "gate_weight", "readout");
  check_same_device(gate_weight, readout, op, "gate_weight", "readout");
  COMET_CHECK(std::isfinite(eps) && eps >= 0, op, "'eps' must be finite and >= 0, got ", eps);
  COMET_CHECK(gate_snap > 0 && gate_snap <= 1, op,
              "'gate_snap' must be in (0, 1] (1 = gates are never snapped), got ", gate_snap);
}

inline void check_gated_update_backward_args(
    const char* op, const at::Tensor& grad_new_state, const at::Tensor& grad_memory,
    const at::Tensor& readout, const c10::optional<at::Tensor>& state, const at::Tensor& norm_weight,
    const at::Tensor& gate_weight, const at::Tensor& down, const at::Tensor& up, double eps,
    double gate_snap) {
  check_gated_update_args(op, readout, state, norm_weight, gate_weight, down, up, eps, gate_snap);
  for (const auto& [g, name] : {std::pair{&grad_new_state, "grad_new_state"},
                                std::pair{&grad_memory, "grad_memory"}}) {
    COMET_CHECK(g->sizes() == readout.sizes(), op, "'", name, "' must have the shape of readout ",
                shape_str(readout), ", got ", shape_str(*g));
    check_same_dtype(*g, readout, op, name, "readout");
    check_same_device(*g, readout, op, name, "readout");
    check_last_contiguous(*g, op, name);
  }
}

inline void check_fifo_state(const char* op, const at::Tensor& buffer, const at::Tensor& head,
                             const at::Tensor& length) {
  check_defined(buffer, op, "buffer");
  COMET_CHECK(buffer.dim() >= 2, op,
              "'buffer' must be (batch, capacity, *features), got shape ", shape_str(buffer));
  for (const auto& [t, name] : {std::pair{&head, "head"}, std::pair{&length, "length"}}) {
    check_defined(*t, op, name);
    COMET_CHECK(t->scalar_type() == at::kLong, op, "'", name, "' must be int64, got ",
                t->scalar_type());
    COMET_CHECK(t->dim() == 1 && t->size(0) == buffer.size(0), op, "'", name,
                "' must have shape (", buffer.size(0), ",) (one per sample), got ",
                shape_str(*t));
    check_same_device(*t, buffer, op, name, "buffer");
  }
}


// Elements in one row: the product of the feature dims (B, C, *F) -> prod(F).
inline int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 2; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

// (B, S, *F) tensors whose rows are copied as flat blocks: F must be dense.
inline void check_dense_rows(const char* op, const at::Tensor& t, const char* name) {
  bool dense = true;
  for (int64_t i = t.dim() - 1, expect = 1; i >= 2; expect *= t.size(i), --i)
    dense = dense && (t.size(i) == 1 || t.stride(i) == expect);
  COMET_CHECK(dense, op, "'", name,
              "' must be contiguous in its feature dimensions (after batch and row), got strides ",
              t.strides());
  check_last_contiguous(t, op, name);
}

// The in-place push writes buffer, head and length (head / length element by element): none of
// them may share memory with itself (an expanded tensor) or with another argument (rows taken
// from the buffer itself, head and length one tensor), which would write what is still to be read.
inline void check_inplace_push(const char* op, const at::Tensor& buffer, const at::Tensor& head,
                               const at::Tensor& length, const at::Tensor& rows, const at::Tensor& counts) {
  COMET_CHECK(head.is_contiguous() && length.is_contiguous(), op,
              "'head' and 'length' must be contiguous (they are updated in place)");
  const std::pair<const at::Tensor*, const char*> args[] = {
      {&buffer, "buffer"}, {&head, "head"}, {&length, "length"}, {&rows, "rows"}, {&counts, "counts"}};
  for (int w = 0; w < 3; ++w) {  // the written ones
    const auto& [t, name] = args[w];
    COMET_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, "'", name,
                "' has elements that share memory (an expanded tensor?); it is written in place");
    for (int a = w + 1; a < 5; ++a) {
      const auto status = at::get_overlap_status(*t, *args[a].first);
      COMET_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, "'",
                  name, "' and '", args[a].second, "' share memory; '", name,
                  "' is written in place (pass a copy: .clone())");
    }
  }
}

inline void check_push_args(const char* op, const at::Tensor& buffer, const at::Tensor& head,
                            const at::Tensor& length, const at::Tensor& rows,
                            const at::Tensor& counts) {
  check_fifo_state(op, buffer, head, length);
  check_defined(rows, op, "rows");
  COMET_CHECK(rows.dim() == buffer.dim() && rows.size(0) == buffer.size(0) &&
                  rows.sizes().slice(2) == buffer.sizes().slice(2),
              op, "'rows' must have shape (", buffer.size(0), ", n, ",
              c10::IntArrayRef(buffer.sizes().slice(2)), ") to match buffer ", shape_str(buffer),
              ", got ", shape_str(rows));
  check_same_dtype(rows, buffer, op, "rows", "buffer");
  check_same_device(rows, buffer, op, "rows", "buffer");
  check_lengths(counts, buffer.size(0), buffer, op, "counts");
}

// cos / sin: (>= C, D) tables; returns them as contiguous (C, D) tensors in the data's
// accumulation type (float64 for float64 data, else float32), or undefined tensors when RoPE is off.
inline std::pair<at::Tensor, at::Tensor> check_rope_tables(const char* op,
                                                           const at::Tensor& buffer,
                                                           const c10::optional<at::Tensor>& cos,
                                                           const c10::optional<at::Tensor>& sin) {
  COMET_CHECK(cos.has_value() == sin.has_value(), op,
              "'cos' and 'sin' must be given together (RoPE) or both omitted");
  if (!cos.has_value()) return {};
  COMET_CHECK(buffer.dim() == 4, op,
              "with RoPE 'buffer' must be (batch, capacity, heads, head_dim), got shape ",
              shape_str(buffer));
  const int64_t C = buffer.size(1), D = buffer.size(3);
  COMET_CHECK(D % 2 == 0, op, "RoPE needs an even head_dim, got ", D);
  for (const auto& [t, name] : {std::pair{&*cos, "cos"}, std::pair{&*sin, "sin"}}) {
    COMET_CHECK(t->dim() == 2 && t->size(0) >= C && t->size(1) == D, op, "'", name,
                "' must have shape (>= ", C, ", ", D, ") (a row per FIFO slot), got ",
                shape_str(*t));
    check_float(*t, op, name);
    check_same_device(*t, buffer, op, name, "buffer");
  }
  // Tables are read in the data's accumulation type (float32 for every dtype but
  // float64, as HF rotary embeddings compute them), so float64 keeps its precision.
  const auto acc = buffer.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {cos->narrow(0, 0, C).to(acc).contiguous(), sin->narrow(0, 0, C).to(acc).contiguous()};
}

// fifo_view / fifo_view_backward: the ring state and the optional RoPE tables.
inline std::pair<at::Tensor, at::Tensor> check_view_args(const char* op, const at::Tensor& input,
                                                         const char* name, const at::Tensor& head,
                                                         const at::Tensor& length,
                                                         const c10::optional<at::Tensor>& cos,
                                                         const c10::optional<at::Tensor>& sin) {
  check_fifo_state(op, input, head, length);
  check_float(input, op, name);
  return check_rope_tables(op, input, cos, sin);
}

}  // namespace comet
