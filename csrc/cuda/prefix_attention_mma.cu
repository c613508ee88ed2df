// prefix_attention on tensor cores: FlashAttention-2-style kernels built on
// mma.sync.m16n8k16 (bf16 / fp16 inputs, fp32 accumulation), sm_80+.
//
// Forward: a block of 4 warps owns 64 query rows of one (batch, head), each
// warp 16 rows whose Q fragments stay in registers; it walks 64-key tiles of K
// and V through shared memory up to the last key its last valid row sees
// (fully masked tiles are never loaded), with the online softmax in registers:
// the score accumulator of S = Q K^T is re-packed in place as the A operand of
// O += P V. Writes out and the log-sum-exp.
//
// Backward: a block owns 64 keys of one (batch, kv head), each warp 16 of them,
// and walks every query tile of every q head of its GQA group that sees them:
// S^T = K Q^T and dP^T = V dO^T, P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta);
// dV += P^T dO and dK += dS^T Q accumulate in registers (so the GQA reduction
// needs no atomics); dQ += dS K goes through shared memory and fp32 atomics.
//
// Mask, per sample b (ql = q_lens[b], kl = k_lens[b], both clamped to the
// tensor sizes): query i < ql sees key j < kl iff j <= kl - ql + i.
//
// Fragment layouts of m16n8k16 (g = lane / 4, t = lane % 4): A (16 x 16, row
// major) a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..), a3 = (g + 8,
// 2t + 8..); B (16 x 8) b0 = (k 2t..2t+1, n g), b1 = (k 2t + 8.., n g); C (16 x 8,
// fp32) c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..). Two adjacent C tiles of a
// 16-row strip are exactly one A fragment over their 16 columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/prefix_attention_mma.h"

namespace comet::cuda {
namespace {

constexpr int kTile = 64;                 // query rows (forward) / keys (backward) per block; the other side's tile
constexpr int kMmaWarps = kTile / 16;     // a warp owns 16 rows of the block's tile
constexpr int kThreads = kMmaWarps * kWarp;
constexpr int kPad = 8;                   // elements of padding per shared row: rows two apart hit other banks
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct RowStrides {
  int64_t b, s, h;  // batch, row, head strides in elements (the last dim is contiguous)
};

RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct Shape {
  int64_t B, N, K, Hq, Hkv;
  AttentionLengths lens;
};

__device__ __forceinline__ void sample_lengths(const Shape& p, int64_t b, int64_t& ql, int64_t& kl) {
  ql = p.lens.q_lens != nullptr ? min(max(p.lens.q_lens[b], int64_t(0)), p.N) : p.N;
  kl = p.lens.k_lens != nullptr ? min(max(p.lens.k_lens[b], int64_t(0)), p.K) : p.K;
}

// Keys visible to query i (i < ql): [0, visible_end).
__device__ __forceinline__ int64_t visible_end(int64_t i, int64_t off, int64_t kl) {
  return min(max(off + i + 1, int64_t(0)), kl);
}

// The two 16-bit element types, as raw bits in shared memory and registers.
template <typename T>
struct Bits {
  static_assert(std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>, "bf16 or fp16 only");
  static constexpr bool kHalf = std::is_same_v<T, at::Half>;

  // Two floats rounded to T, the first in the low half (the lower column of a fragment pair).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t bits;
    if constexpr (kHalf) {
      const __half2 v = __floats2half2_rn(lo, hi);
      memcpy(&bits, &v, sizeof(bits));
    } else {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      memcpy(&bits, &v, sizeof(bits));
    }
    return bits;
  }

  // c += a * b on one m16n8k16 tile, fp32 accumulators.
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // the host never launches these kernels below sm_80
#else
#define COMET_MMA_M16N8K16(type)                                                                      \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type                                 \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                          \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
    if constexpr (kHalf) COMET_MMA_M16N8K16("f16");
    else COMET_MMA_M16N8K16("bf16");
#undef COMET_MMA_M16N8K16
#endif
  }
};

// Two consecutive elements of a shared row (4-byte aligned) as one register.
__device__ __forceinline__ uint32_t pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Elements (r, c) and (r + 1, c) of a shared tile with row length ld: a B
// fragment register of a row-major operand read along its rows.
__device__ __forceinline__ uint32_t column_pair(const uint16_t* tile, int ld, int r, int c) {
  return uint32_t(tile[r * ld + c]) | (uint32_t(tile[(r + 1) * ld + c]) << 16);
}

// Rows [0, kTile) of a (rows, D) slab starting at `base` (row stride `stride`
// elements, rows 16-byte aligned) into a (kTile, D + kPad) shared tile; rows at
// or past `valid` become zeros.
template <int D>
__device__ __forceinline__ void load_tile(const uint16_t* base, int64_t stride, int64_t valid, uint16_t* tile) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < kTile * kChunks; e += blockDim.x) {
    const int r = e / kChunks, c = (e % kChunks) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < valid) v = *reinterpret_cast<const uint4*>(base + r * stride + c);
    *reinterpret_cast<uint4*>(tile + r * (D + kPad) + c) = v;
  }
}

// The A fragment of rows [row, row + 16) x columns [col, col + 16) of a shared tile.
__device__ __forceinline__ void load_a(const uint16_t* tile, int ld, int row, int col, uint32_t (&a)[4]) {
  const int g = threadIdx.x % kWarp / 4, t = threadIdx.x % 4;
  a[0] = pair(tile + (row + g) * ld + col + 2 * t);
  a[1] = pair(tile + (row + g + 8) * ld + col + 2 * t);
  a[2] = pair(tile + (row + g) * ld + col + 2 * t + 8);
  a[3] = pair(tile + (row + g + 8) * ld + col + 2 * t + 8);
}

// The A fragment of 16 columns of two adjacent fp32 C tiles, rounded to T.
template <typename T>
__device__ __forceinline__ void c_to_a(const float (&lo)[4], const float (&hi)[4], uint32_t (&a)[4]) {
  a[0] = Bits<T>::pack(lo[0], lo[1]);
  a[1] = Bits<T>::pack(lo[2], lo[3]);
  a[2] = Bits<T>::pack(hi[0], hi[1]);
  a[3] = Bits<T>::pack(hi[2], hi[3]);
}

// One key tile of the online softmax, after the scores s (log2 units, -inf where masked) and
// this lane's part of each row's maximum mx: finishes the maxima over the quad, rescales the
// running sums l and outputs o by exp2(m_old - m_new), and turns s into the probabilities.
template <int D>
__device__ __forceinline__ void online_softmax_tile(float (&s)[kTile / 8][4], float (&mx)[2], float (&m)[2],
                                                    float (&l)[2], float (&o)[D / 8][4]) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // a row's 64 scores live in the 4 lanes of one quad
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m[r], mx[r]);
    alpha[r] = m_new == neg_inf ? 1.f : exp2f(m[r] - m_new);  // exp2(-inf) = 0 for a first visible tile
    m[r] = m_new;
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = s[nt][e] == neg_inf ? 0.f : exp2f(s[nt][e] - m[e / 2]);
      l[e / 2] += s[nt][e];  // this lane's part of the row sum; the quad is summed at the end
    }
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    o[dn][0] *= alpha[0];
    o[dn][1] *= alpha[0];
    o[dn][2] *= alpha[1];
    o[dn][3] *= alpha[1];
  }
}

// ------------------------------------------------------------------ forward

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    mma_forward_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                       const uint16_t* __restrict__ v, uint16_t* __restrict__ out,  // (B, N, Hq, D)
                       float* __restrict__ lse,                                     // (B, Hq, N)
                       RowStrides sq, RowStrides sk, RowStrides sv, Shape p, float scale) {
  constexpr int LD = D + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem_raw);  // (kTile, LD)
  uint16_t* k_s = q_s + kTile * LD;
  uint16_t* v_s = k_s + kTile * LD;
  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = int64_t(blockIdx.x) * kTile;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int warp = threadIdx.x / kWarp, g = threadIdx.x % kWarp / 4, t = threadIdx.x % 4;
  int64_t ql, kl;
  sample_lengths(p, b, ql, kl);
  const int64_t off = kl - ql;
  const int64_t last = min(i0 + kTile, ql) - 1;
  const int64_t key_end = last >= i0 ? visible_end(last, off, kl) : 0;

  load_tile<D>(q + b * sq.b + i0 * sq.s + h * sq.h, sq.s, p.N - i0, q_s);
  __syncthreads();
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) load_a(q_s, LD, warp * 16, kt * 16, qa[kt]);

  // This thread's two rows: c0, c1 belong to row i[0], c2, c3 to row i[1].
  const int64_t rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  int64_t ends[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) ends[r] = rows[r] < ql ? visible_end(rows[r], off, kl) : 0;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float scale2 = scale * kLog2e;  // scores in log2 units: exp2 is one instruction
  float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;

  const uint16_t* kb = k + b * sk.b + hk * sk.h;
  const uint16_t* vb = v + b * sv.b + hk * sv.h;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();  // every warp is done with the previous tile
    load_tile<D>(kb + j0 * sk.s, sk.s, key_end - j0, k_s);
    load_tile<D>(vb + j0 * sv.s, sv.s, key_end - j0, v_s);
    __syncthreads();

    float s[kTile / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kt = 0; kt < D / 16; ++kt) {
        const uint16_t* kr = k_s + (nt * 8 + g) * LD + kt * 16 + 2 * t;
        Bits<T>::mma(s[nt], qa[kt], pair(kr), pair(kr + 8));
      }
    }
    float mx[2] = {neg_inf, neg_inf};
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + nt * 8 + 2 * t + (e & 1);
        s[nt][e] = j < ends[e / 2] ? s[nt][e] * scale2 : neg_inf;
        mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
      }
    online_softmax_tile<D>(s, mx, m, l, o);
#pragma unroll
    for (int kt = 0; kt < kTile / 16; ++kt) {
      uint32_t pa[4];
      c_to_a<T>(s[2 * kt], s[2 * kt + 1], pa);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const int kr = kt * 16 + 2 * t, c = dn * 8 + g;
        Bits<T>::mma(o[dn], pa, column_pair(v_s, LD, kr, c), column_pair(v_s, LD, kr + 8, c));
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int64_t i = rows[r];
    if (i >= p.N) continue;
    // l == 0: the row saw no key. l is NaN when a score was (NaN in q or a visible key): NaN
    // then reaches out and lse, as on the CPU, instead of passing for a row that saw nothing.
    // A row that saw nothing writes zeros, not o * 0: its tile's P.V may hold 0 * NaN.
    const bool seen = i < ql && l[r] != 0.f;
    const float inv = seen ? 1.f / l[r] : 0.f;
    uint16_t* orow = out + ((b * p.N + i) * p.Hq + h) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<uint32_t*>(orow + dn * 8 + 2 * t) =
          Bits<T>::pack(seen ? o[dn][2 * r] * inv : 0.f, seen ? o[dn][2 * r + 1] * inv : 0.f);
    if (t == 0) lse[(b * p.Hq + h) * p.N + i] = seen ? m[r] * kLn2 + logf(l[r]) : neg_inf;
  }
}

// ------------------------------------------------------------------ v2 forward
//
// The same algorithm as mma_forward_kernel, fed faster (COMET_MMA_KERNELS=v2): K / V tiles stream in
// through cp.async into two stages of shared memory (tile j + 1 loads while
// tile j is computed; the Q tile borrows stage 1 until its fragments are in
// registers), every fragment comes out of shared memory through ldmatrix (V
// transposed on the way), tiles wholly below every row's diagonal skip the
// mask, warps with no valid row skip the math, and the longest query tiles run
// first. When the grid would not fill the GPU (decode: one query row over a
// long key range) each query tile's keys are split across `splits` blocks whose
// partial outputs and log-sum-exps merge_splits_kernel combines.

[[maybe_unused]] __device__ __forceinline__ uint32_t shared_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements; lane l points at row l % 8 of matrix l / 8,
// and register m of every lane holds its (row g, columns 2t..2t+1) of matrix m —
// with kTrans, of the transposed matrix.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#else
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_addr(row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_addr(row)));
#endif
}

// 16 bytes global -> shared, bypassing registers; 16 zeros when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(uint16_t* dst, const uint16_t* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// load_tile through cp.async: rows [0, kTile) of a (rows, D) slab into a (kTile, D + kPad)
// shared tile, rows at or past `valid` zero-filled. The copies join the thread's current
// cp.async group: they have landed after a cp_async_wait<N> that leaves at most N later groups.
template <int D>
__device__ __forceinline__ void load_tile_async(const uint16_t* base, int64_t stride, int64_t valid,
                                                uint16_t* tile) {
  constexpr int kChunks = D / 8;
  for (int e = threadIdx.x; e < kTile * kChunks; e += blockDim.x) {
    const int r = e / kChunks, c = (e % kChunks) * 8;
    const bool ok = r < valid;
    cp_async16(tile + r * (D + kPad) + c, base + (ok ? r * stride : 0) + c, ok);
  }
}

// splits == 1: writes out (B, N, Hq, D) and lse (B, Hq, N) like mma_forward_kernel.
// splits > 1: block x covers query tile x / splits and the x % splits-th share of its key tiles,
// and writes its normalised partial output and log-sum-exp to part_out (splits, B * Hq * N, D)
// and part_lse (splits, B * Hq * N) for merge_splits_kernel.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    mma_forward_v2_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                                 const uint16_t* __restrict__ v, uint16_t* __restrict__ out,
                                 float* __restrict__ lse, float* __restrict__ part_out,
                                 float* __restrict__ part_lse, int splits, RowStrides sq, RowStrides sk,
                                 RowStrides sv, Shape p, float scale) {
  constexpr int LD = D + kPad, kTileElems = kTile * LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* const smem = reinterpret_cast<uint16_t*>(smem_raw);  // stage s: K at 2s, V at 2s + 1 tiles
  const int tiles_q = gridDim.x / splits, split = blockIdx.x % splits;
  const int64_t i0 = int64_t(tiles_q - 1 - int(blockIdx.x) / splits) * kTile;  // the longest rows first
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, g = lane / 4, t = lane % 4;
  int64_t ql, kl;
  sample_lengths(p, b, ql, kl);
  const int64_t off = kl - ql;
  const int64_t last = min(i0 + kTile, ql) - 1;
  const int64_t key_end = last >= i0 ? visible_end(last, off, kl) : 0;
  // This split's key tiles: tiles * split / splits up to the next split's first (balanced: equal
  // ceil-sized shares would leave the last splits short or empty, 64 tiles over 9 splits as 8 x 8).
  const int64_t tiles = (key_end + kTile - 1) / kTile;
  const int64_t j_begin = tiles * split / splits * kTile, j_end = min(key_end, tiles * (split + 1) / splits * kTile);
  const uint16_t* kb = k + b * sk.b + hk * sk.h;
  const uint16_t* vb = v + b * sv.b + hk * sv.h;

  uint16_t* q_s = smem + 2 * kTileElems;  // stage 1's K tile, free until the loop's first prefetch
  load_tile_async<D>(q + b * sq.b + i0 * sq.s + h * sq.h, sq.s, p.N - i0, q_s);
  cp_async_commit();
  if (j_begin < j_end) {
    load_tile_async<D>(kb + j_begin * sk.s, sk.s, key_end - j_begin, smem);
    load_tile_async<D>(vb + j_begin * sv.s, sv.s, key_end - j_begin, smem + kTileElems);
  }
  cp_async_commit();
  cp_async_wait<1>();  // the Q tile has landed (the first K / V tile may still be in flight)
  __syncthreads();
  // ldmatrix row addresses: lane l serves row l % 8 of matrix l / 8.
  const int lrow = lane % 8, lmat = lane / 8;
  uint32_t qa[D / 16][4];  // A: matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15), row half first
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt)
    ldmatrix_x4<false>(qa[kt], q_s + (warp * 16 + (lmat & 1) * 8 + lrow) * LD + kt * 16 + (lmat >> 1) * 8);
  __syncthreads();  // every warp holds its Q fragments: stage 1 may be overwritten

  const int64_t rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  int64_t ends[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) ends[r] = rows[r] < ql ? visible_end(rows[r], off, kl) : 0;
  // Every valid row of the block sees keys [0, mask_from): a tile inside needs no mask. Rows past
  // ql compute unmasked scores that are never written.
  const int64_t mask_from = i0 < ql ? visible_end(i0, off, kl) : 0;
  const bool warp_live = i0 + warp * 16 < ql;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float scale2 = scale * kLog2e;
  float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;

  int stage = 0;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTile, stage ^= 1) {
    if (j0 + kTile < j_end) {  // prefetch the next tile into the other stage
      uint16_t* next = smem + 2 * (stage ^ 1) * kTileElems;
      load_tile_async<D>(kb + (j0 + kTile) * sk.s, sk.s, key_end - j0 - kTile, next);
      load_tile_async<D>(vb + (j0 + kTile) * sv.s, sv.s, key_end - j0 - kTile, next + kTileElems);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile has landed
    __syncthreads();
    if (warp_live) {
      const uint16_t* k_s = smem + 2 * stage * kTileElems;
      const uint16_t* v_s = k_s + kTileElems;
      float s[kTile / 8][4];
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kt = 0; kt < D / 16; ++kt)
#pragma unroll
        for (int np = 0; np < kTile / 16; ++np) {  // B: (keys 0-7 | 8-15) x (d 0-7 | 8-15), d half first
          uint32_t kf[4];
          ldmatrix_x4<false>(kf, k_s + (np * 16 + (lmat >> 1) * 8 + lrow) * LD + kt * 16 + (lmat & 1) * 8);
          Bits<T>::mma(s[2 * np], qa[kt], kf[0], kf[1]);
          Bits<T>::mma(s[2 * np + 1], qa[kt], kf[2], kf[3]);
        }
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= scale2;
      if (j0 + kTile > mask_from) {
        int lim[2];  // columns of this tile row r sees: [0, lim[r])
#pragma unroll
        for (int r = 0; r < 2; ++r) lim[r] = int(min(max(ends[r] - j0, int64_t(0)), int64_t(kTile)));
#pragma unroll
        for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (nt * 8 + 2 * t + (e & 1) >= lim[e / 2]) s[nt][e] = neg_inf;
      }
      float mx[2] = {neg_inf, neg_inf};
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
      online_softmax_tile<D>(s, mx, m, l, o);
#pragma unroll
      for (int kt = 0; kt < kTile / 16; ++kt) {
        uint32_t pa[4];
        c_to_a<T>(s[2 * kt], s[2 * kt + 1], pa);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {  // B = V^T: (keys 0-7 | 8-15) x (d 0-7 | 8-15), key half first
          uint32_t vf[4];
          ldmatrix_x4<true>(vf, v_s + (kt * 16 + (lmat & 1) * 8 + lrow) * LD + dp * 16 + (lmat >> 1) * 8);
          Bits<T>::mma(o[2 * dp], pa, vf[0], vf[1]);
          Bits<T>::mma(o[2 * dp + 1], pa, vf[2], vf[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  const int64_t rows_total = p.B * p.Hq * p.N;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int64_t i = rows[r];
    if (i >= p.N) continue;
    // unseen rows write zeros, whatever their registers hold; a NaN l (a NaN score) is seen and
    // poisons the row, as in v1 and on the CPU
    const bool seen = i < ql && l[r] != 0.f;
    const float inv = seen ? 1.f / l[r] : 0.f;
    const float row_lse = seen ? m[r] * kLn2 + logf(l[r]) : neg_inf;
    const int64_t row = (b * p.Hq + h) * p.N + i;
    if (splits == 1) {
      uint16_t* orow = out + ((b * p.N + i) * p.Hq + h) * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn)
        *reinterpret_cast<uint32_t*>(orow + dn * 8 + 2 * t) =
            Bits<T>::pack(seen ? o[dn][2 * r] * inv : 0.f, seen ? o[dn][2 * r + 1] * inv : 0.f);
      if (t == 0) lse[row] = row_lse;
    } else {
      float* orow = part_out + (split * rows_total + row) * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn)
        *reinterpret_cast<float2*>(orow + dn * 8 + 2 * t) =
            make_float2(seen ? o[dn][2 * r] * inv : 0.f, seen ? o[dn][2 * r + 1] * inv : 0.f);
      if (t == 0) part_lse[split * rows_total + row] = row_lse;
    }
  }
}

// out = sum_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s: one warp per (b, h, i).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    merge_splits_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse, int splits,
                        T* __restrict__ out, float* __restrict__ lse, Shape p) {
  const int64_t rows_total = p.B * p.Hq * p.N;
  const int64_t row = int64_t(blockIdx.x) * kMmaWarps + threadIdx.x / kWarp;  // (b * Hq + h) * N + i
  if (row >= rows_total) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = row % p.N, h = row / p.N % p.Hq, b = row / (p.N * p.Hq);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float top = neg_inf;
  bool poisoned = false;  // a split met a NaN score: so does the row (fmaxf alone would skip it)
  for (int s = 0; s < splits; ++s) {
    const float part = part_lse[s * rows_total + row];
    poisoned |= isnan(part);
    top = fmaxf(top, part);
  }
  T* dst = out + ((b * p.N + i) * p.Hq + h) * D;
  if (poisoned) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int c = lane; c < D; c += kWarp) dst[c] = static_cast<T>(nan);
    if (lane == 0) lse[row] = nan;
    return;
  }
  constexpr int kPerLane = (D + kWarp - 1) / kWarp;
  float acc[kPerLane] = {};
  float total = 0.f;
  if (top != neg_inf) {
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f((part_lse[s * rows_total + row] - top) * kLog2e);  // 0 for a split that saw nothing
      total += w;
      const float* src = part_out + (s * rows_total + row) * D;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e)
        if (lane + e * kWarp < D) acc[e] += w * src[lane + e * kWarp];
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e)
    if (lane + e * kWarp < D) dst[lane + e * kWarp] = static_cast<T>(acc[e] * inv);
  if (lane == 0) lse[row] = total > 0.f ? top + logf(total) : neg_inf;
}

// ------------------------------------------------------------------ backward

// The backward's shared memory: K, V (the block's keys), Q, dO (a query tile) as (kTile, LD)
// tiles, dS^T (kTile keys, LDS), and the query tile's lse (log2 units) and delta.
template <int D>
struct BackwardSmem {
  static constexpr int LD = D + kPad, LDS = kTile + kPad;
  static constexpr size_t kBytes = sizeof(uint16_t) * (4 * kTile * LD + kTile * LDS) + sizeof(float) * 2 * kTile;
  uint16_t *k, *v, *q, *dout, *ds;
  float *lse, *delta;

  __device__ __forceinline__ explicit BackwardSmem(unsigned char* raw)
      : k(reinterpret_cast<uint16_t*>(raw)), v(k + kTile * LD), q(v + kTile * LD), dout(q + kTile * LD),
        ds(dout + kTile * LD), lse(reinterpret_cast<float*>(ds + kTile * LDS)), delta(lse + kTile) {}
};

// The lse (to log2 units) and delta of query rows [i0, i0 + kTile) of one (b, h) into shared
// memory, zeros past ql. lse_row / delta_row point at the (b, h) row of (B, Hq, N).
__device__ __forceinline__ void stage_lse_delta(const float* lse_row, const float* delta_row, int64_t i0,
                                                int64_t ql, float* lse_s, float* delta_s) {
  for (int e = threadIdx.x; e < kTile; e += blockDim.x) {
    const bool valid = i0 + e < ql;
    lse_s[e] = valid ? lse_row[i0 + e] * kLog2e : 0.f;
    delta_s[e] = valid ? delta_row[i0 + e] : 0.f;
  }
}

// This thread's dS^T accumulators, rounded to T, into shared memory at row (its key g of the
// warp's 16), column 2t; the key g + 8 lands 8 rows further.
template <typename T>
__device__ __forceinline__ void store_ds_t(const float (&dpt)[kTile / 8][4], uint16_t* row) {
  constexpr int LDS = kTile + kPad;
#pragma unroll
  for (int nt = 0; nt < kTile / 8; ++nt) {
    *reinterpret_cast<uint32_t*>(row + nt * 8) = Bits<T>::pack(dpt[nt][0], dpt[nt][1]);
    *reinterpret_cast<uint32_t*>(row + nt * 8 + 8 * LDS) = Bits<T>::pack(dpt[nt][2], dpt[nt][3]);
  }
}

// This thread's dK (times scale) and dV accumulators of its two keys to (B, K, Hkv, D). Keys
// past key_end (no query sees them) write zeros: their sums hold 0 * dO, NaN where a row's dO is.
template <typename T, int D>
__device__ __forceinline__ void write_dk_dv(const float (&dk_r)[D / 8][4], const float (&dv_r)[D / 8][4],
                                            const int64_t (&keys)[2], int64_t key_end, int64_t b, int64_t hk,
                                            const Shape& p, float scale, uint16_t* dk, uint16_t* dv) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = keys[r];
    if (j >= p.K) continue;
    const bool seen = j < key_end;  // 0u: the bits of +0 in bf16 and fp16
    const int64_t base = ((b * p.K + j) * p.Hkv + hk) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const float* dkj = &dk_r[dn][2 * r];
      const float* dvj = &dv_r[dn][2 * r];
      *reinterpret_cast<uint32_t*>(dk + base + dn * 8 + 2 * t) =
          seen ? Bits<T>::pack(dkj[0] * scale, dkj[1] * scale) : 0u;
      *reinterpret_cast<uint32_t*>(dv + base + dn * 8 + 2 * t) = seen ? Bits<T>::pack(dvj[0], dvj[1]) : 0u;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    mma_backward_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                        const uint16_t* __restrict__ v, const uint16_t* __restrict__ dout,
                        const float* __restrict__ lse, const float* __restrict__ delta,  // (B, Hq, N)
                        float* __restrict__ dq_acc,                                       // (B, N, Hq, D)
                        uint16_t* __restrict__ dk, uint16_t* __restrict__ dv,             // (B, K, Hkv, D)
                        RowStrides sq, RowStrides sk, RowStrides sv, RowStrides sdo, Shape p, float scale) {
  constexpr int LD = BackwardSmem<D>::LD, LDS = BackwardSmem<D>::LDS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BackwardSmem<D> sm(smem_raw);
  uint16_t *k_s = sm.k, *v_s = sm.v, *q_s = sm.q, *do_s = sm.dout, *ds_s = sm.ds;
  float *lse_s = sm.lse, *delta_s = sm.delta;
  const int64_t b = blockIdx.z, hk = blockIdx.y, j0 = int64_t(blockIdx.x) * kTile;
  const int64_t group = p.Hq / p.Hkv;
  const int warp = threadIdx.x / kWarp, g = threadIdx.x % kWarp / 4, t = threadIdx.x % 4;
  int64_t ql, kl;
  sample_lengths(p, b, ql, kl);
  const int64_t off = kl - ql;
  // Keys past the last one any query sees keep zero gradients.
  const int64_t key_end = ql > 0 ? visible_end(ql - 1, off, kl) : 0;
  const float scale2 = scale * kLog2e;
  // This thread's two keys: c0, c1 of an S^T tile belong to key j[0], c2, c3 to j[1].
  const int64_t keys[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
  float dk_r[D / 8][4], dv_r[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_r[dn][e] = dv_r[dn][e] = 0.f;

  if (j0 < key_end) {
    load_tile<D>(k + b * sk.b + j0 * sk.s + hk * sk.h, sk.s, key_end - j0, k_s);
    load_tile<D>(v + b * sv.b + j0 * sv.s + hk * sv.h, sv.s, key_end - j0, v_s);
    const int64_t i_start = max(int64_t(0), j0 - off);  // the first query that sees key j0
    for (int64_t hg = 0; hg < group; ++hg) {
      const int64_t h = hk * group + hg;
      const int64_t lrow = (b * p.Hq + h) * p.N;
      for (int64_t i0 = i_start; i0 < ql; i0 += kTile) {
        __syncthreads();  // the previous tile's Q, dO, lse and dS^T are no longer read
        load_tile<D>(q + b * sq.b + i0 * sq.s + h * sq.h, sq.s, ql - i0, q_s);
        load_tile<D>(dout + b * sdo.b + i0 * sdo.s + h * sdo.h, sdo.s, ql - i0, do_s);
        stage_lse_delta(lse + lrow, delta + lrow, i0, ql, lse_s, delta_s);
        __syncthreads();

        float st[kTile / 8][4], dpt[kTile / 8][4];
#pragma unroll
        for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
        for (int kt = 0; kt < D / 16; ++kt) {
          uint32_t ka[4], va[4];
          load_a(k_s, LD, warp * 16, kt * 16, ka);
          load_a(v_s, LD, warp * 16, kt * 16, va);
#pragma unroll
          for (int nt = 0; nt < kTile / 8; ++nt) {
            const uint16_t* qr = q_s + (nt * 8 + g) * LD + kt * 16 + 2 * t;
            const uint16_t* dr = do_s + (nt * 8 + g) * LD + kt * 16 + 2 * t;
            Bits<T>::mma(st[nt], ka, pair(qr), pair(qr + 8));
            Bits<T>::mma(dpt[nt], va, pair(dr), pair(dr + 8));
          }
        }
#pragma unroll
        for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * t + (e & 1);
            const int64_t i = i0 + col;
            const bool visible = i < ql && keys[e / 2] < visible_end(i, off, kl);
            const float pr = visible ? exp2f(st[nt][e] * scale2 - lse_s[col]) : 0.f;
            st[nt][e] = pr;
            dpt[nt][e] = pr * (dpt[nt][e] - delta_s[col]);
          }
        // dS^T to shared memory for dQ, and dV += P^T dO, dK += dS^T Q (k = the 64 queries).
        store_ds_t<T>(dpt, ds_s + (warp * 16 + g) * LDS + 2 * t);
#pragma unroll
        for (int kt = 0; kt < kTile / 16; ++kt) {
          uint32_t pa[4], da[4];
          c_to_a<T>(st[2 * kt], st[2 * kt + 1], pa);
          c_to_a<T>(dpt[2 * kt], dpt[2 * kt + 1], da);
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn) {
            const int qr = kt * 16 + 2 * t, c = dn * 8 + g;
            Bits<T>::mma(dv_r[dn], pa, column_pair(do_s, LD, qr, c), column_pair(do_s, LD, qr + 8, c));
            Bits<T>::mma(dk_r[dn], da, column_pair(q_s, LD, qr, c), column_pair(q_s, LD, qr + 8, c));
          }
        }
        __syncthreads();  // dS^T complete

        // dQ rows [i0 + 16 warp, +16) += dS K over this block's keys: A = (dS^T)^T.
        uint32_t dsa[kTile / 16][4];
#pragma unroll
        for (int kt = 0; kt < kTile / 16; ++kt) {
          const int qc = warp * 16 + g, kr = kt * 16 + 2 * t;
          dsa[kt][0] = column_pair(ds_s, LDS, kr, qc);
          dsa[kt][1] = column_pair(ds_s, LDS, kr, qc + 8);
          dsa[kt][2] = column_pair(ds_s, LDS, kr + 8, qc);
          dsa[kt][3] = column_pair(ds_s, LDS, kr + 8, qc + 8);
        }
        const int64_t qrows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int kt = 0; kt < kTile / 16; ++kt) {
            const int kr = kt * 16 + 2 * t, col = dn * 8 + g;
            Bits<T>::mma(c, dsa[kt], column_pair(k_s, LD, kr, col), column_pair(k_s, LD, kr + 8, col));
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (qrows[r] >= ql) continue;
            float* dst = dq_acc + ((b * p.N + qrows[r]) * p.Hq + h) * D + dn * 8 + 2 * t;
            atomicAdd(dst, c[2 * r]);
            atomicAdd(dst + 1, c[2 * r + 1]);
          }
        }
      }
    }
  }

  write_dk_dv<T, D>(dk_r, dv_r, keys, key_end, b, hk, p, scale, dk, dv);
}

// The backward with its fragments fed by ldmatrix (Q, dO and K transposed on the way where they
// are B operands along their rows; dS^T transposed for dQ) instead of 16-bit shared loads, tiles
// whose (query, key) pairs are all visible skip the mask, and the mask of the others is worked out
// in 32-bit tile coordinates. Same block layout, outputs and atomics as mma_backward_kernel.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    mma_backward_v2_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                           const uint16_t* __restrict__ v, const uint16_t* __restrict__ dout,
                           const float* __restrict__ lse, const float* __restrict__ delta,  // (B, Hq, N)
                           float* __restrict__ dq_acc,                                       // (B, N, Hq, D)
                           uint16_t* __restrict__ dk, uint16_t* __restrict__ dv,             // (B, K, Hkv, D)
                           RowStrides sq, RowStrides sk, RowStrides sv, RowStrides sdo, Shape p, float scale) {
  constexpr int LD = BackwardSmem<D>::LD, LDS = BackwardSmem<D>::LDS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BackwardSmem<D> sm(smem_raw);
  uint16_t *k_s = sm.k, *v_s = sm.v, *q_s = sm.q, *do_s = sm.dout, *ds_s = sm.ds;
  float *lse_s = sm.lse, *delta_s = sm.delta;
  const int64_t b = blockIdx.z, hk = blockIdx.y, j0 = int64_t(blockIdx.x) * kTile;
  const int64_t group = p.Hq / p.Hkv;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, g = lane / 4, t = lane % 4;
  const int lrow = lane % 8, lmat = lane / 8;  // ldmatrix: lane l serves row l % 8 of matrix l / 8
  int64_t ql, kl;
  sample_lengths(p, b, ql, kl);
  const int64_t off = kl - ql;
  const int64_t key_end = ql > 0 ? visible_end(ql - 1, off, kl) : 0;
  const float scale2 = scale * kLog2e;
  const int64_t keys[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
  float dk_r[D / 8][4], dv_r[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_r[dn][e] = dv_r[dn][e] = 0.f;

  if (j0 < key_end) {
    load_tile_async<D>(k + b * sk.b + j0 * sk.s + hk * sk.h, sk.s, key_end - j0, k_s);
    load_tile_async<D>(v + b * sv.b + j0 * sv.s + hk * sv.h, sv.s, key_end - j0, v_s);
    cp_async_commit();
    const int64_t i_start = max(int64_t(0), j0 - off);  // the first query that sees key j0
    // In tile coordinates, query c sees key kk (both in [0, kTile)) iff c < qlim, kk < klim and
    // kk <= diag + c; diag clamped to +-2 kTile decides the same.
    const int klim = int(min(max(kl - j0, int64_t(0)), int64_t(kTile)));
    for (int64_t hg = 0; hg < group; ++hg) {
      const int64_t h = hk * group + hg;
      const int64_t lrow0 = (b * p.Hq + h) * p.N;
      for (int64_t i0 = i_start; i0 < ql; i0 += kTile) {
        __syncthreads();  // the previous tile's Q, dO, lse and dS^T are no longer read
        load_tile_async<D>(q + b * sq.b + i0 * sq.s + h * sq.h, sq.s, ql - i0, q_s);
        load_tile_async<D>(dout + b * sdo.b + i0 * sdo.s + h * sdo.h, sdo.s, ql - i0, do_s);
        cp_async_commit();
        stage_lse_delta(lse + lrow0, delta + lrow0, i0, ql, lse_s, delta_s);
        cp_async_wait<0>();
        __syncthreads();
        const bool full = i0 + kTile <= ql && visible_end(i0, off, kl) >= j0 + kTile;
        const int qlim = int(min(max(ql - i0, int64_t(0)), int64_t(kTile)));
        const int diag = int(min(max(off + i0 - j0, int64_t(-2 * kTile)), int64_t(2 * kTile)));

        float st[kTile / 8][4], dpt[kTile / 8][4];
#pragma unroll
        for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
        for (int kt = 0; kt < D / 16; ++kt) {
          uint32_t ka[4], va[4];  // A: this warp's 16 keys x 16 d
          ldmatrix_x4<false>(ka, k_s + (warp * 16 + (lmat & 1) * 8 + lrow) * LD + kt * 16 + (lmat >> 1) * 8);
          ldmatrix_x4<false>(va, v_s + (warp * 16 + (lmat & 1) * 8 + lrow) * LD + kt * 16 + (lmat >> 1) * 8);
#pragma unroll
          for (int np = 0; np < kTile / 16; ++np) {  // B: Q^T / dO^T for queries 16 np.., d half first
            uint32_t qf[4], df[4];
            const int at = (np * 16 + (lmat >> 1) * 8 + lrow) * LD + kt * 16 + (lmat & 1) * 8;
            ldmatrix_x4<false>(qf, q_s + at);
            ldmatrix_x4<false>(df, do_s + at);
            Bits<T>::mma(st[2 * np], ka, qf[0], qf[1]);
            Bits<T>::mma(st[2 * np + 1], ka, qf[2], qf[3]);
            Bits<T>::mma(dpt[2 * np], va, df[0], df[1]);
            Bits<T>::mma(dpt[2 * np + 1], va, df[2], df[3]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = nt * 8 + 2 * t + (e & 1), kk = warp * 16 + g + (e / 2) * 8;
            const bool visible = full || (c < qlim && kk < klim && kk <= diag + c);
            const float pr = visible ? exp2f(st[nt][e] * scale2 - lse_s[c]) : 0.f;
            st[nt][e] = pr;
            dpt[nt][e] = pr * (dpt[nt][e] - delta_s[c]);
          }
        // dS^T to shared memory for dQ, and dV += P^T dO, dK += dS^T Q (k = the 64 queries).
        store_ds_t<T>(dpt, ds_s + (warp * 16 + g) * LDS + 2 * t);
#pragma unroll
        for (int kt = 0; kt < kTile / 16; ++kt) {
          uint32_t pa[4], da[4];
          c_to_a<T>(st[2 * kt], st[2 * kt + 1], pa);
          c_to_a<T>(dpt[2 * kt], dpt[2 * kt + 1], da);
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {  // B: dO / Q transposed, queries 16 kt.., key half first
            uint32_t df[4], qf[4];
            const int at = (kt * 16 + (lmat & 1) * 8 + lrow) * LD + dp * 16 + (lmat >> 1) * 8;
            ldmatrix_x4<true>(df, do_s + at);
            ldmatrix_x4<true>(qf, q_s + at);
            Bits<T>::mma(dv_r[2 * dp], pa, df[0], df[1]);
            Bits<T>::mma(dv_r[2 * dp + 1], pa, df[2], df[3]);
            Bits<T>::mma(dk_r[2 * dp], da, qf[0], qf[1]);
            Bits<T>::mma(dk_r[2 * dp + 1], da, qf[2], qf[3]);
          }
        }
        __syncthreads();  // dS^T complete

        // dQ rows [i0 + 16 warp, +16) += dS K over this block's keys: A = (dS^T)^T via ldmatrix.trans.
        uint32_t dsa[kTile / 16][4];
#pragma unroll
        for (int kt = 0; kt < kTile / 16; ++kt)
          ldmatrix_x4<true>(dsa[kt], ds_s + (kt * 16 + (lmat >> 1) * 8 + lrow) * LDS + warp * 16 + (lmat & 1) * 8);
        const int64_t qrows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int kt = 0; kt < kTile / 16; ++kt) {  // B: K transposed, keys 16 kt.., key half first
            uint32_t kf[4];
            ldmatrix_x4<true>(kf, k_s + (kt * 16 + (lmat & 1) * 8 + lrow) * LD + dp * 16 + (lmat >> 1) * 8);
            Bits<T>::mma(c[0], dsa[kt], kf[0], kf[1]);
            Bits<T>::mma(c[1], dsa[kt], kf[2], kf[3]);
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (qrows[r] >= ql) continue;
            float* dst = dq_acc + ((b * p.N + qrows[r]) * p.Hq + h) * D + dp * 16 + 2 * t;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              atomicAdd(dst + half * 8, c[half][2 * r]);
              atomicAdd(dst + half * 8 + 1, c[half][2 * r + 1]);
            }
          }
        }
      }
    }
  }

  write_dk_dv<T, D>(dk_r, dv_r, keys, key_end, b, hk, p, scale, dk, dv);
}

// ------------------------------------------------------------------ host side

// The kernels read rows with 16-byte loads: a view whose rows are not 16-byte
// aligned is copied once (rare: our own callers pass contiguous tensors).
at::Tensor vector_aligned(const at::Tensor& t) {
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                  t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* bits_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

template <typename F>
void mma_dispatch(const at::Tensor& q, const F& f) {
  const int64_t D = q.size(3);
  auto by_dim = [&](auto type_tag) {
    using T = decltype(type_tag);
    switch (D) {
      case 64: f(T{}, std::integral_constant<int, 64>{}); break;
      case 80: f(T{}, std::integral_constant<int, 80>{}); break;
      case 96: f(T{}, std::integral_constant<int, 96>{}); break;
      case 128: f(T{}, std::integral_constant<int, 128>{}); break;
      default: TORCH_CHECK(false, "prefix_attention: no tensor-core kernel for head_dim ", D);
    }
  };
  if (q.scalar_type() == at::kBFloat16) by_dim(at::BFloat16{});
  else by_dim(at::Half{});
}

// Which generation of tensor-core kernels runs: COMET_MMA_KERNELS=v2 picks mma_forward_v2_kernel and
// mma_backward_v2_kernel; unset or "v1" the first ones — the default until v2 has passed a GPU
// check (bench/device_check.sh runs the CUDA tests and the benchmarks with both).
bool mma_v2() {
  const char* choice = std::getenv("COMET_MMA_KERNELS");
  if (choice == nullptr || *choice == '\0' || std::strcmp(choice, "v1") == 0) return false;
  TORCH_CHECK(std::strcmp(choice, "v2") == 0, "COMET_MMA_KERNELS must be 'v1' or 'v2', got '", choice, "'");
  return true;
}

// Key splits per query tile: 1 while the grid has at least a block per SM; else enough to give
// every SM two blocks, and at most a split per 4 key tiles of K (a block whose rows see fewer keys
// than K — early query tiles, short k_lens — may get splits with few tiles or none: those write
// zeros and a -inf log-sum-exp, which the merge ignores).
int key_splits(int64_t blocks, int64_t key_tiles) {
  const int64_t sms = num_sms();
  if (blocks <= 0 || blocks >= sms) return 1;
  const int64_t want = (2 * sms + blocks - 1) / blocks;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, key_tiles / 4, 64})));
}

// Whether this build's tensor-core kernels hold real code for `device`. An sm_80+ GPU
// running a build whose arch list stops below 8.0 ("7.5+PTX") gets them JIT-compiled from the
// compute_75 PTX, where their bodies are a trap: such a build takes the CUDA-core kernels.
bool mma_kernels_compiled_for(c10::DeviceIndex device) {
  static std::atomic<int8_t> known[64] = {};  // per device: 0 not asked yet, 1 no, 2 yes
  if (device < 0 || device >= 64) return false;
  int8_t v = known[device].load(std::memory_order_relaxed);
  if (v == 0) {
    const c10::cuda::CUDAGuard guard(device);
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(
        &attributes, reinterpret_cast<const void*>(mma_forward_kernel<at::BFloat16, 128>)));
    v = attributes.ptxVersion >= 80 ? 2 : 1;
    known[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

}  // namespace

bool mma_attention_supports(const at::Tensor& q) {
  const auto dtype = q.scalar_type();
  const int64_t D = q.size(3);
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && (D == 64 || D == 80 || D == 96 || D == 128) &&
         at::cuda::getDeviceProperties(q.device().index())->major >= 8 && mma_kernels_compiled_for(q.device().index());
}

void mma_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                           AttentionLengths lens, at::Tensor& out, at::Tensor& lse) {
  const at::Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), K = k.size(1);
  const Shape p{B, N, K, Hq, k.size(2), lens};
  const int64_t tiles_q = (N + kTile - 1) / kTile;
  const bool v2 = mma_v2();
  mma_dispatch(q, [&](auto type_tag, auto dim) {
    using T = decltype(type_tag);
    constexpr int D = decltype(dim)::value;
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (!v2) {
      auto kernel = mma_forward_kernel<T, D>;
      const size_t smem = sizeof(uint16_t) * 3 * kTile * (D + kPad);
      allow_smem(reinterpret_cast<const void*>(kernel), smem, "prefix_attention", "head_dim ", D);
      kernel<<<dim3(tiles_q, Hq, B), kThreads, smem, stream>>>(
          bits(q), bits(k), bits(v), bits_mut(out), lse.data_ptr<float>(), row_strides(q), row_strides(k),
          row_strides(v), p, static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int splits = key_splits(tiles_q * Hq * B, (K + kTile - 1) / kTile);
    at::Tensor part_out, part_lse;
    if (splits > 1) {
      part_out = at::empty({splits, B * Hq * N, D}, q.options().dtype(at::kFloat));
      part_lse = at::empty({splits, B * Hq * N}, q.options().dtype(at::kFloat));
    }
    auto kernel = mma_forward_v2_kernel<T, D>;
    const size_t smem = sizeof(uint16_t) * 4 * kTile * (D + kPad);  // two stages of K and V tiles
    allow_smem(reinterpret_cast<const void*>(kernel), smem, "prefix_attention", "head_dim ", D);
    kernel<<<dim3(tiles_q * splits, Hq, B), kThreads, smem, stream>>>(
        bits(q), bits(k), bits(v), bits_mut(out), lse.data_ptr<float>(),
        splits > 1 ? part_out.data_ptr<float>() : nullptr, splits > 1 ? part_lse.data_ptr<float>() : nullptr,
        splits, row_strides(q), row_strides(k), row_strides(v), p, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t rows = B * Hq * N;
      merge_splits_kernel<T, D><<<(rows + kMmaWarps - 1) / kMmaWarps, kThreads, 0, stream>>>(
          part_out.data_ptr<float>(), part_lse.data_ptr<float>(), splits, reinterpret_cast<T*>(out.data_ptr()),
          lse.data_ptr<float>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mma_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& lse, const at::Tensor& delta, double scale, AttentionLengths lens) {
  const at::Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  const at::Tensor dout = vector_aligned(grad_out);
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3), K = k.size(1), Hkv = k.size(2);
  at::Tensor dq_acc = at::zeros({B, N, Hq, D}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty({B, K, Hkv, D}, q.options());
  at::Tensor dv = at::empty({B, K, Hkv, D}, q.options());
  const Shape p{B, N, K, Hq, Hkv, lens};
  const bool v2 = mma_v2();
  mma_dispatch(q, [&](auto type_tag, auto dim) {
    using T = decltype(type_tag);
    constexpr int Dc = decltype(dim)::value;
    auto kernel = v2 ? mma_backward_v2_kernel<T, Dc> : mma_backward_kernel<T, Dc>;
    const size_t smem = BackwardSmem<Dc>::kBytes;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, "prefix_attention_backward", "head_dim ", Dc);
    kernel<<<dim3((K + kTile - 1) / kTile, Hkv, B), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        bits(q), bits(k), bits(v), bits(dout), lse.data_ptr<float>(), delta.data_ptr<float>(),
        dq_acc.data_ptr<float>(), bits_mut(dk), bits_mut(dv), row_strides(q), row_strides(k), row_strides(v),
        row_strides(dout), p, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq_acc.mul_(scale).to(q.scalar_type()), dk, dv};
}

}  // namespace comet::cuda
