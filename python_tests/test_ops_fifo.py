"""fifo_push / fifo_view against the oracle: ring contents, eviction, RoPE, gradients."""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close_fp32, devices_for
from _hypothesis import given, st

from comet_ext import ops
from comet_ext import reference as ref

PUSH_DEVICES = devices_for("fifo_push")
VIEW_DEVICES = devices_for("fifo_view")


def rope_tables(C, D, base=10000.0, offset=0, dtype=torch.float32):
    """HF-style cos/sin tables (C, D) for positions offset .. offset + C - 1."""
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(offset, offset + C, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def push_sequence(device, dtype, C, feat, steps, seed=0):
    """Pushes random ragged rows into ours and the oracle; yields both after each push."""
    g = torch.Generator().manual_seed(seed)
    B = len(steps[0])
    ours = ops.fifo_empty(B, C, feat, dtype=dtype, device=device)
    oracle = tuple(t.clone().cpu() for t in ours)
    for counts in steps:
        n = max(max(counts), 1)
        rows = torch.randn(B, n, *feat, generator=g).to(dtype)
        c = torch.tensor(counts)
        ops.fifo_push(*ours, rows.to(device), c.to(device))
        ref.fifo_push(*oracle, rows, c)
        yield ours, oracle


@pytest.mark.parametrize("device", PUSH_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_push_matches_oracle(device, dtype):
    steps = [[3, 0, 7], [2, 5, 1], [9, 1, 0], [0, 0, 4], [6, 6, 6]]
    for ours, oracle in push_sequence(device, dtype, 5, (2, 3), steps):
        for a, b in zip(ours, oracle):
            assert torch.equal(a.cpu(), b)  # exact: push only moves bytes
        assert torch.equal(ops.fifo_view(*ours).cpu(), ref.fifo_view(*oracle))


@given(
    C=st.integers(0, 9),
    B=st.integers(1, 3),
    feat=st.sampled_from([(1,), (5,), (2, 4)]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_push_random(C, B, feat, steps, seed):
    g = torch.Generator().manual_seed(seed)
    plan = [torch.randint(0, 12, (B,), generator=g).tolist() for _ in range(steps)]
    for ours, oracle in push_sequence("cpu", torch.float32, C, feat, plan, seed):
        assert torch.equal(ops.fifo_view(*ours), ref.fifo_view(*oracle))
        assert torch.equal(ours[2], oracle[2])
        assert (ours[2] <= C).all()


def test_push_touches_only_new_slots():
    buffer, head, length = ops.fifo_empty(1, 8, (4,))
    ops.fifo_push(buffer, head, length, torch.ones(1, 3, 4), torch.tensor([3]))
    before = buffer.clone()
    ops.fifo_push(buffer, head, length, torch.full((1, 2, 4), 2.0), torch.tensor([2]))
    changed = (buffer != before).any(-1)[0]
    assert changed.tolist() == [False, False, False, True, True, False, False, False]


def test_push_more_than_capacity_keeps_newest():
    buffer, head, length = ops.fifo_empty(1, 4, (1,))
    rows = torch.arange(10.0).view(1, 10, 1)
    ops.fifo_push(buffer, head, length, rows, torch.tensor([10]))
    assert ops.fifo_view(buffer, head, length).flatten().tolist() == [6.0, 7.0, 8.0, 9.0]


@pytest.mark.parametrize("device", VIEW_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_view_with_rope_matches_oracle(device, dtype):
    B, C, H, D = 3, 6, 2, 8
    steps = [[4, 6, 1], [5, 0, 2]]
    cos, sin = rope_tables(C + 3, D, offset=11)
    for ours, oracle in push_sequence(device, dtype, C, (H, D), steps, seed=5):
        got = ops.fifo_view(*ours, cos.to(device), sin.to(device)).cpu()
        expected = ref.fifo_view(*oracle, cos, sin)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        L = ours[2].cpu()
        for b in range(B):
            assert (got[b, L[b]:] == 0).all()


def test_view_rope_is_a_rotation():
    """RoPE keeps each pair's norm and turns position 0 into the identity."""
    buffer, head, length = ops.fifo_empty(1, 3, (1, 4))
    ops.fifo_push(buffer, head, length, torch.randn(1, 3, 1, 4), torch.tensor([3]))
    cos, sin = rope_tables(3, 4)
    plain, roped = ops.fifo_view(buffer, head, length), ops.fifo_view(buffer, head, length, cos, sin)
    torch.testing.assert_close(roped[:, 0], plain[:, 0])
    pair_norm = lambda t: t[..., :2] ** 2 + t[..., 2:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(roped), pair_norm(plain))


def _ring(B=2, C=5, feat=(2, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(B, C, *feat, generator=g, dtype=dtype)
    head = torch.tensor([3, 0][:B])
    length = torch.tensor([4, 2][:B])
    return buffer, head, length


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_view_gradcheck_fp64(rope):
    buffer, head, length = _ring()
    tables = rope_tables(5, 4, dtype=torch.float64) if rope else (None, None)
    fn = lambda buf: ops.fifo_view(buf, head, length, *tables)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (buffer.requires_grad_(),), eps=1e-6, atol=1e-7)


def test_view_grad_matches_oracle():
    buffer, head, length = _ring(dtype=torch.float32)
    cos, sin = rope_tables(5, 4)
    g = torch.randn(buffer.shape)
    grads = []
    for fn in (ops.fifo_view, ref.fifo_view):
        buf = buffer.clone().requires_grad_()
        (fn(buf, head, length, cos, sin) * g).sum().backward()
        grads.append(buf.grad)
    assert_close_fp32("grad buffer", grads[0], grads[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", VIEW_DEVICES)
def test_view_keeps_fp64_tables_in_fp64(device):
    """float64 data reads float64 tables as given: rounding them to float32 (as the kernels
    once did) is an error of about 1e-8, far above float64's rounding."""
    buffer, head, length = (t.to(device) for t in _ring(C=6, feat=(3, 8)))
    pos = torch.arange(6, dtype=torch.float64).view(-1, 1) + 0.1  # angles not exact in float32
    emb = torch.cat([pos * torch.rand(4, dtype=torch.float64)] * 2, dim=-1)
    cos, sin = (t.to(device) for t in (emb.cos(), emb.sin()))
    g = torch.randn(buffer.shape, dtype=torch.float64, device=device)
    grads = []
    for fn in (ops.fifo_view, ref.fifo_view):
        buf = buffer.clone().requires_grad_()
        out = fn(buf, head, length, cos, sin)
        (out * g).sum().backward()
        grads.append((out.detach(), buf.grad))
    for name, got, expected in zip(("view", "grad buffer"), grads[0], grads[1]):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-14, msg=name)


def test_view_rejects_grad_for_tables():
    buffer, head, length = _ring(dtype=torch.float32)
    cos, sin = rope_tables(5, 4)
    out = ops.fifo_view(buffer.requires_grad_(), head, length, cos.requires_grad_(), sin)
    with pytest.raises(NotImplementedError, match="'cos' / 'sin'"):
        out.sum().backward()


def test_push_functional_matches_inplace_and_grads():
    buffer, head, length = _ring()
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(2, 7, 2, 4, generator=g, dtype=torch.float64)
    counts = torch.tensor([3, 7])
    out_buf, out_head, out_len = ops.fifo_push_functional(buffer, head, length, rows, counts)
    inplace = [t.clone() for t in (buffer, head, length)]
    ops.fifo_push(*inplace, rows, counts)
    for a, b in zip((out_buf, out_head, out_len), inplace):
        assert torch.equal(a, b)
    assert torch.equal(head, torch.tensor([3, 0])), "functional push must not touch its inputs"

    def fn(buf, rows):
        nb, nh, nl = ops.fifo_push_functional(buf, head, length, rows, counts)
        return ops.fifo_view(nb, nh, nl)

    ins = (buffer.clone().requires_grad_(), rows.clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7)


def test_push_refuses_autograd():
    buffer, head, length = ops.fifo_empty(1, 3, (2,))
    rows = torch.randn(1, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="fifo_push_functional"):
        ops.fifo_push(buffer, head, length, rows, torch.tensor([2]))
    with torch.no_grad():
        ops.fifo_push(buffer, head, length, rows, torch.tensor([2]))
    assert length.tolist() == [2]


@pytest.mark.parametrize("device", PUSH_DEVICES)
@pytest.mark.parametrize("call", ["face", "dispatcher"])
def test_push_bumps_versions(device, call):
    """The push is an in-place op to autograd (a saved buffer is caught as modified) and to
    CometMemory's host copy of the lengths, however it is called: the ADInplaceOrView kernel
    (csrc/autograd.cpp) bumps buffer, head and length, under inference mode too."""
    buffer, head, length = ops.fifo_empty(2, 3, (2,), device=device)
    push = ops.fifo_push if call == "face" else torch.ops.comet.fifo_push
    before = [t._version for t in (buffer, head, length)]
    push(buffer, head, length, torch.randn(2, 2, 2, device=device), torch.tensor([2, 1], device=device))
    assert all(a > b for a, b in zip([t._version for t in (buffer, head, length)], before))
    before = [t._version for t in (buffer, head, length)]
    with torch.inference_mode():  # tensors made outside it keep counting (CometMemory's are such)
        push(buffer, head, length, torch.randn(2, 1, 2, device=device), torch.tensor([1, 0], device=device))
    assert all(a > b for a, b in zip([t._version for t in (buffer, head, length)], before))

    x = torch.randn(2, 3, 2, device=device, requires_grad=True)
    y = (x * buffer).sum()  # saves the buffer for x's gradient
    with torch.no_grad():
        push(buffer, head, length, torch.randn(2, 1, 2, device=device), torch.tensor([1, 1], device=device))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("device", PUSH_DEVICES)
def test_direct_dispatcher_push_refuses_autograd(device):
    """torch.ops.comet.fifo_push, past the Python face, refused nothing: it wrote a buffer that
    requires grad and dropped the gradient of the rows written into it (and their tangents)."""
    import torch.autograd.forward_ad as fwAD

    counts = torch.tensor([2], device=device)
    for requires in ("buffer", "rows"):
        buffer, head, length = ops.fifo_empty(1, 3, (2,), device=device)
        rows = torch.randn(1, 2, 2, device=device)
        (buffer if requires == "buffer" else rows).requires_grad_()
        with pytest.raises(RuntimeError, match="fifo_push: updates 'buffer' in place.*fifo_push_functional"):
            torch.ops.comet.fifo_push(buffer, head, length, rows, counts)
        assert length.tolist() == [0], "refused before writing"
        with torch.no_grad():  # as torch's own in-place ops: fine without grad mode
            torch.ops.comet.fifo_push(buffer, head, length, rows, counts)
        assert length.tolist() == [2]
    buffer, head, length = ops.fifo_empty(1, 3, (2,), device=device)
    rows = torch.randn(1, 2, 2, device=device)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="fifo_push: forward-mode AD"):
            torch.ops.comet.fifo_push(buffer, head, length, fwAD.make_dual(rows, torch.ones_like(rows)), counts)
    with torch.inference_mode():  # no autograd at all: the kernel runs directly
        b, h, l = ops.fifo_empty(1, 3, (2,), device=device)
        torch.ops.comet.fifo_push(b, h, l, rows, counts)
    assert l.tolist() == [2]
    for push in (ops.fifo_push, torch.ops.comet.fifo_push):  # as torch's in-place ops: not outside it
        with pytest.raises(RuntimeError, match=r"fifo_push: 'buffer', 'head' or 'length' is an inference tensor"):
            push(b, h, l, rows, counts)
    assert l.tolist() == [2]


@pytest.mark.parametrize("device", PUSH_DEVICES)
def test_opcheck(device):
    buffer, head, length = (t.to(device) for t in _ring(dtype=torch.float32))
    rows = torch.randn(2, 3, 2, 4, device=device)
    counts = torch.tensor([2, 3], device=device)
    torch.library.opcheck(torch.ops.comet.fifo_push.default, (buffer.clone(), head.clone(), length.clone(), rows, counts))
    cos, sin = (t.to(device) for t in rope_tables(5, 4))
    for rg in (False, True):
        torch.library.opcheck(torch.ops.comet.fifo_view.default, (buffer.clone().requires_grad_(rg), head, length))
        torch.library.opcheck(torch.ops.comet.fifo_view.default, (buffer.clone().requires_grad_(rg), head, length, cos, sin))
    if device == "cpu":
        for rg in (False, True):
            torch.library.opcheck(
                torch.ops.comet.fifo_push_functional.default,
                (buffer.clone().requires_grad_(rg), head, length, rows.clone().requires_grad_(rg), counts),
            )
        torch.library.opcheck(torch.ops.comet.fifo_push_backward.default, (buffer, head, length, counts, 3))
        torch.library.opcheck(torch.ops.comet.fifo_view_backward.default, (buffer, head, length, cos, sin))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.cuda
def test_cuda_push_and_view_match_cpu():
    steps = [[3, 9, 0], [4, 1, 2], [0, 7, 7]]
    cos, sin = rope_tables(6, 4)
    cpu = list(push_sequence("cpu", torch.float32, 6, (2, 4), steps, seed=9))
    gpu = list(push_sequence("cuda", torch.float32, 6, (2, 4), steps, seed=9))
    for (a, _), (b, _) in zip(cpu, gpu):
        torch.testing.assert_close(ops.fifo_view(*a, cos, sin), ops.fifo_view(*b, cos.cuda(), sin.cuda()).cpu())


def test_compile_takes_a_data_dependent_number_of_rows():
    """torch.compile(fullgraph) of a push whose row count comes from a tensor's value (an unbacked
    size): the fake kernel's memory-sharing check cannot decide the rows' byte range and lets
    them pass, as the kernel does a case it cannot tell; it stopped the trace on the size (a
    data-dependent guard) where eager runs."""
    def step(buffer, head, length, big, n_rows, counts):
        n = n_rows.item()
        torch._check(n >= 0)
        torch._check(n <= big.shape[1])
        ops.fifo_push(buffer, head, length, big[:, :n], counts)
        return ops.fifo_view(buffer, head, length)

    big, counts = torch.randn(2, 5, 3), torch.tensor([2, 1])
    expected = step(*ops.fifo_empty(2, 4, (3,)), big, torch.tensor(2), counts)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            got = torch.compile(step, fullgraph=True, backend="aot_eager")(*ops.fifo_empty(2, 4, (3,)), big,
                                                                            torch.tensor(2), counts)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, expected)
