"""Every op traces into one graph under torch.compile(fullgraph=True), forward and backward."""
from __future__ import annotations

import pytest
import torch

from comet_ext import ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_prefix_attention_compiles():
    q = torch.randn(2, 5, 4, 16, requires_grad=True)
    k = torch.randn(2, 9, 2, 16, requires_grad=True)
    v = torch.randn(2, 9, 2, 16, requires_grad=True)
    ql, kl = torch.tensor([5, 2]), torch.tensor([9, 7])

    def fn(q, k, v):
        out, lse = ops.prefix_attention(q, k, v, None, ql, kl)
        return out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()

    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    comp = torch.autograd.grad(compiled(fn)(q, k, v), (q, k, v))
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b)


def test_rla_and_gated_update_compile():
    d, r = 16, 4
    x = torch.randn(3, 7, d, requires_grad=True)
    down, up = torch.randn(r, d) * 0.2, torch.randn(d, r) * 0.2
    w, gate = torch.ones(d), torch.randn(1, 2 * d) * 0.1

    def fn(x):
        y = ops.rla(x, down, up, w)
        new, mem = ops.gated_update(y, None, w, gate, down, up)
        new2, mem2 = ops.gated_update(y, new, w, gate, down, up)
        return (mem + mem2).sum()

    (eager,) = torch.autograd.grad(fn(x), x)
    (comp,) = torch.autograd.grad(compiled(fn)(x), x)
    torch.testing.assert_close(eager, comp)


def test_fifo_compiles_inplace_and_functional():
    def step(buffer, head, length, rows, counts):
        ops.fifo_push(buffer, head, length, rows, counts)
        return ops.fifo_view(buffer, head, length)

    rows, counts = torch.randn(2, 3, 4), torch.tensor([3, 1])
    eager_state = ops.fifo_empty(2, 4, (4,))
    comp_state = ops.fifo_empty(2, 4, (4,))
    f = compiled(step)
    for _ in range(3):
        torch.testing.assert_close(step(*eager_state, rows, counts), f(*comp_state, rows, counts))
    for a, b in zip(eager_state, comp_state):
        assert torch.equal(a, b)

    def functional(buffer, rows):
        nb, nh, nl = ops.fifo_push_functional(buffer, torch.tensor([1, 0]), torch.tensor([2, 0]), rows, counts)
        return ops.fifo_view(nb, nh, nl).sum()

    buf = torch.randn(2, 4, 4, requires_grad=True)
    rr = rows.clone().requires_grad_()
    eager = torch.autograd.grad(functional(buf, rr), (buf, rr))
    comp = torch.autograd.grad(compiled(functional)(buf, rr), (buf, rr))
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b)
