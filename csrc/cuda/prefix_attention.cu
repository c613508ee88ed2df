// CUDA prefix_attention: bf16 / fp16 at head dims 64, 80, 96, 128 on sm_80+ go
// to the tensor-core kernels (prefix_attention_mma.cu); everything else runs
// here: a FlashAttention-style tiled kernel on CUDA cores
// (all dtypes; fp32 / fp64 accumulation) — forward with online softmax writing
// out + log-sum-exp, backward recomputing the probabilities from the lse
// (one kernel for dQ, one for dK / dV, so no atomics).
//
// Layout: a warp owns a query row at a time; lane j scores key j of a 32-key
// tile held in shared memory (rows padded to D + 1 floats: no bank conflicts);
// lane l owns output columns l, l + 32, ... Key tiles past the last key a
// block's rows can see are never loaded (causal skipping).
//
// Mask, per sample b (ql = q_lens[b], kl = k_lens[b], both clamped to the
// tensor sizes): query i < ql sees key j < kl iff j <= kl - ql + i.
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/prefix_attention_mma.h"

namespace comet::cuda {
namespace {

constexpr int kKeys = 32;         // keys per tile (one per lane)
constexpr int kWarps = 8;         // warps per block (forward, dQ)
constexpr int kRowsPerWarp = 4;   // query rows per warp
constexpr int kRows = kWarps * kRowsPerWarp;

struct Strides {
  int64_t b, s, h;  // batch, row, head strides (the last dim is contiguous)
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct Problem {
  int64_t B, N, K, Hq, Hkv, D;
  const int64_t* q_lens;  // (B,) or null
  const int64_t* k_lens;  // (B,) or null
};

__device__ __forceinline__ void lengths(const Problem& p, int64_t b, int64_t& ql, int64_t& kl) {
  ql = p.q_lens != nullptr ? min(max(p.q_lens[b], int64_t(0)), p.N) : p.N;
  kl = p.k_lens != nullptr ? min(max(p.k_lens[b], int64_t(0)), p.K) : p.K;
}

// Keys visible to query i (i < ql): [0, visible_end).
__device__ __forceinline__ int64_t visible_end(int64_t i, int64_t off, int64_t kl) {
  return min(max(off + i + 1, int64_t(0)), kl);
}

// What a block of query rows [i0, i0 + kRows) of sample b sees: the sample's
// lengths, the causal offset, and the end of the keys its last valid row sees.
struct BlockRows {
  int64_t ql, kl, off, key_end;
};

__device__ __forceinline__ BlockRows block_rows(const Problem& p, int64_t b, int64_t i0) {
  BlockRows r;
  lengths(p, b, r.ql, r.kl);
  r.off = r.kl - r.ql;
  const int64_t last = min(i0 + kRows, r.ql) - 1;
  r.key_end = last >= i0 ? visible_end(last, r.off, r.kl) : 0;
  return r;
}

// A (kRows, D) tile of rows i0.. of one (batch, head) of a (B, S, H, D) tensor,
// times `scale`, zeros past row N.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_rows(const scalar_t* base, Strides st, int64_t b, int64_t h, int64_t i0,
                                          int64_t N, int64_t D, acc_t scale, acc_t* tile) {
  for (int64_t e = threadIdx.x; e < kRows * D; e += blockDim.x) {
    const int64_t r = e / D, c = e % D, i = i0 + r;
    tile[e] = i < N ? static_cast<acc_t>(base[b * st.b + i * st.s + h * st.h + c]) * scale : acc_t(0);
  }
}

// Loads keys [j0, j0 + kKeys) of one (batch, kv head) into a (kKeys, D + 1) tile;
// rows past `end` become zeros.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* base, Strides st, int64_t j0, int64_t end,
                                          int64_t D, acc_t* tile) {
  for (int64_t e = threadIdx.x; e < kKeys * D; e += blockDim.x) {
    const int64_t j = e / D, c = e % D;
    tile[j * (D + 1) + c] = j0 + j < end ? static_cast<acc_t>(base[(j0 + j) * st.s + c]) : acc_t(0);
  }
}

// ------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t, int COLS>
__global__ void __launch_bounds__(kWarps * kWarp)
    forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, scalar_t* __restrict__ out,  // (B, N, Hq, D)
                   acc_t* __restrict__ lse,                                     // (B, Hq, N)
                   Strides sq, Strides sk, Strides sv, Problem p, acc_t scale) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t D = p.D;
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // (kRows, D)
  acc_t* k_s = q_s + kRows * D;                      // (kKeys, D + 1)
  acc_t* v_s = k_s + kKeys * (D + 1);                // (kKeys, D + 1)
  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = int64_t(blockIdx.x) * kRows;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const auto [ql, kl, off, key_end] = block_rows(p, b, i0);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  load_rows(q, sq, b, h, i0, p.N, D, scale, q_s);
  acc_t m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][COLS];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = neg_inf;
    l[r] = 0;
#pragma unroll
    for (int t = 0; t < COLS; ++t) o[r][t] = 0;
  }
  const scalar_t* kb = k + b * sk.b + hk * sk.h;
  const scalar_t* vb = v + b * sv.b + hk * sv.h;
  for (int64_t j0 = 0; j0 < key_end; j0 += kKeys) {
    __syncthreads();
    load_tile(kb, sk, j0, key_end, D, k_s);
    load_tile(vb, sv, j0, key_end, D, v_s);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t i = i0 + row;
      // Rows past ql, and tiles none of whose keys the row sees, are skipped (warp-uniform). Not
      // by m_new == -inf: max() drops NaN scores, and a row whose visible scores are all NaN
      // must come out NaN.
      if (i >= ql || j0 >= visible_end(i, off, kl)) continue;
      const acc_t* qr = q_s + row * D;
      const acc_t* kr = k_s + lane * (D + 1);
      acc_t s = 0;
      for (int64_t c = 0; c < D; ++c) s += qr[c] * kr[c];
      const bool visible = j0 + lane < visible_end(i, off, kl);
      s = visible ? s : neg_inf;
      const acc_t m_new = max(m[r], warp_max(s));
      const acc_t pj = visible ? exp(s - m_new) : acc_t(0);
      const acc_t alpha = exp(m[r] - m_new);
      l[r] = l[r] * alpha + warp_sum(pj);
      m[r] = m_new;
#pragma unroll
      for (int t = 0; t < COLS; ++t) o[r][t] *= alpha;
      for (int j = 0; j < kKeys; ++j) {
        const acc_t pb = __shfl_sync(0xffffffffu, pj, j);
        const acc_t* vr = v_s + j * (D + 1);
#pragma unroll
        for (int t = 0; t < COLS; ++t) {
          const int64_t c = lane + t * kWarp;
          if (c < D) o[r][t] += pb * vr[c];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= p.N) continue;
    const bool seen = i < ql && l[r] != 0;  // l is NaN after a NaN score: it reaches out and lse
    const acc_t inv = seen ? acc_t(1) / l[r] : acc_t(0);
    scalar_t* orow = out + ((b * p.N + i) * p.Hq + h) * D;
#pragma unroll
    for (int t = 0; t < COLS; ++t) {
      const int64_t c = lane + t * kWarp;
      if (c < D) orow[c] = static_cast<scalar_t>(o[r][t] * inv);
    }
    if (lane == 0) lse[(b * p.Hq + h) * p.N + i] = seen ? m[r] + log(l[r]) : neg_inf;
  }
}

// ------------------------------------------------------------------ backward: dQ

template <typename scalar_t, typename acc_t, int COLS>
__global__ void __launch_bounds__(kWarps * kWarp)
    backward_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                       const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,  // (B,N,Hq,D)
                       const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,   // (B,Hq,N)
                       scalar_t* __restrict__ dq,                                         // (B,N,Hq,D)
                       Strides sq, Strides sk, Strides sv, Strides sdo, Problem p, acc_t scale) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t D = p.D;
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // (kRows, D), scaled
  acc_t* do_s = q_s + kRows * D;                     // (kRows, D)
  acc_t* k_s = do_s + kRows * D;                     // (kKeys, D + 1)
  acc_t* v_s = k_s + kKeys * (D + 1);
  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = int64_t(blockIdx.x) * kRows;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const auto [ql, kl, off, key_end] = block_rows(p, b, i0);
  load_rows(q, sq, b, h, i0, p.N, D, scale, q_s);
  load_rows(dout, sdo, b, h, i0, p.N, D, acc_t(1), do_s);
  acc_t g[kRowsPerWarp][COLS];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int t = 0; t < COLS; ++t) g[r][t] = 0;
  const scalar_t* kb = k + b * sk.b + hk * sk.h;
  const scalar_t* vb = v + b * sv.b + hk * sv.h;
  for (int64_t j0 = 0; j0 < key_end; j0 += kKeys) {
    __syncthreads();
    load_tile(kb, sk, j0, key_end, D, k_s);
    load_tile(vb, sv, j0, key_end, D, v_s);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t i = i0 + row;
      if (i >= ql) continue;
      const acc_t* qr = q_s + row * D;
      const acc_t* dr = do_s + row * D;
      const acc_t* kr = k_s + lane * (D + 1);
      const acc_t* vr = v_s + lane * (D + 1);
      acc_t s = 0, dp = 0;
      for (int64_t c = 0; c < D; ++c) {
        s += qr[c] * kr[c];
        dp += dr[c] * vr[c];
      }
      const bool visible = j0 + lane < visible_end(i, off, kl);
      const int64_t li = (b * p.Hq + h) * p.N + i;
      const acc_t pj = visible ? exp(s - lse[li]) : acc_t(0);
      const acc_t ds = pj * (dp - delta[li]);
      for (int j = 0; j < kKeys; ++j) {
        const acc_t dsb = __shfl_sync(0xffffffffu, ds, j);
        const acc_t* kj = k_s + j * (D + 1);
#pragma unroll
        for (int t = 0; t < COLS; ++t) {
          const int64_t c = lane + t * kWarp;
          if (c < D) g[r][t] += dsb * kj[c];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= p.N) continue;
    scalar_t* row = dq + ((b * p.N + i) * p.Hq + h) * D;
#pragma unroll
    for (int t = 0; t < COLS; ++t) {
      const int64_t c = lane + t * kWarp;
      if (c < D) row[c] = static_cast<scalar_t>(i < ql ? g[r][t] * scale : acc_t(0));
    }
  }
}

// ------------------------------------------------------------------ backward: dK, dV

// One warp per (batch, kv head, 32-key tile): loops over every query row of the
// group's q heads that sees the tile; dK / dV accumulate in shared memory,
// lane l owning columns l, l + 32, ... (so no two lanes touch one address).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp)
    backward_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                         const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                         const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                         acc_t* __restrict__ dk, acc_t* __restrict__ dv,  // (B, K, Hkv, D) fp32
                         Strides sq, Strides sk, Strides sv, Strides sdo, Problem p, acc_t scale) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t D = p.D;
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);  // (kKeys, D + 1)
  acc_t* v_s = k_s + kKeys * (D + 1);
  acc_t* dk_s = v_s + kKeys * (D + 1);               // (kKeys, D)
  acc_t* dv_s = dk_s + kKeys * D;
  acc_t* q_s = dv_s + kKeys * D;                     // (D,) the current query row, scaled
  acc_t* do_s = q_s + D;                             // (D,)
  const int64_t b = blockIdx.z, hk = blockIdx.y, j0 = int64_t(blockIdx.x) * kKeys;
  const int64_t group = p.Hq / p.Hkv;
  const int lane = threadIdx.x;
  int64_t ql, kl;
  lengths(p, b, ql, kl);
  const int64_t off = kl - ql;
  // Keys past the last one any query sees stay zero-gradient.
  const int64_t key_end = ql > 0 ? visible_end(ql - 1, off, kl) : 0;
  load_tile(k + b * sk.b + hk * sk.h, sk, j0, key_end, D, k_s);
  load_tile(v + b * sv.b + hk * sv.h, sv, j0, key_end, D, v_s);
  for (int64_t e = lane; e < kKeys * D; e += kWarp) dk_s[e] = dv_s[e] = 0;
  __syncwarp();
  const int64_t i_start = max(int64_t(0), j0 - off);  // first query that sees key j0
  if (j0 < key_end) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      for (int64_t i = i_start; i < ql; ++i) {
        for (int64_t c = lane; c < D; c += kWarp) {
          q_s[c] = static_cast<acc_t>(q[b * sq.b + i * sq.s + h * sq.h + c]) * scale;
          do_s[c] = static_cast<acc_t>(dout[b * sdo.b + i * sdo.s + h * sdo.h + c]);
        }
        __syncwarp();
        const acc_t* kr = k_s + lane * (D + 1);
        const acc_t* vr = v_s + lane * (D + 1);
        acc_t s = 0, dp = 0;
        for (int64_t c = 0; c < D; ++c) {
          s += q_s[c] * kr[c];
          dp += do_s[c] * vr[c];
        }
        const int64_t li = (b * p.Hq + h) * p.N + i;
        const bool visible = j0 + lane < visible_end(i, off, kl);
        const acc_t pj = visible ? exp(s - lse[li]) : acc_t(0);
        const acc_t ds = pj * (dp - delta[li]);
        for (int j = 0; j < kKeys; ++j) {
          const acc_t pb = __shfl_sync(0xffffffffu, pj, j);
          const acc_t dsb = __shfl_sync(0xffffffffu, ds, j);
          for (int64_t c = lane; c < D; c += kWarp) {
            dv_s[j * D + c] += pb * do_s[c];
            dk_s[j * D + c] += dsb * q_s[c];
          }
        }
        __syncwarp();
      }
    }
  }
  // Keys past key_end write zeros, not their sums: those hold 0 * dO, NaN where a row's dO is.
  for (int64_t e = lane; e < kKeys * D; e += kWarp) {
    const int64_t j = j0 + e / D, c = e % D;
    if (j < p.K) {
      dk[((b * p.K + j) * p.Hkv + hk) * D + c] = j < key_end ? dk_s[e] : acc_t(0);
      dv[((b * p.K + j) * p.Hkv + hk) * D + c] = j < key_end ? dv_s[e] : acc_t(0);
    }
  }
}

// ------------------------------------------------------------------ host side

template <typename F>
void head_dim_switch(int64_t D, const F& f) {
  if (D <= 32) f(std::integral_constant<int, 1>{});
  else if (D <= 64) f(std::integral_constant<int, 2>{});
  else if (D <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

at::Tensor lengths_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? dense_lengths(*t) : at::Tensor();
}

Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& ql, const at::Tensor& kl) {
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3),
          ql.defined() ? ql.data_ptr<int64_t>() : nullptr, kl.defined() ? kl.data_ptr<int64_t>() : nullptr};
}

// What the CUDA kernels take beyond the op's own checks: head dims (the CUDA-core kernels keep
// rows of D in shared memory, allow_smem refuses what this GPU cannot hold), and the grid's y / z,
// which carry heads (query heads: at least the key heads) and samples.
void check_cuda_shape(const char* op, const at::Tensor& q) {
  const int64_t limit = q.scalar_type() == at::kDouble ? 128 : 256;
  COMET_CHECK(q.size(3) <= limit, op, "head_dim ", q.size(3), " is not supported on CUDA for ",
              q.scalar_type(), " (at most ", limit, ")");
  check_grid_yz(op, "batch", q.size(0));
  check_grid_yz(op, "query heads", q.size(2));
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale,
                                                         const c10::optional<at::Tensor>& q_lens,
                                                         const c10::optional<at::Tensor>& k_lens) {
  const char* op = "prefix_attention";
  check_attention_args(op, q, k, v, scale, q_lens, k_lens);
  check_cuda_shape(op, q);
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({B, Hq, N}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor ql = lengths_or_undefined(q_lens), kl = lengths_or_undefined(k_lens);
  const Problem p = problem_of(q, k, ql, kl);
  if (mma_attention_supports(q)) {
    mma_attention_forward(q, k, v, scale, {p.q_lens, p.k_lens}, out, lse);
    return {out, lse};
  }
  COMET_DISPATCH_FLOATING(q.scalar_type(), "prefix_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    head_dim_switch(D, [&](auto cols) {
      auto kernel = forward_kernel<scalar_t, acc_t, decltype(cols)::value>;
      const size_t smem = sizeof(acc_t) * (kRows * D + 2 * kKeys * (D + 1));
      allow_smem(reinterpret_cast<const void*>(kernel), smem, op, "head_dim ", D, " in ", q.scalar_type());
      const dim3 grid((N + kRows - 1) / kRows, Hq, B);
      kernel<<<grid, kWarps * kWarp, smem, at::cuda::getCurrentCUDAStream()>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), strides_of(q), strides_of(k), strides_of(v), p,
          static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    const c10::optional<at::Tensor>& q_lens, const c10::optional<at::Tensor>& k_lens) {
  const char* op = "prefix_attention_backward";
  check_attention_args(op, q, k, v, scale, q_lens, k_lens);
  check_attention_backward_args(op, grad_out, grad_lse, q, out, lse);
  check_cuda_shape(op, q);
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3), K = k.size(1), Hkv = k.size(2);
  const auto acc = acc_dtype(q.scalar_type());
  if (q.numel() == 0 || K == 0)
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros({B, K, Hkv, D}, q.options()),
            at::zeros({B, K, Hkv, D}, q.options())};
  const c10::cuda::CUDAGuard guard(q.device());
  // delta_i = <dO_i, O_i> - dlse_i (the lse gradient folded into the softmax backward).
  const at::Tensor delta =
      ((grad_out.to(acc) * out.to(acc)).sum(-1).transpose(1, 2) - grad_lse.to(acc)).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor ql = lengths_or_undefined(q_lens), kl = lengths_or_undefined(k_lens);
  const Problem p = problem_of(q, k, ql, kl);
  if (mma_attention_supports(q))
    return mma_attention_backward(grad_out, q, k, v, lse_c, delta, scale, {p.q_lens, p.k_lens});
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk_acc = at::zeros({B, K, Hkv, D}, q.options().dtype(acc));
  at::Tensor dv_acc = at::zeros({B, K, Hkv, D}, q.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();
  COMET_DISPATCH_FLOATING(q.scalar_type(), "prefix_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    head_dim_switch(D, [&](auto cols) {
      auto kernel = backward_dq_kernel<scalar_t, acc_t, decltype(cols)::value>;
      const size_t smem = sizeof(acc_t) * (2 * kRows * D + 2 * kKeys * (D + 1));
      allow_smem(reinterpret_cast<const void*>(kernel), smem, op, "head_dim ", D, " in ", q.scalar_type());
      kernel<<<dim3((N + kRows - 1) / kRows, Hq, B), kWarps * kWarp, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          grad_out.data_ptr<scalar_t>(), lse_c.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
          dq.data_ptr<scalar_t>(), strides_of(q), strides_of(k), strides_of(v), strides_of(grad_out), p,
          static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    auto kernel = backward_dkdv_kernel<scalar_t, acc_t>;
    const size_t smem = sizeof(acc_t) * (2 * kKeys * (D + 1) + 2 * kKeys * D + 2 * D);
    allow_smem(reinterpret_cast<const void*>(kernel), smem, op, "head_dim ", D, " in ", q.scalar_type());
    kernel<<<dim3((K + kKeys - 1) / kKeys, Hkv, B), kWarp, smem, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(), lse_c.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
        dk_acc.data_ptr<acc_t>(), dv_acc.data_ptr<acc_t>(), strides_of(q), strides_of(k), strides_of(v),
        strides_of(grad_out), p, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk_acc.to(q.scalar_type()), dv_acc.to(q.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CUDA, m) {
  m.impl("prefix_attention", &prefix_attention_cuda);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cuda);
}

}  // namespace comet::cuda
