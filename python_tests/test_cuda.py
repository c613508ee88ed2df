"""CUDA kernels against the CPU kernels, and a 64-bit indexing stress case.
Skipped cleanly without a GPU (the per-op tests also run on CUDA when one exists)."""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_flash_rule

from comet_ext import ops
from comet_ext import reference as ref

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]


@pytest.fixture(params=["v1", "v2"])
def mma_kernels(request, monkeypatch):
    """Runs the test with each generation of tensor-core kernels (COMET_MMA_KERNELS picks one)."""
    monkeypatch.setenv("COMET_MMA_KERNELS", request.param)
    return request.param


@pytest.fixture(params=["v1", "v2"])
def row_kernels(request, monkeypatch):
    """Runs the test with each generation of rla / gated_update backward (COMET_ROW_KERNELS picks one)."""
    monkeypatch.setenv("COMET_ROW_KERNELS", request.param)
    return request.param


def _pair(*shape, dtype, seed=0, scale=1.0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.to(dtype), t.to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_prefix_attention_cuda_matches_cpu(mma_kernels, dtype, D):
    (q, qc), (k, kc), (v, vc) = (_pair(2, 70, 8, D, dtype=dtype, seed=1), _pair(2, 170, 2, D, dtype=dtype, seed=2),
                                 _pair(2, 170, 2, D, dtype=dtype, seed=3))
    ql, kl = torch.tensor([70, 31]), torch.tensor([170, 90])
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    grads = []
    for dev, (a, b, c) in (("cpu", (q, k, v)), ("cuda", (qc, kc, vc))):
        a, b, c = (t.clone().requires_grad_() for t in (a, b, c))
        out, lse = ops.prefix_attention(a, b, c, None, ql.to(dev), kl.to(dev))
        (out.float().square().sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
        grads.append([out.detach().cpu(), lse.detach().cpu(), a.grad.cpu(), b.grad.cpu(), c.grad.cpu()])
    for x, y in zip(*grads):
        if x.dtype == torch.float32 and torch.isinf(x).any():
            assert torch.equal(torch.isinf(x), torch.isinf(y))
            x, y = torch.where(torch.isinf(x), 0, x), torch.where(torch.isinf(y), 0, y)
        torch.testing.assert_close(y.float(), x.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N, K, D", [(1, 3000, 64), (1, 3000, 80), (1, 3000, 96), (1, 3000, 128), (3, 1100, 128),
                                     (70, 4000, 128)],
                         ids=["decode-D64", "decode-D80", "decode-D96", "decode-D128", "few-rows", "tile-of-rows"])
def test_prefix_attention_long_key_ranges_cuda(mma_kernels, dtype, N, K, D):
    """Few query rows over many keys (decode), where the v2 forward splits each row's keys across
    blocks and merges the parts through their log-sum-exp: ragged lengths, a sample with no key at
    all, one with fewer keys than queries (its first queries see nothing); outputs and gradients.
    The flash rule against the fp32 oracle, the CPU kernel in the same dtype as yardstick."""
    B, Hq, Hkv = 4, 8, 2
    gen = torch.Generator().manual_seed(N * K + D)
    q, k, v = (torch.randn(B, n, h, D, generator=gen).to(dtype) for n, h in ((N, Hq), (K, Hkv), (K, Hkv)))
    ql, kl = torch.tensor([N, N, max(N - 1, 1), N]), torch.tensor([K, K // 3 + 5, 0, max(N // 2, 1)])
    w = torch.randn(B, N, Hq, D, generator=gen)  # the loss weights: gradients differ per element

    def run(attention, device, to):
        ins = [to(t).to(device).detach().requires_grad_() for t in (q, k, v)]
        out, lse = attention(*ins, None, ql.to(device), kl.to(device))
        (out.float() * w.to(device)).sum().backward()
        return [out.detach().cpu(), lse.detach().cpu()] + [t.grad.cpu() for t in ins]

    ours = run(ops.prefix_attention, "cuda", lambda t: t)
    low = run(ops.prefix_attention, "cpu", lambda t: t)
    exact = run(ref.prefix_attention, "cpu", lambda t: t.float())
    for name, a, b, c in zip(["out", "lse", "dq", "dk", "dv"], ours, low, exact):
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(c))  # keyless rows, rows past ql
            seen = ~torch.isinf(c)
            torch.testing.assert_close(a[seen], c[seen], rtol=1e-3, atol=1e-3)
        else:
            assert_flash_rule(name, a, b, c)
    assert ours[0][2].abs().max().item() == 0.0  # no key: zeros, not NaN


def test_prefix_attention_ignores_nan_in_padding_rows_cuda(mma_kernels):
    """Query rows past q_lens may hold anything (here NaN) — also where a tile needs no mask, and
    keys past k_lens too: the valid rows do not change by a bit and the padding rows are zeros."""
    B, N, K, Hq, Hkv, D = 2, 130, 300, 4, 2, 64
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, n, h, D, generator=gen).to(torch.bfloat16).cuda()
               for n, h in ((N, Hq), (K, Hkv), (K, Hkv)))
    ql, kl = torch.tensor([N, 70]).cuda(), torch.tensor([K, 250]).cuda()
    clean, clean_lse = ops.prefix_attention(q, k, v, None, ql, kl)
    q[1, 70:], k[1, 250:], v[1, 250:] = float("nan"), float("nan"), float("nan")
    out, lse = ops.prefix_attention(q, k, v, None, ql, kl)
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
    assert out[1, 70:].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefix_attention_rows_past_q_lens_stay_zero_beside_a_nan_key_cuda(mma_kernels, dtype):
    """A NaN in a key the valid rows see poisons them, while the padding rows of the same tile
    (which see no key) are still zeros, as on the CPU, not 0 * NaN."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 64, h, 64, generator=gen).to(dtype) for h in (2, 1, 1))
    v[0, 0, 0, 3] = float("nan")
    ql, kl = torch.tensor([32]), torch.tensor([64])
    cpu = ops.prefix_attention(q, k, v, None, ql, kl)[0]
    cuda = ops.prefix_attention(q.cuda(), k.cuda(), v.cuda(), None, ql.cuda(), kl.cuda())[0].cpu()
    assert cpu[0, :32].isnan().any(-1).all() and cpu[0, 32:].abs().max().item() == 0.0
    assert torch.equal(cuda.isnan(), cpu.isnan()) and cuda[0, 32:].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype, N, K, D, key", [(torch.float32, 70, 150, 64, 115), (torch.bfloat16, 70, 150, 128, 115),
                                                  (torch.bfloat16, 1, 3000, 128, 1000)],
                         ids=["fp32", "bf16", "bf16-split-keys"])
def test_prefix_attention_nan_poisons_the_rows_that_see_it_cuda(mma_kernels, dtype, N, K, D, key):
    """A NaN in one query row, or in one key, makes out and lse NaN in exactly the rows that see
    it, as on the CPU — on CUDA cores, both tensor-core generations and the split-keys merge of a
    decode shape — and leaves every other row finite, not a zero row passing for "saw nothing"."""
    B, Hq, Hkv = 2, 4, 2
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, n, h, D, generator=gen).to(dtype) for n, h in ((N, Hq), (K, Hkv), (K, Hkv)))
    q[0, N - 1, 1, 5] = float("nan")  # one (row, head) of sample 0
    k[1, key, 0, 7] = float("nan")  # a key of kv head 0 in sample 1: q heads 0 and 1, rows from key - (K - N)
    expected = torch.zeros(B, N, Hq, dtype=torch.bool)
    expected[0, N - 1, 1] = True
    expected[1, max(key - (K - N), 0):, : Hq // Hkv] = True
    for device in ("cpu", "cuda"):
        out, lse = (t.cpu() for t in ops.prefix_attention(q.to(device), k.to(device), v.to(device)))
        assert torch.equal(out.isnan().all(-1), expected) and torch.equal(out.isnan().any(-1), expected), device
        assert torch.equal(lse.isnan(), expected.transpose(1, 2)), device


def test_mma_kernels_choice_is_checked(monkeypatch):
    monkeypatch.setenv("COMET_MMA_KERNELS", "fastest")
    q = torch.zeros(1, 4, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="COMET_MMA_KERNELS must be 'v1' or 'v2'"):
        ops.prefix_attention(q, q, q)


def _rla_and_gated_update(args, device):
    """Outputs and input gradients of rla + gated_update (with and without a previous state)."""
    ins = [t.detach().to(device).requires_grad_() for t in args]
    x, s, w, g, dn, up = ins
    y = ops.rla(x, dn, up, w)
    new, mem = ops.gated_update(x, s, w, g, dn, up)
    first, _ = ops.gated_update(x, None, w, g, dn, up)
    (y.float().square().sum() + new.float().sum() + mem.float().square().sum() + first.float().sum()).backward()
    return [t.detach().cpu() for t in (y, new, mem, first)] + [t.grad.cpu() for t in ins]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d, r", [(1000, 8), (4096, 8), (24, 3), (1001, 8), (64, 20)],
                         ids=["warp-rows", "warp-rows-16-vectors", "warp-rows-short", "block-rows-odd-d",
                              "block-rows-rank-20"])
def test_rla_and_gated_update_cuda_match_cpu(row_kernels, dtype, d, r):
    """The CUDA kernels' error against the fp64 result is at most twice the CPU kernels'
    (FlashAttention's rule, with the CPU kernel as the same-dtype yardstick): the two sum
    d products in different orders, so bitwise agreement is not expected. The shapes take
    both forwards: a warp per row (d a multiple of a 16-byte vector, rank <= 16) and a block
    per row (the rest); and both backwards (v2 for ranks up to 16, the rank-20 case runs v1
    under either setting), v2 over two ranges of rows and ragged column blocks."""
    gen = torch.Generator().manual_seed(1)
    x, s = torch.randn(3, 40, d, generator=gen), torch.randn(3, 40, d, generator=gen)
    dn, up = torch.randn(r, d, generator=gen) * 0.03, torch.randn(d, r, generator=gen) * 0.3
    w, g = torch.randn(d, generator=gen) * 0.1 + 1, torch.randn(1, 2 * d, generator=gen) * 0.02
    args = [t.to(dtype) for t in (x, s, w, g, dn, up)]
    exact = _rla_and_gated_update([t.double() for t in args], "cpu")
    cpu, cuda = _rla_and_gated_update(args, "cpu"), _rla_and_gated_update(args, "cuda")
    names = ["rla", "gated_update.new", "gated_update.mem", "gated_update(first)"] + [
        f"grad {n}" for n in ("x", "state", "weight", "gate", "down", "up")]
    for name, ours, yardstick, ref64 in zip(names, cuda, cpu, exact):
        assert_flash_rule(name, ours, yardstick, ref64)


def _rla_gated_inputs(M, d, r, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, s = torch.randn(M, d, generator=gen), torch.randn(M, d, generator=gen)
    dn, up = torch.randn(r, d, generator=gen) * 0.3, torch.randn(d, r, generator=gen) * 0.3
    w, g = torch.randn(d, generator=gen) * 0.1 + 1, torch.randn(1, 2 * d, generator=gen) * 0.05
    return [t.to(dtype).cuda().requires_grad_() for t in (x, s, w, g, dn, up)]


@pytest.mark.parametrize("r", [3, 9], ids=["rank-bucket-4", "rank-bucket-16"])
def test_row_backward_v2_gradcheck_cuda(monkeypatch, r):
    """fp64 gradcheck of the two-pass backwards: rla with and without its norm, gated_update with
    and without a state, over 70 rows (two ranges of rows) and 40 columns."""
    monkeypatch.setenv("COMET_ROW_KERNELS", "v2")
    x, s, w, g, dn, up = _rla_gated_inputs(70, 40, r, torch.float64, seed=r)
    check = dict(eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda *a: ops.rla(*a, 1e-6), (x, dn, up, w), **check)
    assert torch.autograd.gradcheck(lambda *a: ops.rla(*a, None, 1e-6), (x, dn, up), **check)
    x3, s3 = (t.detach().view(2, 35, 40).clone().requires_grad_() for t in (x, s))
    assert torch.autograd.gradcheck(ops.gated_update, (x3, s3, w, g, dn, up), **check)
    assert torch.autograd.gradcheck(ops.gated_update, (x3, None, w, g, dn, up), **check)


@pytest.mark.parametrize("gate_snap", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_backward_v2_matches_v1_and_the_reference_cuda(monkeypatch, dtype, gate_snap):
    """5000 rows of 300 columns (many ranges, a ragged column block), rank 8: the v2 gradients
    keep the flash rule against the fp64 reference's autograd, with v1 as the same-dtype
    yardstick; a snap below 1 passes the gradient straight through as the reference does. eps is
    given: the op's default follows the dtype (bf16: 2^-7), the fp64 reference's would not."""
    x, s, w, g, dn, up = _rla_gated_inputs(5000, 300, 8, dtype, seed=7)

    def grads(kernels):
        monkeypatch.setenv("COMET_ROW_KERNELS", kernels)
        ins = [t.detach().clone().requires_grad_() for t in (x, s, w, g, dn, up)]
        xi, si, wi, gi, dni, upi = ins
        y = ops.rla(xi, dni, upi, wi)
        new, mem = ops.gated_update(xi.view(10, 500, 300), si.view(10, 500, 300), wi, gi, dni, upi, eps=1e-6,
                                     gate_snap=gate_snap)
        (y.float().square().sum() + new.float().sum() + mem.float().square().sum()).backward()
        return [t.grad.cpu() for t in ins]

    xe, se, we, ge, dne, upe = (t.detach().cpu().double().requires_grad_() for t in (x, s, w, g, dn, up))
    y = ref.rla(xe, dne, upe, we)
    new, mem = ref.gated_update(xe.view(10, 500, 300), se.view(10, 500, 300), we, ge, dne, upe, eps=1e-6,
                               gate_snap=gate_snap)
    (y.square().sum() + new.sum() + mem.square().sum()).backward()
    exact = [t.grad for t in (xe, se, we, ge, dne, upe)]
    for name, ours, yardstick, e in zip(("x", "state", "weight", "gate", "down", "up"), grads("v2"), grads("v1"),
                                        exact):
        assert_flash_rule(f"grad {name}", ours, yardstick, e)


@pytest.mark.parametrize("r", [1, 4, 5, 16, 17])
def test_row_backward_v2_matches_v1_fp64_at_rank_bucket_edges_cuda(monkeypatch, r):
    """fp64: the v2 gradients equal v1's to rounding at the rank buckets' edges (17 runs v1 under
    either setting), for rla on x with a row stride past d (with and without the norm) and
    gated_update with snapped gates and without a state; 1 row, and 131 rows (three ranges, the
    last ragged) of 300 columns (a ragged column block)."""
    def grads(kernels, M):
        monkeypatch.setenv("COMET_ROW_KERNELS", kernels)
        gen = torch.Generator().manual_seed(M + r)
        d = 300
        big = torch.randn(M, d + 9, generator=gen, dtype=torch.float64).cuda().requires_grad_()
        s = torch.randn(1, M, d, generator=gen, dtype=torch.float64).cuda().requires_grad_()
        w = (torch.randn(d, generator=gen, dtype=torch.float64) * 0.1 + 1).cuda().requires_grad_()
        gate = (torch.randn(1, 2 * d, generator=gen, dtype=torch.float64) * 0.1).cuda().requires_grad_()
        dn = (torch.randn(r, d, generator=gen, dtype=torch.float64) * 0.3).cuda().requires_grad_()
        up = (torch.randn(d, r, generator=gen, dtype=torch.float64) * 0.3).cuda().requires_grad_()
        outs = torch.randn(5, M, d, generator=gen, dtype=torch.float64).cuda()
        x = big[:, 4:4 + d]  # row stride d + 9
        loss = (ops.rla(x, dn, up, w, 1e-6) * outs[0]).sum() + (ops.rla(x, dn, up) * outs[1]).sum()
        new, mem = ops.gated_update(x.view(1, M, d), s, w, gate, dn, up, eps=1e-6, gate_snap=0.6)
        first, fmem = ops.gated_update(x.view(1, M, d), None, w, gate, dn, up, eps=1e-6)
        loss = loss + (new * outs[2]).sum() + (mem * outs[3]).sum() + (first * outs[4]).sum() + fmem.square().sum()
        loss.backward()
        return [t.grad.cpu() for t in (big, s, w, gate, dn, up)]

    for M in (1, 131):
        for name, v2, v1 in zip(("x", "state", "weight", "gate", "down", "up"), grads("v2", M), grads("v1", M)):
            torch.testing.assert_close(v2, v1, rtol=1e-10, atol=1e-10 * v1.abs().max().item(), msg=f"M={M} {name}")


def test_row_kernels_choice_is_checked(monkeypatch):
    monkeypatch.setenv("COMET_ROW_KERNELS", "fastest")
    x, s, w, g, dn, up = _rla_gated_inputs(4, 16, 2, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="COMET_ROW_KERNELS must be 'v1' or 'v2'"):
        ops.rla(x, dn, up, w).sum().backward()


def test_row_kernels_refuse_a_hidden_size_past_the_shared_memory_limit():
    """The block-per-row kernels hold whole fp32 rows in shared memory (gated_update: 2 rows
    forward, 3 backward): a hidden size past what the GPU gives one block is a RuntimeError naming
    the op and d, not a bare launch failure; one that fits still runs."""
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    d = limit // 40 * 4  # 4-byte rows: 2 rows fit (0.8 x limit), 3 do not (1.2 x limit)
    dev = dict(dtype=torch.bfloat16, device="cuda")
    readout = torch.randn(1, 2, d, **dev, requires_grad=True)
    w, g = torch.ones(d, **dev), torch.zeros(1, 2 * d, **dev)
    down, up = torch.zeros(4, d, **dev), torch.zeros(d, 4, **dev)
    new_state, memory = ops.gated_update(readout, None, w, g, down, up)
    torch.testing.assert_close(new_state, ref.gated_update(readout.detach(), None, w, g, down, up)[0])
    with pytest.raises(RuntimeError, match=f"gated_update_backward: hidden size d={d} in BFloat16 needs"):
        (new_state.float().sum() + memory.float().sum()).backward()
    f64 = dict(dtype=torch.float64, device="cuda")  # rla's one row, of 8-byte elements: 1.6 x limit
    with pytest.raises(RuntimeError, match=f"rla: hidden size d={2 * d} in Double needs"):
        ops.rla(torch.randn(2, 2 * d, **f64), torch.zeros(4, 2 * d, **f64), torch.zeros(2 * d, 4, **f64))


@pytest.mark.parametrize("H, D, dtype", [(2, 8, torch.float32), (1, 6, torch.float32), (2, 16, torch.bfloat16)],
                         ids=["16-byte-packs", "element-wise", "bf16-packs"])
def test_fifo_cuda_matches_cpu_including_gradients(H, D, dtype):
    """Push, view (with RoPE) and their gradients on CUDA equal the CPU kernels; rows whose length
    and RoPE halves are multiples of 16 bytes move in 16-byte packs, the others element-wise."""
    buffer, head, length = ops.fifo_empty(2, 6, (H, D), dtype=dtype)
    buffer.normal_()
    head, length = torch.tensor([4, 0]), torch.tensor([6, 3])
    rows, counts = torch.randn(2, 5, H, D).to(dtype), torch.tensor([5, 2])
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2) / D)
    emb = torch.outer(torch.arange(6, dtype=torch.float32), inv).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    outs = []
    for dev in ("cpu", "cuda"):
        buf, rw = buffer.detach().to(dev).requires_grad_(), rows.detach().to(dev).requires_grad_()
        nb, nh, nl = ops.fifo_push_functional(buf, head.to(dev), length.to(dev), rw, counts.to(dev))
        view = ops.fifo_view(nb, nh, nl, cos.to(dev), sin.to(dev))
        (view.float() * torch.arange(view.numel(), device=dev).view(view.shape)).sum().backward()
        outs.append([view.detach().cpu(), nh.cpu(), nl.cpu(), buf.grad.cpu(), rw.grad.cpu()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a)


def _fifo_round_trip(dev, buffer, rows, head, length, counts):
    """push_functional then fifo_view and a backward through both, on one device; the state
    tensors are moved as they are (views stay views)."""
    buf, rw = buffer.detach().to(dev).requires_grad_(), rows.detach().to(dev).requires_grad_()
    nb, nh, nl = ops.fifo_push_functional(buf, head, length, rw, counts)
    view = ops.fifo_view(nb, nh, nl)
    (view * torch.arange(view.numel(), device=dev).view(view.shape)).sum().backward()
    return [t.detach().cpu() for t in (view, nh, nl, buf.grad, rw.grad)]


def test_fifo_cuda_reads_state_views_as_the_cpu_does():
    """head / length as strided views (columns of one tensor), counts expanded from one value
    (stride 0) or int32: CUDA gives the CPU's rows, state and gradients; the in-place push
    refuses a strided head / length on both devices."""
    B, C = 3, 4
    gen = torch.Generator().manual_seed(2)
    buffer, rows = torch.randn(B, C, 2, 8, generator=gen), torch.randn(B, 3, 2, 8, generator=gen)
    state = torch.tensor([[1, 3], [0, 4], [3, 2]])  # (head, length) per sample
    for counts in (torch.tensor([2]).expand(B), torch.tensor([3, 0, 2], dtype=torch.int32)):
        cpu = _fifo_round_trip("cpu", buffer, rows, state[:, 0], state[:, 1], counts)
        st = state.cuda()
        cuda = _fifo_round_trip("cuda", buffer, rows, st[:, 0], st[:, 1], counts.cuda())
        for a, b in zip(cpu, cuda):
            torch.testing.assert_close(b, a)
    st = state.cuda()  # fifo_view straight from the strided state
    torch.testing.assert_close(ops.fifo_view(buffer.cuda(), st[:, 0], st[:, 1]).cpu(),
                               ops.fifo_view(buffer, state[:, 0], state[:, 1]))
    for dev in ("cpu", "cuda"):
        st = state.to(dev)
        with pytest.raises(RuntimeError, match="'head' and 'length' must be contiguous"):
            ops.fifo_push(buffer.to(dev), st[:, 0], st[:, 1], rows.to(dev), torch.tensor([1, 1, 1], device=dev))


def test_fifo_cuda_normalises_a_head_outside_the_ring():
    """The CPU rejects head outside [0, C); CUDA does not sync the state to the host to check it
    and reads head modulo C instead: head -1 acts as C - 1, never a write before the buffer."""
    B, C = 2, 4
    gen = torch.Generator().manual_seed(3)
    buffer, rows = torch.randn(B, C, 8, generator=gen), torch.randn(B, 2, 8, generator=gen)
    length, counts = torch.tensor([2, 4]), torch.tensor([1, 2])
    cpu = _fifo_round_trip("cpu", buffer, rows, torch.tensor([C - 1, 1]), length, counts)
    cuda = _fifo_round_trip("cuda", buffer, rows, torch.tensor([-1, 1 - C]).cuda(), length.cuda(), counts.cuda())
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b, a)


def test_prefix_attention_cuda_refuses_a_batch_beyond_the_grid_limit():
    """Samples run along the attention kernels' grid.z (at most 65535 blocks): a larger batch is a
    clear error naming the batch, forward and backward, not a launch failure."""
    q = torch.zeros(70_000, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="prefix_attention: batch of 70000 exceeds the 65535"):
        ops.prefix_attention(q, q, q)
    out, lse = (torch.zeros(70_000, 1, 1, 64, device="cuda", dtype=torch.bfloat16),
                torch.zeros(70_000, 1, 1, device="cuda"))
    with pytest.raises(RuntimeError, match="prefix_attention_backward: batch of 70000 exceeds the 65535"):
        torch.ops.comet.prefix_attention_backward(out, lse, q, q, q, out, lse, 0.125, None, None)


def test_fifo_cuda_batch_beyond_the_grid_y_limit():
    """Samples run along grid.y, capped at 65535: a larger batch still reaches every sample."""
    B, C = 70_000, 2
    gen = torch.Generator().manual_seed(4)
    buffer, rows = torch.randn(B, C, 4, generator=gen), torch.randn(B, 1, 4, generator=gen)
    head, length = torch.randint(0, C, (B,), generator=gen), torch.randint(0, C + 1, (B,), generator=gen)
    counts = torch.randint(0, 2, (B,), generator=gen)
    cpu = _fifo_round_trip("cpu", buffer, rows, head, length, counts)
    cuda = _fifo_round_trip("cuda", buffer, rows, head.cuda(), length.cuda(), counts.cuda())
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b, a)
    inplace = buffer.cuda(), head.cuda(), length.cuda()
    ops.fifo_push(*inplace, rows.cuda(), counts.cuda())
    torch.testing.assert_close(ops.fifo_view(*inplace).cpu(), cpu[0])


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_properties(0).total_memory < 16 * 2**30,
                    reason="needs 16 GB of GPU memory")
def test_prefix_attention_score_space_beyond_2_to_the_31(mma_kernels):
    """N * K * heads > 2^31: 32-bit index arithmetic anywhere would corrupt rows far in."""
    N, K, Hq, Hkv, D = 16384, 16384, 8, 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, N, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, K, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, K, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    out, lse = ops.prefix_attention(q, k, v)
    for i in (0, 5000, N - 1):  # check a few rows against the oracle on just those rows
        exp_out, exp_lse = ref.prefix_attention(q[:, i:i + 1].float(), k[:, : i + 1].float(), v[:, : i + 1].float())
        torch.testing.assert_close(out[:, i:i + 1].float(), exp_out, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse[:, :, i:i + 1], exp_lse, rtol=1e-3, atol=1e-3)


def _packed_attention(device):
    """Outputs and q / k / v gradients of the drop-in attention on packed sequences: row 0 holds
    sequences of 1, 3, 40 and 56 tokens, row 1 of 70 and 20 and 10 padding tokens (five length
    buckets: 1 | 3 | 20 | 40, 56 | 70, so five kernel calls), fp32, GQA, HF's (B, heads, S, D) layout."""
    from comet_ext.attention import comet_attention

    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, h, 100, 64, generator=gen) for h in (4, 2, 2))
    ids = torch.tensor([[1] * 1 + [2] * 3 + [3] * 40 + [4] * 56, [1] * 70 + [2] * 20 + [0] * 10])
    ins = [t.to(device).requires_grad_() for t in (q, k, v)]
    out, _ = comet_attention(None, *ins, ids.to(device))
    (out * torch.randn(out.shape, generator=gen).to(device)).sum().backward()
    return [out.detach().cpu()] + [t.grad.cpu() for t in ins]


def test_packed_drop_in_attention_cuda_matches_cpu():
    for name, cuda, cpu in zip(("out", "dq", "dk", "dv"), _packed_attention("cuda"), _packed_attention("cpu")):
        torch.testing.assert_close(cuda, cpu, rtol=2e-5, atol=2e-5, msg=name)
    assert _packed_attention("cuda")[0][1, 90:].abs().max().item() == 0.0  # padding rows: zeros
