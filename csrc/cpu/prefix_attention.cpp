// CPU prefix_attention: flash-style tiling with online softmax (forward) and
// recomputation from the log-sum-exp (backward). Extra memory per thread is a
// few (block x block) and (block x head_dim) tiles, never the full score matrix.
//
// Mask, per sample b (ql = q_lens[b], kl = k_lens[b], off = kl - ql):
// query i < ql sees key j < kl iff j <= off + i. Queries past ql, and queries
// that see no key, give out = 0 and lse = -inf.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace comet::cpu {
namespace {

constexpr int64_t kBlockQ = 64;   // query rows per tile
constexpr int64_t kBlockK = 128;  // key rows per tile

// Strided view of one (batch, head) slice of a (B, S, H, D) tensor.
template <typename T>
struct HeadView {
  T* base;
  int64_t row_stride;
  T* row(int64_t i) const { return base + i * row_stride; }
};

template <typename T>
HeadView<T> head_view(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.data_ptr<T>() + b * t.stride(0) + h * t.stride(2), t.stride(1)};
}

// Keys visible to query i (i < ql): [0, visible_end(i)).
inline int64_t visible_end(int64_t i, int64_t off, int64_t kl) {
  return std::clamp<int64_t>(off + i + 1, 0, kl);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, double scale_d, const std::vector<int64_t>& qls,
                    const std::vector<int64_t>& kls) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t group = Hq / k.size(2);
  const int64_t n_qblocks = (N + kBlockQ - 1) / kBlockQ;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * Hq * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(kBlockQ * D), kt_tile(D * kBlockK), v_tile(kBlockK * D);
    std::vector<acc_t> s_tile(kBlockQ * kBlockK), o_tile(kBlockQ * D);
    std::vector<acc_t> row_max(kBlockQ), row_sum(kBlockQ);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qblocks, h = (item / n_qblocks) % Hq, b = item / (n_qblocks * Hq);
      const int64_t hk = h / group, ql = qls[b], kl = kls[b], off = kl - ql;
      const auto Q = head_view<scalar_t>(q, b, h);
      const auto K = head_view<scalar_t>(k, b, hk);
      const auto V = head_view<scalar_t>(v, b, hk);
      const auto O = head_view<scalar_t>(out, b, h);
      acc_t* L = lse.data_ptr<acc_t>() + (b * Hq + h) * N;
      const int64_t i0 = qb * kBlockQ, i_end = std::min(i0 + kBlockQ, N);
      const int64_t i1 = std::clamp<int64_t>(ql, i0, i_end);  // valid rows [i0, i1)
      const int64_t m = i1 - i0;
      const int64_t key_end = m > 0 ? visible_end(i1 - 1, off, kl) : 0;

      for (int64_t r = 0; r < m; ++r) load_row(Q.row(i0 + r), D, &q_tile[r * D], scale);
      std::fill(o_tile.begin(), o_tile.begin() + m * D, acc_t(0));
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));

      for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
        const int64_t n = std::min(kBlockK, key_end - j0);
        for (int64_t j = 0; j < n; ++j) {  // K tile transposed: (D, n)
          const scalar_t* kr = K.row(j0 + j);
          for (int64_t c = 0; c < D; ++c) kt_tile[c * n + j] = static_cast<acc_t>(kr[c]);
        }
        block_gemm(m, n, D, q_tile.data(), D, kt_tile.data(), n, s_tile.data(), n, false);

        bool any = false;
        for (int64_t r = 0; r < m; ++r) {
          acc_t* s = &s_tile[r * n];
          const int64_t vis = std::clamp<int64_t>(visible_end(i0 + r, off, kl) - j0, 0, n);
          acc_t mx = row_max[r];
          for (int64_t j = 0; j < vis; ++j) mx = (s[j] > mx || s[j] != s[j]) ? s[j] : mx;
          if (vis == 0 || mx == neg_inf) {  // nothing visible in this tile for this row
            std::fill(s, s + n, acc_t(0));
            continue;
          }
          any = true;
          const acc_t alpha = exp_scalar(row_max[r] - mx);
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < vis; ++j) {
            s[j] = exp_scalar(s[j] - mx);
            sum += s[j];
          }
          std::fill(s + vis, s + n, acc_t(0));
          row_sum[r] = row_sum[r] * alpha + sum;
          row_max[r] = mx;
          if (alpha != acc_t(1)) {
            acc_t* o = &o_tile[r * D];
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) o[c] *= alpha;
          }
        }
        if (!any) continue;
        for (int64_t j = 0; j < n; ++j) load_row(V.row(j0 + j), D, &v_tile[j * D]);
        block_gemm(m, D, n, s_tile.data(), n, v_tile.data(), D, o_tile.data(), D, true);
      }

      for (int64_t r = 0; r < m; ++r) {
        const acc_t l = row_sum[r];
        const acc_t inv = l > 0 ? acc_t(1) / l : (l != l ? l : acc_t(0));  // NaN stays NaN
        acc_t* o = &o_tile[r * D];
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) o[c] *= inv;
        store_row(o, D, O.row(i0 + r));
        L[i0 + r] = l > 0 ? row_max[r] + std::log(l) : (l != l ? l : neg_inf);
      }
      for (int64_t i = i1; i < i_end; ++i) {  // padded query rows
        std::fill(O.row(i), O.row(i) + D, scalar_t(0));
        L[i] = neg_inf;
      }
    }
  });
}

// Backward for one (batch, q head) per task: key tiles outer, query tiles inner.
// dq accumulates in place (the task owns its rows); dk / dv go to a per-q-head
// fp32 slab (B, K, Hq, D) that is summed over the GQA group afterwards.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, double scale_d, const std::vector<int64_t>& qls,
                     const std::vector<int64_t>& kls, at::Tensor& dq_acc, at::Tensor& dk_acc,
                     at::Tensor& dv_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t group = Hq / k.size(2);
  const acc_t scale = static_cast<acc_t>(scale_d);

  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k_tile(kBlockK * D), kt_tile(D * kBlockK), vt_tile(D * kBlockK);
    std::vector<acc_t> q_tile(kBlockQ * D), do_tile(kBlockQ * D), p_tile(kBlockQ * kBlockK);
    std::vector<acc_t> pt_tile(kBlockK * kBlockQ), ds_tile(kBlockQ * kBlockK);
    std::vector<acc_t> dst_tile(kBlockK * kBlockQ), dk_tile(kBlockK * D), dv_tile(kBlockK * D);
    std::vector<acc_t> delta(N), row(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % Hq, b = item / Hq, hk = h / group;
      const int64_t ql = qls[b], kl = kls[b], off = kl - ql;
      if (ql == 0) continue;
      const auto Q = head_view<scalar_t>(q, b, h);
      const auto K = head_view<scalar_t>(k, b, hk);
      const auto V = head_view<scalar_t>(v, b, hk);
      const auto O = head_view<scalar_t>(out, b, h);
      const auto dO = head_view<scalar_t>(grad_out, b, h);
      const auto dQ = head_view<acc_t>(dq_acc, b, h);
      const auto dK = head_view<acc_t>(dk_acc, b, h);
      const auto dV = head_view<acc_t>(dv_acc, b, h);
      const acc_t* L = lse.data_ptr<acc_t>() + (b * Hq + h) * N;
      const acc_t* dL = grad_lse.data_ptr<acc_t>() + (b * Hq + h) * N;

      // delta_i = <dO_i, O_i> - dlse_i: the softmax-Jacobian term, with the lse
      // gradient folded in (d lse_i / d s_ij = p_ij).
      for (int64_t i = 0; i < ql; ++i) {
        const scalar_t* o = O.row(i);
        const scalar_t* g = dO.row(i);
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < D; ++c) acc += static_cast<acc_t>(o[c]) * static_cast<acc_t>(g[c]);
        delta[i] = acc - dL[i];
      }
      const int64_t key_end = visible_end(ql - 1, off, kl);
      for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
        const int64_t n = std::min(kBlockK, key_end - j0);
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* kr = K.row(j0 + j);
          const scalar_t* vr = V.row(j0 + j);
          for (int64_t c = 0; c < D; ++c) {
            const acc_t kv = static_cast<acc_t>(kr[c]);
            k_tile[j * D + c] = kv;
            kt_tile[c * n + j] = kv;
            vt_tile[c * n + j] = static_cast<acc_t>(vr[c]);
          }
        }
        std::fill(dk_tile.begin(), dk_tile.begin() + n * D, acc_t(0));
        std::fill(dv_tile.begin(), dv_tile.begin() + n * D, acc_t(0));
        // First query that sees key j0: off + i >= j0.
        const int64_t i_start = std::max<int64_t>(0, j0 - off);
        for (int64_t i0 = i_start; i0 < ql; i0 += kBlockQ) {
          const int64_t m = std::min(kBlockQ, ql - i0);
          for (int64_t r = 0; r < m; ++r) {
            load_row(Q.row(i0 + r), D, &q_tile[r * D], scale);
            load_row(dO.row(i0 + r), D, &do_tile[r * D]);
          }
          // P = exp(S - lse), masked; S uses the pre-scaled q tile.
          block_gemm(m, n, D, q_tile.data(), D, kt_tile.data(), n, p_tile.data(), n, false);
          for (int64_t r = 0; r < m; ++r) {
            acc_t* p = &p_tile[r * n];
            const int64_t vis = std::clamp<int64_t>(visible_end(i0 + r, off, kl) - j0, 0, n);
            const acc_t l = L[i0 + r];
#pragma omp simd
            for (int64_t j = 0; j < vis; ++j) p[j] = exp_scalar(p[j] - l);
            std::fill(p + vis, p + n, acc_t(0));
          }
          // dV += P^T dO
          for (int64_t r = 0; r < m; ++r)
            for (int64_t j = 0; j < n; ++j) pt_tile[j * m + r] = p_tile[r * n + j];
          block_gemm(n, D, m, pt_tile.data(), m, do_tile.data(), D, dv_tile.data(), D, true);
          // dP = dO V^T, then dS = P * (dP - delta)
          block_gemm(m, n, D, do_tile.data(), D, vt_tile.data(), n, ds_tile.data(), n, false);
          for (int64_t r = 0; r < m; ++r) {
            const acc_t dl = delta[i0 + r];
            acc_t* ds = &ds_tile[r * n];
            const acc_t* p = &p_tile[r * n];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - dl);
          }
          // dQ += scale * dS K   (accumulated straight into this task's rows)
          block_gemm(m, D, n, ds_tile.data(), n, k_tile.data(), D, p_tile.data(), D, false);
          for (int64_t r = 0; r < m; ++r) {
            acc_t* dq = dQ.row(i0 + r);
            const acc_t* src = &p_tile[r * D];
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) dq[c] += scale * src[c];
          }
          // dK += dS^T (scale * Q): q_tile already holds scale * Q.
          for (int64_t r = 0; r < m; ++r)
            for (int64_t j = 0; j < n; ++j) dst_tile[j * m + r] = ds_tile[r * n + j];
          block_gemm(n, D, m, dst_tile.data(), m, q_tile.data(), D, dk_tile.data(), D, true);
        }
        for (int64_t j = 0; j < n; ++j) {
          std::copy_n(&dk_tile[j * D], D, dK.row(j0 + j));
          std::copy_n(&dv_tile[j * D], D, dV.row(j0 + j));
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
  COMET_DISPATCH_FLOATING(q.scalar_type(), "prefix_attention_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, out, lse, scale, qls, kls);
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
  const int64_t Hkv = k.size(2);
  const auto qls = read_lengths(q_lens, B, N);
  const auto kls = read_lengths(k_lens, B, K);
  check_length_values(op, qls, N, "q_lens", "number of query rows");
  check_length_values(op, kls, K, "k_lens", "number of key rows");
  const auto acc_opts = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor dq_acc = at::zeros({B, N, Hq, D}, acc_opts);
  at::Tensor dk_acc = at::zeros({B, K, Hq, D}, acc_opts);
  at::Tensor dv_acc = at::zeros({B, K, Hq, D}, acc_opts);
  const at::Tensor lse_c = lse.contiguous(), glse_c = grad_lse.contiguous();
  if (q.numel() > 0 && K > 0) {
    COMET_DISPATCH_FLOATING(q.scalar_type(), "prefix_attention_backward_cpu", [&] {
      backward_kernel<scalar_t>(grad_out, glse_c, q, k, v, out, lse_c, scale, qls, kls, dq_acc,
                                dk_acc, dv_acc);
    });
  }
  const int64_t group = Hq / Hkv;
  at::Tensor dk = dk_acc.view({B, K, Hkv, group, D}).sum(3).to(q.scalar_type());
  at::Tensor dv = dv_acc.view({B, K, Hkv, group, D}).sum(3).to(q.scalar_type());
  return {dq_acc.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CPU, m) {
  m.impl("prefix_attention", &prefix_attention_cpu);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cpu);
}

}  // namespace comet::cpu
