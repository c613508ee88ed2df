// Tensor-core (mma.sync) kernels of prefix_attention for bfloat16 / float16 and
// head dims 64, 80, 96, 128 on sm_80+; prefix_attention.cu calls them when
// mma_attention_supports() says so and keeps its CUDA-core kernels for the rest
// (float32, float64, other head dims, older GPUs).
#pragma once

#include <ATen/ATen.h>

namespace comet::cuda {

// q_lens / k_lens: (B,) int64 on the device, or null (all rows valid).
struct AttentionLengths {
  const int64_t* q_lens;
  const int64_t* k_lens;
};

bool mma_attention_supports(const at::Tensor& q);

// out: (B, N, Hq, D) contiguous, q's dtype; lse: (B, Hq, N) float32.
void mma_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                           AttentionLengths lens, at::Tensor& out, at::Tensor& lse);

// delta = <dO, O> - dlse: (B, Hq, N) float32. Returns dq, dk, dv in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mma_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const at::Tensor& delta, double scale, AttentionLengths lens);

}  // namespace comet::cuda
