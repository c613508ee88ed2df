"""gated_update against the oracle, with and without a previous state."""
from __future__ import annotations

import pytest
import torch
from conftest import LOW_PRECISION, assert_close_fp32, assert_deterministic, assert_flash_rule, devices_for
from _hypothesis import given, st

from comet_ext import ops
from comet_ext import reference as ref

DEVICES = devices_for("gated_update")


def make_inputs(B, n, d, r, dtype, device, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    readout = torch.randn(B, n, d, generator=g)
    state = torch.randn(B, n, d, generator=g) if with_state else None
    w = 1 + 0.1 * torch.randn(d, generator=g)
    gate = torch.randn(1, 2 * d, generator=g) * (2 * d) ** -0.5
    down = torch.randn(r, d, generator=g) * d**-0.5
    up = torch.randn(d, r, generator=g) * r**-0.5
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (readout, state, w, gate, down, up)]


def run_both(inputs, eps=None, upcast=True):
    g = torch.Generator().manual_seed(3)
    shape = inputs[0].shape
    gs, gm = torch.randn(shape, generator=g).to(inputs[0]), torch.randn(shape, generator=g).to(inputs[0])
    results = []
    for fn in (ops.gated_update, lambda *a: ref.gated_update(*a, upcast=upcast)):
        ins = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
        new, mem = fn(*ins, eps)
        wrt = [t for t in ins if t is not None]
        grads = torch.autograd.grad((new * gs).sum() + (mem * gm).sum(), wrt, allow_unused=True)
        # The oracle leaves the gate unused on the first chunk: its gradient is zero.
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
        results.append((new.detach(), mem.detach(), *grads))
    return results


def as_double(inputs):
    return [t.double() if t is not None else None for t in inputs]


CASES = [
    pytest.param(1, 1, 8, 1, id="one-slot"),
    pytest.param(2, 13, 40, 5, id="odd"),
    pytest.param(3, 64, 128, 8, id="wide"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "first-chunk"])
@pytest.mark.parametrize("B,n,d,r", CASES)
def test_fp32_matches_oracle(device, with_state, B, n, d, r):
    inputs = make_inputs(B, n, d, r, torch.float32, device, with_state=with_state)
    ours = run_both(inputs)[0]
    oracle = run_both(as_double(inputs), eps=torch.finfo(torch.float32).eps)[1]
    for i, (a, b) in enumerate(zip(ours, oracle)):
        assert_close_fp32(f"output {i}", a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,n,d,r", CASES[1:])
def test_low_precision_flash_rule(device, dtype, B, n, d, r):
    inputs = make_inputs(B, n, d, r, dtype, device)
    eps = torch.finfo(dtype).eps
    ours = run_both(inputs)[0]
    low = run_both(inputs, upcast=False)[1]
    hi = run_both([t.float() for t in inputs], eps=eps)[1]
    for i, (a, lo, h) in enumerate(zip(ours, low, hi)):
        assert a.dtype == dtype
        assert_flash_rule(f"output {i}", a, lo, h)


def test_first_chunk_gate_gets_zero_grad():
    inputs = make_inputs(2, 3, 8, 2, torch.float32, "cpu", with_state=False)
    gate = inputs[3].clone().requires_grad_()
    new, mem = ops.gated_update(inputs[0], None, inputs[2], gate, inputs[4], inputs[5])
    (g,) = torch.autograd.grad(mem.sum() + new.sum(), gate)
    assert torch.equal(g, torch.zeros_like(gate))


def test_default_eps_is_dtype_eps():
    inputs = make_inputs(1, 4, 16, 2, torch.float32, "cpu")
    inputs[0] = inputs[0] * 1e-4  # small rows: eps matters
    a = ops.gated_update(*inputs)
    b = ref.gated_update(*as_double(inputs), eps=torch.finfo(torch.float32).eps)
    for x, y in zip(a, b):
        assert_close_fp32("default eps", x, y)


@given(
    B=st.integers(1, 3),
    n=st.integers(1, 20),
    d=st.integers(1, 100),
    r=st.integers(1, 8),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, n, d, r, with_state, seed):
    inputs = make_inputs(B, n, d, r, torch.float32, "cpu", seed, with_state)
    ours = run_both(inputs, eps=1e-6)[0]
    oracle = run_both(as_double(inputs), eps=1e-6)[1]
    for i, (a, b) in enumerate(zip(ours, oracle)):
        assert_close_fp32(f"output {i}", a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "first-chunk"])
def test_gradcheck_fp64(device, with_state):
    inputs = make_inputs(2, 3, 6, 2, torch.float64, device, with_state=with_state)
    ins = [t.requires_grad_() for t in inputs if t is not None]

    def fn(*args):
        if with_state:
            return ops.gated_update(*args, eps=1e-6)
        readout, *rest = args
        return ops.gated_update(readout, None, *rest, eps=1e-6)

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "first-chunk"])
def test_opcheck(device, with_state):
    inputs = make_inputs(2, 5, 12, 3, torch.float32, device, with_state=with_state)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) if t is not None else None for t in inputs]
        torch.library.opcheck(torch.ops.comet.gated_update.default, (*args, 1e-6))
    g = torch.randn_like(inputs[0])
    torch.library.opcheck(torch.ops.comet.gated_update_backward.default, (g, g.clone(), *inputs, 1e-6))


# ---------------------------------------------------------------- gate_snap


def snap_inputs(device, dtype=torch.float32):
    """Inputs whose gate logits are set slot by slot to LOGITS (gates 0.12 .. 0.993): each state
    row is moved along the gate's state half until its logit is the one asked for. Gates fall on
    both sides of 0.9 and none within 0.04 of it, so rounding cannot flip a slot between the kernel
    and the oracle. Returns (inputs, gates (B, n))."""
    readout, state, w, gate, down, up = make_inputs(2, 14, 24, 3, torch.float64, "cpu", seed=5)
    c = ref.rms_norm(readout, w, 1e-6)
    z = (torch.cat([c, state], -1) @ gate.t()).squeeze(-1)
    target = torch.tensor(LOGITS, dtype=torch.float64).repeat(2, 2)
    u = gate[0, 24:]
    state = state + (target - z).unsqueeze(-1) * u / u.dot(u)
    g = torch.sigmoid((torch.cat([c, state], -1) @ gate.t()).squeeze(-1))
    return [t.to(device=device, dtype=dtype) for t in (readout, state, w, gate, down, up)], g.to(device)


LOGITS = [-2.0, -0.5, 0.5, 1.5, 3.0, 4.0, 5.0]  # sigmoid: 0.12 0.38 0.62 0.82 | 0.95 0.98 0.993


@pytest.mark.parametrize("device", DEVICES)
def test_snapped_slots_keep_their_state_exactly(device):
    inputs, g = snap_inputs(device)
    new, _ = ops.gated_update(*inputs, gate_snap=0.9)
    state = inputs[1]
    kept = g > 0.9
    assert int(kept.sum()) == 12 and ((g - 0.9).abs() > 0.04).all()
    assert torch.equal(new[kept], state[kept])
    unsnapped, _ = ops.gated_update(*inputs)
    assert torch.equal(new[~kept], unsnapped[~kept])  # rows under the threshold: the plain blend
    assert not torch.equal(unsnapped[kept], state[kept])  # the snap is what kept them


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=["fp32", "bf16", "fp16"])
def test_snap_matches_oracle(device, dtype):
    """Outputs and every gradient (straight through the snap) against the oracle's."""
    inputs, _ = snap_inputs(device, dtype)
    shape = inputs[0].shape
    gen = torch.Generator().manual_seed(3)
    gs, gm = (torch.randn(shape, generator=gen).to(inputs[0]) for _ in range(2))
    results = []
    for fn, ins in ((ops.gated_update, inputs), (ref.gated_update, [t.double() for t in inputs])):
        ins = [t.detach().clone().requires_grad_() for t in ins]
        new, mem = fn(*ins, 1e-6, gate_snap=0.9)
        grads = torch.autograd.grad((new * gs.to(new)).sum() + (mem * gm.to(mem)).sum(), ins)
        results.append((new, mem, *grads))
    for i, (a, b) in enumerate(zip(*results)):
        if dtype == torch.float32:
            assert_close_fp32(f"output {i}", a.detach(), b.detach().float())
        else:
            torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=0.05, atol=0.05,
                                       msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_snap_gradient_is_straight_through(device):
    """The gate's gradient with the snap equals the unsnapped one's at the same point, up to
    what the snap changes downstream (here nothing: only new_state's gradient along the gate)."""
    inputs, g = snap_inputs(device, torch.float64)
    readout, state, w, gate, down, up = inputs
    gate = gate.clone().requires_grad_()
    grads = []
    for snap in (1.0, 0.9):
        new, _ = ops.gated_update(readout, state, w, gate, down, up, 1e-6, gate_snap=snap)
        (dg,) = torch.autograd.grad((new * (state - ref.rms_norm(readout, w, 1e-6))).sum(), gate)
        grads.append(dg)
    # d new / d g = state - c is the same snapped or not, and so is sigmoid'(z): equal gradients.
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    assert grads[0].abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_snap_gradcheck_fp64_below_threshold(device):
    """Where no gate is snapped the op is smooth: gradcheck with the snap on."""
    inputs, g = snap_inputs(device, torch.float64)
    ins = [t.requires_grad_() for t in inputs]
    snap = 0.995  # above every gate (the largest is sigmoid(5) = 0.9933)
    assert float(g.max()) < snap
    assert torch.autograd.gradcheck(lambda *a: ops.gated_update(*a, eps=1e-6, gate_snap=snap), ins,
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_snap_opcheck(device):
    inputs, _ = snap_inputs(device)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in inputs]
        torch.library.opcheck(torch.ops.comet.gated_update.default, (*args, 1e-6, 0.9))
    g = torch.randn_like(inputs[0])
    torch.library.opcheck(torch.ops.comet.gated_update_backward.default, (g, g.clone(), *inputs, 1e-6, 0.9))


@pytest.mark.parametrize("device", devices_for("gated_update"))
def test_same_inputs_give_the_same_bits(device):
    """Run again (float32), both outputs and every gradient are bit for bit the same (see rla's
    test)."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g).to(device).requires_grad_()
               for s in ((3, 37, 256), (3, 37, 256), (256,), (1, 512), (8, 256), (256, 8))]
    assert_deterministic(ops.gated_update, tensors)
