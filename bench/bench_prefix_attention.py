"""prefix_attention: comet vs torch SDPA (bottom-right causal mask) vs the reference.

    pytest bench/bench_prefix_attention.py --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, ON_GPU, backward_of, run_case
from torch.nn.attention.bias import causal_lower_right

from comet_ext import ops
from comet_ext import reference as ref

# CoMeT reference defaults scaled to this machine: chunk 2048 (+256 compression
# rows +512 readout rows = 2816 queries), prefix 512 global + 2048 FIFO rows.
SHAPES = {
    "B1-N2816-P2560-H8/2-D128": dict(B=1, N=2816, P=2560, Hq=8, Hkv=2, D=128),
    "B2-N512-P1024-H8/2-D64": dict(B=2, N=512, P=1024, Hq=8, Hkv=2, D=64),
    "decode-B1-N1-P5375-H8/2-D128": dict(B=1, N=1, P=5375, Hq=8, Hkv=2, D=128),
}
if ON_GPU:  # issue 4's GPU shapes: 16 query / 8 kv heads, head dim 128
    SHAPES = {
        "B1-N2816-P2560-H16/8-D128": dict(B=1, N=2816, P=2560, Hq=16, Hkv=8, D=128),
        "B4-N2816-P2560-H16/8-D128": dict(B=4, N=2816, P=2560, Hq=16, Hkv=8, D=128),
        "decode-B4-N1-P5375-H16/8-D128": dict(B=4, N=1, P=5375, Hq=16, Hkv=8, D=128),
    }


def flops(B, N, P, Hq, D, **_):
    """Matmul FLOPs of the forward over visible (query, key) pairs: 4 D per pair."""
    pairs = N * P + N * (N + 1) // 2
    return 4 * D * pairs * B * Hq


def make(B, N, P, Hq, Hkv, D, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, P + N, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, P + N, Hkv, D, generator=g).to(DEVICE, dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def forward_fn(provider, q, k, v):
    N, K = q.shape[1], k.shape[1]
    if provider == "comet":
        return lambda: ops.prefix_attention(q, k, v)[0]
    if provider == "reference":
        return lambda: ref.prefix_attention(q, k, v)[0]
    if provider == "sdpa":
        mask = causal_lower_right(N, K)
        return lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )
    raise ValueError(provider)


@pytest.mark.parametrize("provider", ["comet", "sdpa", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefix_attention(benchmark, provider, mode, dtype, shape):
    s = SHAPES[shape]
    if provider == "reference" and s["N"] > 1024 and mode == "fwd+bwd" and (dtype == "bf16" or ON_GPU):
        pytest.skip("the reference's fwd+bwd at this shape is slow (CPU bf16) or too large (GPU)")
    q, k, v = make(**s, dtype=DTYPES[dtype], requires_grad=mode == "fwd+bwd")
    fwd = forward_fn(provider, q, k, v)
    fn = fwd if mode == "fwd" else backward_of(fwd)
    rounds = 3 if provider == "reference" else 7
    run_case(benchmark, fn, op="prefix_attention", provider=provider, mode=mode,
             case=f"{shape} {dtype}", rounds=rounds, flops=flops(**s))
