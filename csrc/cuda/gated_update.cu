// CUDA gated_update, one fused pass per memory slot (row): c = RMSNorm(readout) * w;
// g = sigmoid(gate . [c ; s]); s' = g s + (1-g) c (s' = c without a state); memory =
// s' + up(down(s')); with gate_snap < 1 a gate g > gate_snap blends as exactly 1 (s' = s),
// and the backward passes the gradient straight through it. The forward runs a warp per row with the row in registers
// (row_warp.cuh) where it can, else — and the backward always — a block per row at a
// time. Weight gradients go to per-block partial slices summed afterwards.
// COMET_ROW_KERNELS=v2 runs the two-pass backward instead (row_cols.cuh).
#include <torch/library.h>

#include "checks.h"
#include "cuda/row_cols.cuh"
#include "cuda/row_kernels.cuh"
#include "cuda/row_warp.cuh"

namespace comet::cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp(-z));
}

// The gate the blend uses: exactly 1 above the snap threshold, else g.
template <typename acc_t>
__device__ __forceinline__ acc_t snapped(acc_t g, acc_t gate_snap) {
  return g > gate_snap ? acc_t(1) : g;
}

// Recomputes a row's candidate c and new state s' into shared memory; returns (rstd, g), g
// unsnapped (the backward's straight-through derivative needs it).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void new_state_row(const scalar_t* rr, const scalar_t* sr, const scalar_t* w,
                                              const scalar_t* gate, int64_t d, acc_t eps, acc_t gate_snap,
                                              acc_t* c, acc_t* sn, acc_t* scratch, acc_t& rstd, acc_t& g) {
  rstd = rsqrt(row_dot<acc_t>(rr, rr, d, scratch) / d + eps);
  acc_t z[1] = {0};
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    c[i] = static_cast<acc_t>(rr[i]) * rstd * static_cast<acc_t>(w[i]);
    if (sr != nullptr)
      z[0] += static_cast<acc_t>(gate[i]) * c[i] + static_cast<acc_t>(gate[d + i]) * static_cast<acc_t>(sr[i]);
  }
  g = 0;
  if (sr != nullptr) {
    block_sum<1>(z, scratch);
    g = sigmoid(z[0]);
  }
  const acc_t gs = snapped(g, gate_snap);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    sn[i] = sr != nullptr ? gs * static_cast<acc_t>(sr[i]) + (acc_t(1) - gs) * c[i] : c[i];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    gated_forward_kernel(const scalar_t* __restrict__ R,     // (M, d)
                         const scalar_t* __restrict__ S,     // (M, d) or null
                         const scalar_t* __restrict__ w,     // (d,)
                         const scalar_t* __restrict__ gate,  // (2d,)
                         const scalar_t* __restrict__ down,  // (r, d)
                         const scalar_t* __restrict__ up,    // (d, r)
                         scalar_t* __restrict__ new_state, scalar_t* __restrict__ memory,
                         int64_t M, int64_t d, int64_t r, acc_t eps, acc_t gate_snap) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* c = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sn = c + d;
  acc_t* h = sn + d;
  acc_t* scratch = h + r;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    acc_t rstd, g;
    new_state_row(R + row * d, S != nullptr ? S + row * d : nullptr, w, gate, d, eps, gate_snap, c, sn,
                  scratch, rstd, g);
    row_project(down, sn, r, d, scratch, h);
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      new_state[row * d + i] = static_cast<scalar_t>(sn[i]);
      memory[row * d + i] = static_cast<scalar_t>(sn[i] + row_expand(up, h, r, i));
    }
    __syncthreads();
  }
}

template <typename scalar_t, int kVecs>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    gated_forward_warp_kernel(const scalar_t* __restrict__ R,     // (M, d)
                              const scalar_t* __restrict__ S,     // (M, d) or null
                              const scalar_t* __restrict__ w,     // (d,)
                              const scalar_t* __restrict__ gate,  // (2d,)
                              const scalar_t* __restrict__ down,  // (r, d)
                              const scalar_t* __restrict__ up,    // (d, r)
                              scalar_t* __restrict__ new_state, scalar_t* __restrict__ memory,
                              int64_t M, int64_t d, int r, float eps, float gate_snap) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= M) return;
  WarpRow<scalar_t, kVecs> c;  // the candidate, then the new state
  c.load(R + row * d, d, lane);
  c.scale(rsqrtf(c.dot(nullptr, d, lane) / d + eps), w, d, lane);
  if (S != nullptr) {  // the state row is read twice (the gate, the blend) rather than kept: registers
    const scalar_t* sr = S + row * d;
    const float g = sigmoid(c.dot(gate, d, lane) + WarpRow<scalar_t, kVecs>::dot_rows(sr, gate + d, d, lane));
    c.blend(snapped(g, gate_snap), sr, d, lane);
  }
  c.store(new_state + row * d, d, lane);
  c.add_low_rank(down, up, r, d, lane);
  c.store(memory + row * d, d, lane);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    gated_backward_kernel(const scalar_t* __restrict__ GS, const scalar_t* __restrict__ GM,
                          const scalar_t* __restrict__ R, const scalar_t* __restrict__ S,
                          const scalar_t* __restrict__ w, const scalar_t* __restrict__ gate,
                          const scalar_t* __restrict__ down, const scalar_t* __restrict__ up,
                          scalar_t* __restrict__ dR, scalar_t* __restrict__ dS,
                          acc_t* __restrict__ d_w,     // (grid, d) partials
                          acc_t* __restrict__ d_gate,  // (grid, 2d) partials
                          acc_t* __restrict__ d_down,  // (grid, r, d) partials
                          acc_t* __restrict__ d_up_t,  // (grid, r, d) partials
                          int64_t M, int64_t d, int64_t r, acc_t eps, acc_t gate_snap) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* c = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sn = c + d;
  acc_t* dsn = sn + d;
  acc_t* h = dsn + d;
  acc_t* dh = h + r;
  acc_t* scratch = dh + r;
  acc_t* pd_w = d_w + blockIdx.x * d;
  acc_t* pd_gate = d_gate + blockIdx.x * 2 * d;
  acc_t* pd_down = d_down + blockIdx.x * r * d;
  acc_t* pd_up = d_up_t + blockIdx.x * r * d;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const scalar_t* rr = R + row * d;
    const scalar_t* sr = S != nullptr ? S + row * d : nullptr;
    const scalar_t* gm = GM + row * d;
    acc_t rstd, g;
    new_state_row(rr, sr, w, gate, d, eps, gate_snap, c, sn, scratch, rstd, g);
    row_project(down, sn, r, d, scratch, h);
    row_project_t(up, gm, r, d, scratch, dh);
    // d s' = grad_new_state + grad_memory + down^T dh; weight partials of the RLA.
    acc_t dg[1] = {0};
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const acc_t gmi = static_cast<acc_t>(gm[i]);
      acc_t v = static_cast<acc_t>(GS[row * d + i]) + gmi;
      for (int64_t k = 0; k < r; ++k) {
        v += static_cast<acc_t>(down[k * d + i]) * dh[k];
        pd_up[k * d + i] += gmi * h[k];
        pd_down[k * d + i] += dh[k] * sn[i];
      }
      dsn[i] = v;
      if (sr != nullptr) dg[0] += v * (static_cast<acc_t>(sr[i]) - c[i]);
    }
    acc_t dz = 0;
    if (sr != nullptr) {
      block_sum<1>(dg, scratch);
      dz = dg[0] * g * (acc_t(1) - g);  // straight through the snap: sigmoid'(z)
    }
    const acc_t gs = snapped(g, gate_snap);
    // dc (into dsn), d_state, gate partials; then the RMSNorm backward.
    acc_t dot[1] = {0};
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      acc_t dc = dsn[i];
      if (sr != nullptr) {
        const acc_t si = static_cast<acc_t>(sr[i]);
        dS[row * d + i] = static_cast<scalar_t>(gs * dsn[i] + dz * static_cast<acc_t>(gate[d + i]));
        dc = (acc_t(1) - gs) * dsn[i] + dz * static_cast<acc_t>(gate[i]);
        pd_gate[i] += dz * c[i];
        pd_gate[d + i] += dz * si;
      }
      dsn[i] = dc;
      dot[0] += dc * static_cast<acc_t>(w[i]) * static_cast<acc_t>(rr[i]);
    }
    block_sum<1>(dot, scratch);
    const acc_t k3 = dot[0] * rstd * rstd * rstd / d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const acc_t xi = static_cast<acc_t>(rr[i]);
      pd_w[i] += dsn[i] * xi * rstd;
      dR[row * d + i] = static_cast<scalar_t>(dsn[i] * static_cast<acc_t>(w[i]) * rstd - xi * k3);
    }
    __syncthreads();
  }
}

// v2 backward, pass 1, a warp per row: the row's table entry [h | dh | rstd, g, dz, k3], with
// h = D s' and dh = Uᵀ d(memory); g the unsnapped gate, dz = d(gate logit) (straight through
// the snap; 0 without a state); k3 = rstd³/d · Σ_i dc_i w_i x_i, the RMSNorm backward's row
// term. Two sweeps over the row: (rstd, dh); (gate, dz, k3, h). dc = (1 - g_s) v + dz gate_c
// with v = d s' is linear in dz, so k3 comes from two sums of the second sweep, and h =
// g_s·D s + (1 - g_s)·D c from two more (a convex blend: nothing cancels). U comes transposed
// (r, d): its reads coalesce like D's.
template <typename scalar_t, typename acc_t, int R>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    gated_backward_stats_kernel(const scalar_t* __restrict__ GS, const scalar_t* __restrict__ GM,
                                const scalar_t* __restrict__ Rd, const scalar_t* __restrict__ S,
                                const scalar_t* __restrict__ w, const scalar_t* __restrict__ gate,
                                const scalar_t* __restrict__ down,
                                const scalar_t* __restrict__ up_t,  // (r, d): up transposed
                                acc_t* __restrict__ stats,          // (M, kStatsWidth<R>)
                                int64_t M, int64_t d, int64_t r, acc_t eps, acc_t gate_snap) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= M) return;  // whole warps: the shuffles below see all 32 lanes
  const scalar_t* rr = Rd + row * d;
  const scalar_t* sr = S != nullptr ? S + row * d : nullptr;
  const scalar_t* gsr = GS + row * d;
  const scalar_t* gmr = GM + row * d;
  acc_t ss = 0, dh[R] = {};
  for (int64_t i = lane; i < d; i += kWarp) {
    const acc_t x = static_cast<acc_t>(rr[i]), gm = static_cast<acc_t>(gmr[i]);
    ss += x * x;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k >= r) break;
      dh[k] += static_cast<acc_t>(up_t[k * d + i]) * gm;
    }
  }
  const acc_t rstd = rsqrt(warp_sum(ss) / d + eps);
  warp_sum_all(dh);
  // z: the gate logit; dg = Σ v (s - c); p_v = Σ v w x, p_g = Σ gate_c w x (k3's two parts);
  // h_s = D s, h_c = D c (h's two parts)
  acc_t z = 0, dg = 0, p_v = 0, p_g = 0, h_s[R] = {}, h_c[R] = {};
  for (int64_t i = lane; i < d; i += kWarp) {
    const acc_t x = static_cast<acc_t>(rr[i]), wx = static_cast<acc_t>(w[i]) * x, c = wx * rstd;
    acc_t v = static_cast<acc_t>(gsr[i]) + static_cast<acc_t>(gmr[i]);
    const acc_t s = sr != nullptr ? static_cast<acc_t>(sr[i]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k >= r) break;
      const acc_t dk = static_cast<acc_t>(down[k * d + i]);
      v += dk * dh[k];
      h_c[k] += dk * c;
      if (sr != nullptr) h_s[k] += dk * s;
    }
    p_v += v * wx;
    if (sr != nullptr) {
      const acc_t gc = static_cast<acc_t>(gate[i]);
      z += gc * c + static_cast<acc_t>(gate[d + i]) * s;
      dg += v * (s - c);
      p_g += gc * wx;
    }
  }
  warp_sum_all(h_c);
  acc_t g = 0, dz = 0, k3 = warp_sum(p_v), h[R];
  if (sr != nullptr) {
    warp_sum_all(h_s);
    g = sigmoid(warp_sum(z));
    dz = warp_sum(dg) * g * (acc_t(1) - g);
    const acc_t gs = snapped(g, gate_snap);
    k3 = (acc_t(1) - gs) * k3 + dz * warp_sum(p_g);
#pragma unroll
    for (int k = 0; k < R; ++k) h[k] = gs * h_s[k] + (acc_t(1) - gs) * h_c[k];  // zero past r
  } else {
#pragma unroll
    for (int k = 0; k < R; ++k) h[k] = h_c[k];
  }
  k3 *= rstd * rstd * rstd / d;
  if (lane == 0) store_stats(stats + row * kStatsWidth<R>, h, dh, rstd, g, dz, k3);
}

// v2 backward, pass 2, a thread per column i over rows [y·rows, (y+1)·rows): dR and dS from the
// table, and the column's weight-gradient sums over the range into partial y.
template <typename scalar_t, typename acc_t, int R>
__global__ void __launch_bounds__(kColThreads)
    gated_backward_cols_kernel(const scalar_t* __restrict__ GS, const scalar_t* __restrict__ GM,
                               const scalar_t* __restrict__ Rd, const scalar_t* __restrict__ S,
                               const scalar_t* __restrict__ w, const scalar_t* __restrict__ gate,
                               const scalar_t* __restrict__ down, const acc_t* __restrict__ stats,
                               scalar_t* __restrict__ dR, scalar_t* __restrict__ dS,
                               acc_t* __restrict__ d_w,     // (ranges, d) partials
                               acc_t* __restrict__ d_gate,  // (ranges, 2d) partials
                               acc_t* __restrict__ d_down,  // (ranges, r, d) partials
                               acc_t* __restrict__ d_up_t,  // (ranges, r, d) partials
                               int64_t M, int64_t d, int64_t r, int64_t rows, acc_t gate_snap) {
  const int64_t i = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (i >= d) return;  // no barriers in this kernel
  const int64_t range = blockIdx.y, last = std::min(M, (range + 1) * rows);
  acc_t dcol[R];
  load_column(down, r, d, i, dcol);
  const acc_t wi = static_cast<acc_t>(w[i]);
  const acc_t gate_c = static_cast<acc_t>(gate[i]), gate_s = static_cast<acc_t>(gate[d + i]);
  acc_t a_down[R] = {}, a_up[R] = {}, a_w = 0, a_gc = 0, a_gs = 0;
  // unrolled: the loads of the next rows issue before this row's sums need them (more bytes in
  // flight per warp; the rows are independent but for the accumulators). Not in fp64, where
  // the doubled accumulators would spill.
  constexpr int kUnroll = sizeof(acc_t) == 4 ? 4 : 1;
#pragma unroll kUnroll
  for (int64_t m = range * rows; m < last; ++m) {
    RowStats<acc_t, R> st;  // a = h, b = dh, e = (rstd, g, dz, k3)
    st.load(stats + m * kStatsWidth<R>);
    const acc_t rstd = st.e[0], gs = snapped(st.e[1], gate_snap), dz = st.e[2];
    const acc_t x = static_cast<acc_t>(Rd[m * d + i]), gm = static_cast<acc_t>(GM[m * d + i]);
    const acc_t c = x * rstd * wi;
    acc_t v = static_cast<acc_t>(GS[m * d + i]) + gm;  // d s'
#pragma unroll
    for (int k = 0; k < R; ++k) v += dcol[k] * st.b[k];  // b is zero past r
    acc_t sn = c, dc = v;
    if (S != nullptr) {
      const acc_t s = static_cast<acc_t>(S[m * d + i]);
      sn = gs * s + (acc_t(1) - gs) * c;
      dS[m * d + i] = static_cast<scalar_t>(gs * v + dz * gate_s);
      dc = (acc_t(1) - gs) * v + dz * gate_c;
      a_gc += dz * c;
      a_gs += dz * s;
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
      a_up[k] += gm * st.a[k];
      a_down[k] += st.b[k] * sn;
    }
    a_w += dc * x * rstd;
    dR[m * d + i] = static_cast<scalar_t>(dc * wi * rstd - x * st.e[3]);
  }
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if (k >= r) break;
    d_down[(range * r + k) * d + i] = a_down[k];
    d_up_t[(range * r + k) * d + i] = a_up[k];
  }
  d_w[range * d + i] = a_w;
  d_gate[range * 2 * d + i] = a_gc;
  d_gate[range * 2 * d + d + i] = a_gs;
}

std::tuple<at::Tensor, at::Tensor> gated_update_cuda(const at::Tensor& readout,
                                                     const c10::optional<at::Tensor>& state,
                                                     const at::Tensor& norm_weight,
                                                     const at::Tensor& gate_weight,
                                                     const at::Tensor& down, const at::Tensor& up,
                                                     double eps, double gate_snap) {
  check_gated_update_args("gated_update", readout, state, norm_weight, gate_weight, down, up, eps,
                          gate_snap);
  const int64_t M = readout.size(0) * readout.size(1), d = readout.size(2), r = down.size(0);
  at::Tensor new_state = at::empty(readout.sizes(), readout.options());
  at::Tensor memory = at::empty(readout.sizes(), readout.options());
  if (M == 0) return {new_state, memory};
  const c10::cuda::CUDAGuard guard(readout.device());
  const at::Tensor R = readout.contiguous();
  const at::Tensor S = state.has_value() ? state->contiguous() : at::Tensor();
  const at::Tensor w = norm_weight.contiguous(), gw = gate_weight.contiguous();
  const at::Tensor dw = down.contiguous(), uw = up.contiguous();
  COMET_DISPATCH_FLOATING(readout.scalar_type(), "gated_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (kWarpRowType<scalar_t>) {
      const int vecs = warp_row_vecs<scalar_t>(d, r);
      if (vecs > 0 && aligned16(R.data_ptr()) && (!S.defined() || aligned16(S.data_ptr())) &&
          aligned16(w.data_ptr()) && aligned16(gw.data_ptr()) && aligned16(dw.data_ptr())) {
        dispatch_warp_row_vecs(vecs, [&](auto v) {
          gated_forward_warp_kernel<scalar_t, decltype(v)::value>
              <<<warp_row_grid(M), kRowWarps * kWarp, 0, at::cuda::getCurrentCUDAStream()>>>(
                  R.data_ptr<scalar_t>(), S.defined() ? S.data_ptr<scalar_t>() : nullptr,
                  w.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                  uw.data_ptr<scalar_t>(), new_state.data_ptr<scalar_t>(), memory.data_ptr<scalar_t>(), M, d,
                  int(r), static_cast<float>(eps), static_cast<float>(gate_snap));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
    }
    const size_t smem = row_smem<acc_t>(d, 2, r, 1);
    auto kernel = gated_forward_kernel<scalar_t, acc_t>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, "gated_update", "hidden size d=", d, " in ",
               readout.scalar_type());
    kernel<<<row_grid(M), kRowThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        R.data_ptr<scalar_t>(), S.defined() ? S.data_ptr<scalar_t>() : nullptr,
        w.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
        uw.data_ptr<scalar_t>(), new_state.data_ptr<scalar_t>(), memory.data_ptr<scalar_t>(), M,
        d, r, static_cast<acc_t>(eps), static_cast<acc_t>(gate_snap));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {new_state, memory};
}

// The v2 backward (row_cols.cuh) into partials of `ranges` slices; r <= kMaxColRank.
template <typename scalar_t, typename acc_t>
void gated_backward_v2(const at::Tensor& GS, const at::Tensor& GM, const at::Tensor& R, const at::Tensor& S,
                       const at::Tensor& w, const at::Tensor& gw, const at::Tensor& dw, const at::Tensor& uw,
                       double eps, double gate_snap, const ColLaunch& launch, at::Tensor& dR, at::Tensor& dS,
                       at::Tensor& d_w, at::Tensor& d_gate, at::Tensor& d_down, at::Tensor& d_up_t) {
  const int64_t d = R.size(-1), M = R.numel() / d, r = dw.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* sp = S.defined() ? S.data_ptr<scalar_t>() : nullptr;
  const at::Tensor ut = uw.t().contiguous();  // (r, d): pass 1 reads it along d, coalesced
  dispatch_rank_bucket(rank_bucket(r), [&](auto bucket) {
    constexpr int Rk = decltype(bucket)::value;
    at::Tensor stats = at::empty({M, kStatsWidth<Rk>}, R.options().dtype(acc_dtype(R.scalar_type())));
    gated_backward_stats_kernel<scalar_t, acc_t, Rk><<<warp_row_grid(M), kRowWarps * kWarp, 0, stream>>>(
        GS.data_ptr<scalar_t>(), GM.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), sp, w.data_ptr<scalar_t>(),
        gw.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), ut.data_ptr<scalar_t>(), stats.data_ptr<acc_t>(), M, d,
        r, static_cast<acc_t>(eps), static_cast<acc_t>(gate_snap));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gated_backward_cols_kernel<scalar_t, acc_t, Rk><<<launch.grid, kColThreads, 0, stream>>>(
        GS.data_ptr<scalar_t>(), GM.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), sp, w.data_ptr<scalar_t>(),
        gw.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), stats.data_ptr<acc_t>(), dR.data_ptr<scalar_t>(),
        sp != nullptr ? dS.data_ptr<scalar_t>() : nullptr, d_w.data_ptr<acc_t>(), d_gate.data_ptr<acc_t>(),
        d_down.data_ptr<acc_t>(), d_up_t.data_ptr<acc_t>(), M, d, r, launch.rows, static_cast<acc_t>(gate_snap));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_update_backward_cuda(const at::Tensor& grad_new_state, const at::Tensor& grad_memory,
                           const at::Tensor& readout, const c10::optional<at::Tensor>& state,
                           const at::Tensor& norm_weight, const at::Tensor& gate_weight,
                           const at::Tensor& down, const at::Tensor& up, double eps,
                           double gate_snap) {
  check_gated_update_backward_args("gated_update_backward", grad_new_state, grad_memory, readout, state,
                                   norm_weight, gate_weight, down, up, eps, gate_snap);
  const int64_t M = readout.size(0) * readout.size(1), d = readout.size(2), r = down.size(0);
  const bool has_state = state.has_value();
  const auto acc_opts = readout.options().dtype(acc_dtype(readout.scalar_type()));
  const c10::cuda::CUDAGuard guard(readout.device());  // before row_grid / col_launch: they ask this device for its SMs
  const bool v2 = M > 0 && rank_bucket(r) > 0 && row_v2();
  const ColLaunch launch = v2 ? col_launch(M, d) : ColLaunch{};
  // v1 adds into its per-block partials (zeros); v2 writes every partial once
  const int64_t parts = v2 ? launch.ranges : row_grid(M);
  const auto make = [&](at::IntArrayRef size) { return v2 ? at::empty(size, acc_opts) : at::zeros(size, acc_opts); };
  at::Tensor dR = at::empty(readout.sizes(), readout.options());
  at::Tensor dS = has_state ? at::empty(readout.sizes(), readout.options()) : at::empty({0}, readout.options());
  at::Tensor d_w = make({parts, d}), d_gate = make({parts, 2 * d});
  at::Tensor d_down = make({parts, r, d}), d_up_t = make({parts, r, d});
  if (M > 0) {
    const at::Tensor R = readout.contiguous(), GS = grad_new_state.contiguous(), GM = grad_memory.contiguous();
    const at::Tensor S = has_state ? state->contiguous() : at::Tensor();
    const at::Tensor w = norm_weight.contiguous(), gw = gate_weight.contiguous();
    const at::Tensor dw = down.contiguous(), uw = up.contiguous();
    COMET_DISPATCH_FLOATING(readout.scalar_type(), "gated_update_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (v2) {
        gated_backward_v2<scalar_t, acc_t>(GS, GM, R, S, w, gw, dw, uw, eps, gate_snap, launch, dR, dS, d_w, d_gate,
                                           d_down, d_up_t);
        return;
      }
      const size_t smem = row_smem<acc_t>(d, 3, r, 2);
      auto kernel = gated_backward_kernel<scalar_t, acc_t>;
      allow_smem(reinterpret_cast<const void*>(kernel), smem, "gated_update_backward", "hidden size d=", d,
                 " in ", readout.scalar_type());
      kernel<<<static_cast<unsigned>(parts), kRowThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
          GS.data_ptr<scalar_t>(), GM.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(),
          has_state ? S.data_ptr<scalar_t>() : nullptr, w.data_ptr<scalar_t>(),
          gw.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), uw.data_ptr<scalar_t>(),
          dR.data_ptr<scalar_t>(), has_state ? dS.data_ptr<scalar_t>() : nullptr,
          d_w.data_ptr<acc_t>(), d_gate.data_ptr<acc_t>(), d_down.data_ptr<acc_t>(),
          d_up_t.data_ptr<acc_t>(), M, d, r, static_cast<acc_t>(eps), static_cast<acc_t>(gate_snap));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dt = readout.scalar_type();
  return {dR, dS, d_w.sum(0).to(dt), d_gate.sum(0).view({1, 2 * d}).to(dt), d_down.sum(0).to(dt),
          d_up_t.sum(0).t().contiguous().to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(comet, CUDA, m) {
  m.impl("gated_update", &gated_update_cuda);
  m.impl("gated_update_backward", &gated_update_backward_cuda);
}

}  // namespace comet::cuda
