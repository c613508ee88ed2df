"""prefix_attention against the plain-PyTorch oracle: outputs, lse and every gradient."""
from __future__ import annotations

import pytest
import torch
from conftest import LOW_PRECISION, assert_close_fp32, assert_deterministic, assert_flash_rule, devices_for
from _hypothesis import given, st

from comet_ext import ops
from comet_ext import reference as ref

DEVICES = devices_for("prefix_attention")


def make_inputs(B, N, P, Hq, Hkv, D, dtype, device, layout="contiguous", seed=0):
    """q (B,N,Hq,D), k/v (B,P+N,Hkv,D); `layout` picks how they sit in memory."""
    g = torch.Generator().manual_seed(seed)
    K = P + N

    def rnd(S, H):
        if layout == "hf":  # HF keeps (B, H, S, D) and transposes: strided, unit last stride
            return torch.randn(B, H, S, D, generator=g).transpose(1, 2)
        if layout == "padded":  # a slice of a wider buffer
            return torch.randn(B, S, H, D + 3, generator=g)[..., 1 : D + 1]
        return torch.randn(B, S, H, D, generator=g)

    q, k, v = rnd(N, Hq), rnd(K, Hkv), rnd(K, Hkv)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def run_both(q, k, v, q_lens=None, k_lens=None, scale=None, upcast=True):
    """Outputs and gradients (w.r.t. q, k, v through out AND lse) of ours and the oracle."""
    results = []
    g = torch.Generator().manual_seed(1)
    go = torch.randn(q.shape, generator=g).to(q)
    gl = torch.randn((q.shape[0], q.shape[2], q.shape[1]), generator=g, dtype=torch.float64)
    for fn in (ops.prefix_attention, lambda *a, **kw: ref.prefix_attention(*a, **kw, upcast=upcast)):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, lse = fn(qq, kk, vv, scale=scale, q_lens=q_lens, k_lens=k_lens)
        finite = torch.isfinite(lse)
        loss = (out.float() * go.float()).sum() + (torch.where(finite, lse, 0) * gl.to(lse)).sum()
        grads = torch.autograd.grad(loss, (qq, kk, vv))
        results.append((out.detach(), lse.detach(), *grads))
    return results


SHAPES = [
    pytest.param(1, 1, 0, 1, 1, 32, id="one-row-empty-prefix"),
    pytest.param(2, 17, 0, 4, 2, 64, id="no-prefix"),
    pytest.param(2, 63, 45, 4, 1, 80, id="odd-gqa4-d80"),
    pytest.param(1, 130, 200, 2, 2, 128, id="multi-tile-d128"),
    pytest.param(3, 5, 300, 6, 3, 64, id="long-prefix"),
    pytest.param(1, 1, 999, 8, 2, 64, id="decode"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,N,P,Hq,Hkv,D", SHAPES)
def test_fp32_matches_oracle(device, B, N, P, Hq, Hkv, D):
    q, k, v = make_inputs(B, N, P, Hq, Hkv, D, torch.float32, device)
    ours = run_both(q, k, v)[0]
    oracle = run_both(q.double(), k.double(), v.double())[1]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, oracle):
        assert_close_fp32(name, a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,N,P,Hq,Hkv,D", SHAPES[1:5])
def test_low_precision_flash_rule(device, dtype, B, N, P, Hq, Hkv, D):
    q, k, v = make_inputs(B, N, P, Hq, Hkv, D, dtype, device)
    ours = run_both(q, k, v)[0]
    low = run_both(q, k, v, upcast=False)[1]
    fp32 = run_both(q.float(), k.float(), v.float())[1]
    for name, a, lo, hi in zip(("out", "lse", "dq", "dk", "dv"), ours, low, fp32):
        assert a.dtype == (torch.float32 if name == "lse" else dtype)
        if name == "lse":  # ours keeps lse in fp32: hold it to the fp32 bound
            assert_close_fp32(name, a, hi, rtol=1e-2, atol=1e-2)
        else:
            assert_flash_rule(name, a, lo, hi)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "hf", "padded"])
@pytest.mark.parametrize("D", [64, 128])
def test_low_precision_ragged_multi_tile(device, dtype, layout, D):
    """The bf16 / fp16 kernels (tensor cores on CUDA) over several 64-row tiles, GQA 3,
    strided and misaligned layouts, per-sample lengths: a full sample, one whose queries
    start deep into the keys, one with no queries, one with fewer keys than queries
    (its first rows see nothing)."""
    B, N, P, Hq, Hkv = 4, 150, 170, 6, 2
    q, k, v = make_inputs(B, N, P, Hq, Hkv, D, dtype, device, layout=layout, seed=3)
    q_lens = torch.tensor([150, 61, 0, 80], device=device)
    k_lens = torch.tensor([320, 100, 5, 30], device=device)
    ours = run_both(q, k, v, q_lens, k_lens)[0]
    low = run_both(q, k, v, q_lens, k_lens, upcast=False)[1]
    fp32 = run_both(q.float(), k.float(), v.float(), q_lens, k_lens)[1]
    assert torch.isneginf(ours[1][3, :, :50]).all() and (ours[0][3, :50] == 0).all()
    for name, a, lo, hi in zip(("out", "lse", "dq", "dk", "dv"), ours, low, fp32):
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(hi))
            a, hi = torch.where(torch.isinf(a), 0, a), torch.where(torch.isinf(hi), 0, hi)
            assert_close_fp32(name, a, hi, rtol=1e-2, atol=1e-2)
        else:
            assert_flash_rule(name, a, lo, hi)
    dq, dk = ours[2], ours[3]
    assert (dq[1, 61:] == 0).all() and (dq[2] == 0).all() and (dk[1, 100:] == 0).all() and (dk[2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_lengths_and_padding(device):
    """Per-sample lengths; padded query rows give zeros (never NaN) and lse = -inf."""
    B, N, P, Hq, Hkv, D = 4, 40, 25, 4, 2, 64
    q, k, v = make_inputs(B, N, P, Hq, Hkv, D, torch.float32, device, layout="hf")
    q_lens = torch.tensor([40, 13, 0, 1], device=device)
    k_lens = torch.tensor([65, 30, 0, 20], device=device)
    ours = run_both(q, k, v, q_lens, k_lens)[0]
    oracle = run_both(q.double(), k.double(), v.double(), q_lens, k_lens)[1]
    out, lse = ours[0], ours[1]
    assert torch.isfinite(out).all()
    assert (out[1, 13:] == 0).all() and (out[2] == 0).all() and (out[3, 1:] == 0).all()
    assert torch.isneginf(lse[1, :, 13:]).all() and torch.isneginf(lse[2]).all()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, oracle):
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            a, b = torch.where(torch.isinf(a), 0, a), torch.where(torch.isinf(b), 0, b)
        assert_close_fp32(name, a, b)
    # keys past k_lens and padded queries get exactly zero gradient
    dq, dk = ours[2], ours[3]
    assert (dq[1, 13:] == 0).all() and (dk[1, 30:] == 0).all() and (dk[2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_nan_in_a_valid_row_stays_out_of_the_padding_keys_gradients(device, dtype):
    """A NaN in one real query row's output gradient is that row's business: keys past k_lens (in
    the same key tile as real ones) keep exactly zero gradients, as in the oracle, and the other
    sample stays finite. (A kernel that multiplies their zero probabilities by dO gets NaN.)"""
    B, N, P, Hq, Hkv, D = 2, 40, 30, 4, 2, 64
    q, k, v = make_inputs(B, N, P, Hq, Hkv, D, dtype, device)
    q_lens = torch.tensor([40, 25], device=device)
    k_lens = torch.tensor([70, 50], device=device)  # sample 1: keys 50..69 are padding
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)
    go[1, 3, 0, 5] = float("nan")
    for fn in (ops.prefix_attention, ref.prefix_attention):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, _ = fn(qq, kk, vv, q_lens=q_lens, k_lens=k_lens)
        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), go)
        for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.isfinite(g[0]).all(), (fn, name)
        assert (dk[1, 50:] == 0).all() and (dv[1, 50:] == 0).all(), fn
        assert (dq[1, 25:] == 0).all(), fn


@pytest.mark.parametrize("device", DEVICES)
def test_no_keys_at_all_matches_the_oracle(device):
    """K = 0: every row sees nothing (out 0, lse -inf), in the op and the oracle alike, and the
    gradients are zeros."""
    q, k, v = make_inputs(2, 3, 0, 4, 2, 8, torch.float32, device)
    k, v = k[:, :0], v[:, :0]
    ours, oracle = run_both(q, k, v)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, oracle):
        assert torch.equal(a, b), name
    assert (ours[0] == 0).all() and torch.isneginf(ours[1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_queries_that_see_nothing(device):
    """More query rows than keys: the first rows see no key -> zeros, lse -inf."""
    q, k, v = make_inputs(1, 10, 0, 2, 1, 32, torch.float32, device)
    k, v = k[:, :4], v[:, :4]
    out, lse = ops.prefix_attention(q, k, v)
    expected, expected_lse = ref.prefix_attention(q, k, v)
    assert (out[:, :6] == 0).all() and torch.isneginf(lse[:, :, :6]).all()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse[..., 6:], expected_lse[..., 6:])


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale_and_int32_lengths(device):
    q, k, v = make_inputs(2, 9, 7, 2, 2, 32, torch.float32, device)
    ql = torch.tensor([9, 4], dtype=torch.int32, device=device)
    kl = torch.tensor([16, 8], dtype=torch.int32, device=device)
    out, lse = ops.prefix_attention(q, k, v, scale=0.37, q_lens=ql, k_lens=kl)
    eo, el = ref.prefix_attention(q.double(), k.double(), v.double(), 0.37, ql, kl)
    assert_close_fp32("out", out, eo)
    fin = torch.isfinite(el)
    assert_close_fp32("lse", lse[fin], el[fin])


@given(
    B=st.integers(1, 3),
    N=st.integers(1, 40),
    P=st.integers(0, 50),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    D=st.sampled_from([32, 64, 80, 128]),
    layout=st.sampled_from(["contiguous", "hf", "padded"]),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, N, P, Hkv, group, D, layout, ragged, seed):
    q, k, v = make_inputs(B, N, P, Hkv * group, Hkv, D, torch.float32, "cpu", layout, seed)
    ql = kl = None
    if ragged:
        g = torch.Generator().manual_seed(seed)
        ql = torch.randint(0, N + 1, (B,), generator=g)
        kl = torch.minimum(ql + torch.randint(0, P + 1, (B,), generator=g), torch.tensor(P + N))
    ours = run_both(q, k, v, ql, kl)[0]
    oracle = run_both(q.double(), k.double(), v.double(), ql, kl)[1]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, oracle):
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            a, b = torch.where(torch.isinf(a), 0, a), torch.where(torch.isinf(b), 0, b)
        assert_close_fp32(name, a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    q, k, v = make_inputs(2, 5, 3, 4, 2, 8, torch.float64, device)
    q_lens = torch.tensor([5, 2], device=device)
    k_lens = torch.tensor([8, 6], device=device)

    def fn(q, k, v):
        out, lse = ops.prefix_attention(q, k, v, 0.5, q_lens, k_lens)
        return out, torch.where(torch.isinf(lse), 0, lse)  # padded rows: lse = -inf, constant

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_lens", [False, True])
def test_opcheck(device, with_lens):
    q, k, v = make_inputs(2, 6, 5, 4, 2, 16, torch.float32, device)
    lens = (torch.tensor([6, 3], device=device), torch.tensor([11, 5], device=device))
    lens = lens if with_lens else (None, None)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (q, k, v)]
        torch.library.opcheck(torch.ops.comet.prefix_attention.default, (*args, 0.25, *lens))
    out, lse = ops.prefix_attention(q, k, v, 0.25, *lens)
    torch.library.opcheck(
        torch.ops.comet.prefix_attention_backward.default,
        (torch.randn_like(out), torch.zeros_like(lse), q, k, v, out, lse, 0.25, *lens),
    )


def test_long_keys_tiles_agree_with_oracle():
    """Several key and query tiles, a prefix that is not a tile multiple, GQA 4."""
    q, k, v = make_inputs(1, 200, 333, 8, 2, 64, torch.float32, "cpu", layout="hf")
    ours = run_both(q, k, v)[0]
    oracle = run_both(q.double(), k.double(), v.double())[1]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, oracle):
        assert_close_fp32(name, a, b)


@pytest.mark.parametrize("queries", [1, 64])  # the decode path (S^T from key rows) and the prefill path (K^T)
def test_cpu_softmax_exp_is_accurate_over_the_float_range(queries):
    """The CPU kernel's vectorised exp (csrc/cpu/cpu_utils.h exp_scalar), read through the op:
    q = e0 and key j = s_j * e0 give score s_j exactly (scale 1), and one-hot values give key
    j's weight in output column j. Relative to the weight of a score-0 key (exp(0) = 1), that is
    exp(s_j) up to two roundings (normalising and dividing): within 3 float ulp of the float64
    exp over scores from -80 to 0. A score far below the float range weighs exactly 0."""
    g = torch.Generator().manual_seed(0)
    B, K = 32, 128
    s = -80 * torch.rand(B, K, generator=g)
    s[:, 0], s[:, 1] = 0.0, -1000.0
    q = torch.zeros(B, queries, 1, K)
    q[..., 0] = 1
    k = torch.zeros(B, K, 1, K)
    k[:, :, 0, 0] = s
    v = torch.eye(K).expand(B, K, K).unsqueeze(2).contiguous()
    out, _ = ops.prefix_attention(q, k, v, 1.0)
    w = out[:, -1, 0].double()  # bottom-right causal: the last query row sees all K keys
    assert (w[:, 1] == 0).all()
    rel = (w[:, 2:] / w[:, :1]) / s[:, 2:].double().exp() - 1
    assert rel.abs().max() <= 3 * 2.0**-24, rel.abs().max()


@pytest.mark.parametrize("device", devices_for("prefix_attention"))
def test_same_inputs_give_the_same_bits(device):
    """Run again (float32: on a GPU the CUDA-core kernels; the tensor-core backward adds dQ with
    atomics), out, lse and dq / dk / dv are bit for bit the same; on the CPU also under other
    thread counts (each output element is summed by one thread, in one order)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g).to(device).requires_grad_()
               for s in ((2, 97, 4, 64), (2, 300, 2, 64), (2, 300, 2, 64)))
    assert_deterministic(ops.prefix_attention, [q, k, v], thread_counts=(1, 3) if device == "cpu" else ())
