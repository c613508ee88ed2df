"""rla against the oracle: output and gradients of x, down, up and the norm weight."""
from __future__ import annotations

import pytest
import torch
from conftest import LOW_PRECISION, assert_close_fp32, assert_deterministic, assert_flash_rule, devices_for
from _hypothesis import given, st

from comet_ext import ops
from comet_ext import reference as ref

DEVICES = devices_for("rla")


def make_inputs(M, d, r, dtype, device, seed=0, norm=True, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d + (5 if strided else 0), generator=g)[:, :d]
    down = torch.randn(r, d, generator=g) * d**-0.5
    up = torch.randn(d, r, generator=g) * r**-0.5
    w = 1 + 0.1 * torch.randn(d, generator=g) if norm else None
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, down, up, w)]


def run_both(x, down, up, w, eps=1e-6, upcast=True):
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(x.shape, generator=g).to(x)
    results = []
    for fn in (ops.rla, lambda *a: ref.rla(*a, upcast=upcast)):
        ins = [t.detach().clone().requires_grad_() for t in (x, down, up, w) if t is not None]
        y = fn(*ins[:3], ins[3] if w is not None else None, eps)
        grads = torch.autograd.grad((y * gy).sum(), ins)
        results.append((y.detach(), *grads))
    return results


CASES = [
    pytest.param(1, 8, 1, id="one-row"),
    pytest.param(37, 48, 5, id="odd"),
    pytest.param(300, 256, 8, id="many-rows"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "plain"])
@pytest.mark.parametrize("M,d,r", CASES)
def test_fp32_matches_oracle(device, norm, M, d, r):
    x, down, up, w = make_inputs(M, d, r, torch.float32, device, norm=norm, strided=True)
    ours = run_both(x, down, up, w)[0]
    oracle = run_both(*(t.double() if t is not None else None for t in (x, down, up, w)))[1]
    for i, (a, b) in enumerate(zip(ours, oracle)):
        assert_close_fp32(f"output {i}", a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,d,r", CASES[1:])
def test_low_precision_flash_rule(device, dtype, M, d, r):
    x, down, up, w = make_inputs(M, d, r, dtype, device)
    ours = run_both(x, down, up, w)[0]
    low = run_both(x, down, up, w, upcast=False)[1]
    hi = run_both(*(t.float() for t in (x, down, up, w)))[1]
    for i, (a, lo, h) in enumerate(zip(ours, low, hi)):
        assert a.dtype == dtype
        assert_flash_rule(f"output {i}", a, lo, h)


@given(
    M=st.integers(1, 70),
    d=st.integers(1, 130),
    r=st.integers(1, 9),
    norm=st.booleans(),
    eps=st.sampled_from([1e-12, 1e-6, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(M, d, r, norm, eps, seed):
    x, down, up, w = make_inputs(M, d, r, torch.float32, "cpu", seed, norm, strided=seed % 2 == 0)
    ours = run_both(x, down, up, w, eps)[0]
    oracle = run_both(*(t.double() if t is not None else None for t in (x, down, up, w)), eps)[1]
    for i, (a, b) in enumerate(zip(ours, oracle)):
        assert_close_fp32(f"output {i}", a, b)


def test_leading_dims_are_flattened():
    x, down, up, w = make_inputs(24, 16, 4, torch.float32, "cpu")
    y = ops.rla(x.view(2, 3, 4, 16), down, up, w)
    assert y.shape == (2, 3, 4, 16)
    torch.testing.assert_close(y.view(24, 16), ops.rla(x, down, up, w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "plain"])
def test_gradcheck_fp64(device, norm):
    ins = [t.requires_grad_() for t in make_inputs(5, 7, 3, torch.float64, device, norm=norm) if t is not None]
    fn = (lambda x, d, u, w: ops.rla(x, d, u, w, 1e-6)) if norm else (lambda x, d, u: ops.rla(x, d, u))
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "plain"])
def test_opcheck(device, norm):
    x, down, up, w = make_inputs(9, 12, 3, torch.float32, device, norm=norm)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) if t is not None else None for t in (x, down, up, w)]
        torch.library.opcheck(torch.ops.comet.rla.default, (*args, 1e-6))
    torch.library.opcheck(torch.ops.comet.rla_backward.default, (torch.randn_like(x), x, down, up, w, 1e-6))


@pytest.mark.parametrize("device", devices_for("rla"))
def test_same_inputs_give_the_same_bits(device):
    """Run again (float32), the forward and every gradient are bit for bit the same (no atomics,
    a fixed reduction order). On the CPU the weight gradients sum per-thread partials, so they may
    change in the last bits with torch.get_num_threads() (docs/ops.md)."""
    g = torch.Generator().manual_seed(0)
    x, down, up, w = (torch.randn(s, generator=g).to(device).requires_grad_()
                      for s in ((517, 256), (8, 256), (256, 8), (256,)))
    assert_deterministic(lambda *a: ops.rla(*a, 1e-6), [x, down, up, w])
