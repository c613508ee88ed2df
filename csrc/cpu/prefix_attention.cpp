// CPU prefix_attention: flash-style tiling with online softmax (forward) and
// recomputation from the log-sum-exp (backward). The forward's extra memory is
// a few (tile x tile) and (tile x head_dim) tiles per thread; the backward also
// re-lays-out its operands once per call (O((N + K) * H * D), the size of the
// inputs). The score matrix is never formed.
//
// Mask, per sample b (ql = q_lens[b], kl = k_lens[b], off = kl - ql):
// query i < ql sees key j < kl iff j <= off + i. Queries past ql, and queries
// that see no key, give out = 0 and lse = -inf.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace comet::cpu {
namespace {

constexpr int64_t kBlockQ = 64;   // query rows per tile
constexpr int64_t kBlockK = 128;  // key rows per tile
// Query rows per task from which laying out K^T once beats reading K rows (decode).
constexpr int64_t kMinRowsForKt = 32;

// Strided view of one (batch, head) slice of a (B, S, H, D) tensor.
template <typename T>
struct HeadView {
  T* base;
  int64_t row_stride;
  T* row(int64_t i) const { return base + i * row_stride; }
};

template <typename T>
HeadView<T> head_view(const at::Tensor& t, int64_t b, int64_t h) {
  using U = std::remove_const_t<T>;
  return {t.data_ptr<U>() + b * t.stride(0) + h * t.stride(2), t.stride(1)};
}

// Keys visible to query i (i < ql): [0, visible_end(i)).
inline int64_t visible_end(int64_t i, int64_t off, int64_t kl) {
  return std::clamp<int64_t>(off + i + 1, 0, kl);
}

// Key / value rows of one tile in the accumulation type: a pointer into the
// input when it already is (fp32 / fp64), else converted into `scratch`.
template <typename scalar_t, typename acc_t>
inline const acc_t* tile_rows(const HeadView<const scalar_t>& src, int64_t j0, int64_t n, int64_t D,
                              acc_t* scratch, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld = src.row_stride;
    return src.row(j0);
  } else {
    for (int64_t j = 0; j < n; ++j) load_row(src.row(j0 + j), D, scratch + j * D);
    ld = D;
    return scratch;
  }
}

// Forward. One task = (batch, kv head, query tile): the query rows of all `group`
// q heads that share the kv head are stacked into one (rows = group * m, D) tile,
// so each key tile is read once for the whole group and the GEMMs are taller.
// Per key tile: S = Q K^T, online softmax per row, O += P V.
// Prefill (many rows per tile) reads K^T from `kt`, (B, Hkv, D, K) in the
// accumulation type, laid out once per call: O(K * D), the size of k itself,
// and 1 / rows of the work. Decode (few rows; `kt` undefined) computes
// S^T = K Q^T straight from the key rows and transposes the small S^T tile.
template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& kt, at::Tensor& out, at::Tensor& lse, double scale_d,
                    const std::vector<int64_t>& qls, const std::vector<int64_t>& kls) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(2), group = Hq / Hkv;
  const int64_t n_qblocks = (N + kBlockQ - 1) / kBlockQ;
  const int64_t rows_max = group * kBlockQ;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * Hkv * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(rows_max * D), qt_tile(D * rows_max), k_tile(kBlockK * D);
    std::vector<acc_t> v_tile(kBlockK * D), st_tile(kBlockK * rows_max), s_tile(rows_max * kBlockK);
    std::vector<acc_t> o_tile(rows_max * D);
    std::vector<acc_t> row_max(rows_max), row_sum(rows_max);
    std::vector<int64_t> row_vis(rows_max);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qblocks, hk = (item / n_qblocks) % Hkv;
      const int64_t b = item / (n_qblocks * Hkv);
      const int64_t ql = qls[b], kl = kls[b], off = kl - ql;
      const int64_t i0 = qb * kBlockQ, i_end = std::min(i0 + kBlockQ, N);
      const int64_t m = std::clamp<int64_t>(ql, i0, i_end) - i0;  // valid rows [i0, i0 + m)
      const int64_t rows = group * m;                              // row r: head r / m, query i0 + r % m
      const int64_t key_end = m > 0 ? visible_end(i0 + m - 1, off, kl) : 0;
      const auto K = head_view<const scalar_t>(k, b, hk);
      const auto V = head_view<const scalar_t>(v, b, hk);

      for (int64_t r = 0; r < rows; ++r) {  // Q tile (rows, D), pre-scaled
        load_row(head_view<const scalar_t>(q, b, hk * group + r / m).row(i0 + r % m), D,
                 &q_tile[r * D], scale);
        row_vis[r] = visible_end(i0 + r % m, off, kl);
      }
      if (!kt.defined()) transpose(q_tile.data(), rows, D, qt_tile.data());
      const acc_t* KT = kt.defined() ? kt.data_ptr<acc_t>() + (b * Hkv + hk) * D * kt.size(3) : nullptr;
      std::fill(o_tile.begin(), o_tile.begin() + rows * D, acc_t(0));
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));

      for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
        const int64_t n = std::min(kBlockK, key_end - j0);
        if (KT != nullptr) {
          block_gemm(rows, n, D, q_tile.data(), D, KT + j0, kt.size(3), s_tile.data(), n, false);
        } else {
          int64_t ldk;
          const acc_t* Kr = tile_rows(K, j0, n, D, k_tile.data(), ldk);
          block_gemm(n, rows, D, Kr, ldk, qt_tile.data(), rows, st_tile.data(), rows, false);
          transpose(st_tile.data(), n, rows, s_tile.data());
        }
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = &s_tile[r * n];
          const int64_t vis = std::clamp<int64_t>(row_vis[r] - j0, 0, n);
          const acc_t mx = row_max_nan(s, vis, row_max[r]);
          if (vis == 0 || mx == neg_inf) {  // nothing visible in this tile for this row
            std::fill(s, s + n, acc_t(0));
            continue;
          }
          const acc_t alpha = exp_scalar(row_max[r] - mx);
          row_sum[r] = row_sum[r] * alpha + exp_row(s, vis, mx);
          std::fill(s + vis, s + n, acc_t(0));
          row_max[r] = mx;
          if (alpha != acc_t(1)) scale_row(&o_tile[r * D], D, alpha);
        }
        int64_t ldv;
        const acc_t* Vt = tile_rows(V, j0, n, D, v_tile.data(), ldv);
        block_gemm(rows, D, n, s_tile.data(), n, Vt, ldv, o_tile.data(), D, true);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = hk * group + r / m, i = i0 + r % m;
        // l = 0: no visible key, or only -inf scores (a -inf in q, an overflowing q.k), which the
        // oracle's softmax makes NaN: a row that sees keys is then NaN, not passed off as padding.
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        const acc_t l = row_sum[r] == 0 && row_vis[r] > 0 ? nan : row_sum[r];
        const acc_t inv = l > 0 ? acc_t(1) / l : (l != l ? l : acc_t(0));  // NaN stays NaN
        scale_row(&o_tile[r * D], D, inv);
        store_row(&o_tile[r * D], D, head_view<scalar_t>(out, b, h).row(i));
        lse.data_ptr<acc_t>()[(b * Hq + h) * N + i] =
            l > 0 ? row_max[r] + std::log(l) : (l != l ? l : neg_inf);
      }
      for (int64_t g = 0; g < group; ++g) {  // padded query rows
        const int64_t h = hk * group + g;
        for (int64_t i = i0 + m; i < i_end; ++i) {
          scalar_t* o = head_view<scalar_t>(out, b, h).row(i);
          std::fill(o, o + D, scalar_t(0));
          lse.data_ptr<acc_t>()[(b * Hq + h) * N + i] = neg_inf;
        }
      }
    }
  });
}

// Backward. One task = (batch, q head); key tiles outer, query tiles inner.
// Everything is computed transposed (keys as rows), so every product is a plain
// row-major GEMM on pre-laid-out operands and no tile is ever transposed:
//   S^T = K Qs^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta), dK += dS^T Qs, dQ^T += K^T dS^T (times scale at the end).
// Qs = scale * Q. dK / dV accumulate into a per-q-head slab (B, K, Hq, D) that is
// summed over the GQA group afterwards; dQ^T into (B, Hq, D, N), owned by the task.
struct BackwardOperands {
  at::Tensor kf, kt, vf;    // (B, K, Hkv, D), (B, Hkv, D, K), (B, K, Hkv, D)
  at::Tensor qs, qst;       // (B, N, Hq, D), (B, Hq, D, N)
  at::Tensor dof, dot;      // (B, N, Hq, D), (B, Hq, D, N)
  at::Tensor dk, dv, dqt;   // (B, K, Hq, D), (B, K, Hq, D), (B, Hq, D, N)
};

template <typename acc_t>
void backward_kernel(BackwardOperands& t, const at::Tensor& delta, const at::Tensor& lse,
                     const std::vector<int64_t>& qls, const std::vector<int64_t>& kls) {
  const int64_t B = t.qs.size(0), N = t.qs.size(1), Hq = t.qs.size(2), D = t.qs.size(3);
  const int64_t K = t.kf.size(1), Hkv = t.kf.size(2), group = Hq / Hkv;
  const int64_t ld_k = Hkv * D, ld_q = Hq * D;

  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pt(kBlockK * kBlockQ), dst(kBlockK * kBlockQ);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % Hq, b = item / Hq, hk = h / group;
      const int64_t ql = qls[b], kl = kls[b], off = kl - ql;
      if (ql == 0) continue;
      const acc_t* Kr = t.kf.data_ptr<acc_t>() + (b * K * Hkv + hk) * D;
      const acc_t* KT = t.kt.data_ptr<acc_t>() + (b * Hkv + hk) * D * K;
      const acc_t* Vr = t.vf.data_ptr<acc_t>() + (b * K * Hkv + hk) * D;
      const acc_t* Qs = t.qs.data_ptr<acc_t>() + (b * N * Hq + h) * D;
      const acc_t* QsT = t.qst.data_ptr<acc_t>() + (b * Hq + h) * D * N;
      const acc_t* dO = t.dof.data_ptr<acc_t>() + (b * N * Hq + h) * D;
      const acc_t* dOT = t.dot.data_ptr<acc_t>() + (b * Hq + h) * D * N;
      acc_t* dK = t.dk.data_ptr<acc_t>() + (b * K * Hq + h) * D;
      acc_t* dV = t.dv.data_ptr<acc_t>() + (b * K * Hq + h) * D;
      acc_t* dQT = t.dqt.data_ptr<acc_t>() + (b * Hq + h) * D * N;
      const acc_t* L = lse.data_ptr<acc_t>() + (b * Hq + h) * N;
      const acc_t* dl = delta.data_ptr<acc_t>() + (b * Hq + h) * N;

      const int64_t key_end = visible_end(ql - 1, off, kl);
      for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
        const int64_t n = std::min(kBlockK, key_end - j0);
        const int64_t i_start = std::max<int64_t>(0, j0 - off);  // first query that sees key j0
        for (int64_t i0 = i_start; i0 < ql; i0 += kBlockQ) {
          const int64_t m = std::min(kBlockQ, ql - i0);
          block_gemm(n, m, D, Kr + j0 * ld_k, ld_k, QsT + i0, N, pt.data(), m, false);
          // Key j0 + j is visible to query i0 + c iff c >= j0 + j - off - i0.
          for (int64_t j = 0; j < n; ++j) {
            acc_t* p = &pt[j * m];
            const int64_t first = std::clamp<int64_t>(j0 + j - off - i0, 0, m);
            std::fill(p, p + first, acc_t(0));
            exp_row_minus(p + first, L + i0 + first, m - first);
          }
          block_gemm(n, D, m, pt.data(), m, dO + i0 * ld_q, ld_q, dV + j0 * ld_q, ld_q, true);
          block_gemm(n, m, D, Vr + j0 * ld_k, ld_k, dOT + i0, N, dst.data(), m, false);
          for (int64_t j = 0; j < n; ++j) softmax_grad_row(&pt[j * m], dl + i0, m, &dst[j * m]);
          block_gemm(n, D, m, dst.data(), m, Qs + i0 * ld_q, ld_q, dK + j0 * ld_q, ld_q, true);
          block_gemm(D, m, n, KT + j0, K, dst.data(), m, dQT + i0, N, true);
        }
      }
    }
  });
}

void check_length_values(const char* op, const std::vector<int64_t>& lens, int64_t size,
                         const char* name, const char* dim_name) {
  for (size_t b = 0; b < lens.size(); ++b)
    COMET_CHECK(lens[b] >= 0 && lens[b] <= size, op, "'", name, "'[", b, "] = ", lens[b],
                " is out of range: it must lie in [0, ", size, "] (the ", dim_name, ")");
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double scale,
                                                        const c10::optional<at::Tensor>& q_lens,
                                                        const c10::optional<at::Tensor>& k_lens) {
  const char* op = "prefix_attention";
  check_attention_args(op, q, k, v, scale, q_lens, k_lens);
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), K = k.size(1);
  const auto qls = read_lengths(q_lens, B, N);
  const auto kls = read_lengths(k_lens, B, K);
  check_length_values(op, qls, N, "q_lens", "number of query rows");
  check_length_values(op, kls, K, "k_lens", "number of key rows");
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({B, Hq, N}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const int64_t group = Hq / k.size(2);
  const at::Tensor kt = std::min<int64_t>(N, kBlockQ) * group >= kMinRowsForKt
                            ? k.permute({0, 2, 3, 1}).to(acc_dtype(q.scalar_type())).contiguous()
                            : at::Tensor();
  COMET_DISPATCH_FLOATING(q.scalar_type(), "prefix_attention_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, kt, out, lse, scale, qls, kls);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    double scale, const c10::optional<at::Tensor>& q_lens,
    const c10::optional<at::Tensor>& k_lens) {
  const char* op = "prefix_attention_backward";
  check_attention_args(op, q, k, v, scale, q_lens, k_lens);
  check_attention_backward_args(op, grad_out, grad_lse, q, out, lse);
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3), K = k.size(1);
  const int64_t Hkv = k.size(2), group = Hq / Hkv;
  const auto qls = read_lengths(q_lens, B, N);
  const auto kls = read_lengths(k_lens, B, K);
  check_length_values(op, qls, N, "q_lens", "number of query rows");
  check_length_values(op, kls, K, "k_lens", "number of key rows");
  const auto acc = acc_dtype(q.scalar_type());
  const auto dt = q.scalar_type();
  const auto acc_opts = q.options().dtype(acc);
  if (q.numel() == 0 || K == 0)
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  // delta_i = <dO_i, O_i> - dlse_i: the softmax-Jacobian term with the lse
  // gradient folded in (d lse_i / d s_ij = p_ij). Padded rows are never read.
  const at::Tensor dof = grad_out.to(acc).contiguous();
  const at::Tensor delta =
      ((dof * out.to(acc)).sum(-1).transpose(1, 2) - grad_lse.to(acc)).contiguous();
  BackwardOperands t;
  t.kf = k.to(acc).contiguous();
  t.kt = t.kf.permute({0, 2, 3, 1}).contiguous();
  t.vf = v.to(acc).contiguous();
  t.qs = (q.to(acc) * scale).contiguous();
  t.qst = t.qs.permute({0, 2, 3, 1}).contiguous();
  t.dof = dof;
  t.dot = dof.permute({0, 2, 3, 1}).contiguous();
  t.dk = at::zeros({B, K, Hq, D}, acc_opts);
  t.dv = at::zeros({B, K, Hq, D}, acc_opts);
  t.dqt = at::zeros({B, Hq, D, N}, acc_opts);
  const at::Tensor lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "prefix_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(t, delta, lse_c, qls, kls);
  });
  at::Tensor dq = (t.dqt.permute({0, 3, 1, 2}) * scale).to(dt).contiguous();  // dS = dS' scale
  at::Tensor dk = t.dk.view({B, K, Hkv, group, D}).sum(3).to(dt);
  at::Tensor dv = t.dv.view({B, K, Hkv, group, D}).sum(3).to(dt);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CPU, m) {
  m.impl("prefix_attention", &prefix_attention_cpu);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cpu);
}

}  // namespace comet::cpu
