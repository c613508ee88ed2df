"""The ops under torch.autocast: attention in autocast's dtype, the memory modules in fp32,
gradients back to the callers' dtypes; and a CoMeT model trained and streamed under bf16
autocast (an HF Qwen3 q_norm hands attention fp32 queries beside bf16 keys)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import devices_for
from modeling_utils import tiny_comet

from comet_ext import ops
from test_training import _trainer

DEVICES = devices_for("prefix_attention")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prefix_attention_runs_in_the_autocast_dtype(device, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=g).to(device)  # fp32, as after an fp32-weight q_norm
    k, v = (torch.randn(2, 9, 2, 16, generator=g).to(device, torch.bfloat16) for _ in range(2))
    q_lens, k_lens = torch.tensor([5, 3], device=device), torch.tensor([9, 6], device=device)
    qa, ka, va = _leaves(q, k, v)
    with torch.autocast(device, dtype=dtype):
        out, lse = ops.prefix_attention(qa, ka, va, 0.25, q_lens, k_lens)
    assert out.dtype == dtype and lse.dtype == torch.float32
    qb, kb, vb = _leaves(q, k, v)
    expected, _ = ops.prefix_attention(qb.to(dtype), kb.to(dtype), vb.to(dtype), 0.25, q_lens, k_lens)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    gy = torch.randn(out.shape, generator=g).to(device, dtype)
    got = torch.autograd.grad((out * gy).float().sum(), (qa, ka, va))
    want = torch.autograd.grad((expected * gy).float().sum(), (qb, kb, vb))
    for name, a, b, leaf in zip("qkv", got, want, (q, k, v)):
        assert a.dtype == leaf.dtype, name  # each gradient in its input's dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_memory_modules_run_in_fp32_under_autocast(device):
    g = torch.Generator().manual_seed(1)
    d, r = 32, 4
    x = torch.randn(6, d, generator=g).to(device, torch.bfloat16)  # a bf16 activation
    down, up = (torch.randn(*s, generator=g).to(device) * 0.2 for s in ((r, d), (d, r)))
    w = torch.ones(d, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = ops.rla(x, down, up, w, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ops.rla(x.float(), down, up, w, 1e-6), rtol=0, atol=0)

    readout = torch.randn(2, 3, d, generator=g).to(device, torch.bfloat16)
    state = torch.randn(2, 3, d, generator=g).to(device)
    gate = torch.randn(1, 2 * d, generator=g).to(device) * 0.1
    with torch.autocast(device, dtype=torch.bfloat16):
        new_state, memory = ops.gated_update(readout, state, w, gate, down, up, None)
    assert new_state.dtype == memory.dtype == torch.float32
    want_state, want_memory = ops.gated_update(readout.float(), state, w, gate, down, up, None)
    torch.testing.assert_close(new_state, want_state, rtol=0, atol=0)
    torch.testing.assert_close(memory, want_memory, rtol=0, atol=0)


def test_float64_is_left_alone_by_autocast():
    q, k, v = (torch.randn(1, 3, 2, 8, dtype=torch.float64) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ops.prefix_attention(q, k, v, 0.3)
        y = ops.rla(q.reshape(3, 16), torch.randn(2, 16, dtype=torch.float64),
                    torch.randn(16, 2, dtype=torch.float64), None, 1e-6)
    assert out.dtype == y.dtype == torch.float64


def test_model_training_forward_under_bf16_autocast_tracks_fp32():
    model = tiny_comet("qwen3").train()
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(2))

    def loss_and_grads(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss32, grad32 = loss_and_grads(False)
    loss16, grad16 = loss_and_grads(True)
    assert abs(loss16 - loss32) < 0.02 * loss32, (loss16, loss32)
    assert grad16.dtype == torch.float32 and bool(torch.isfinite(grad16).all())
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item()
    assert cosine > 0.98, cosine


def test_streaming_under_bf16_autocast_keeps_the_memory_in_fp32():
    model = tiny_comet("qwen3")
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model.read(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.read(ids)
    for a, b in zip(eager.buffers(), mixed.buffers()):
        assert b.dtype == a.dtype
        if a.is_floating_point():  # bf16 rounding through 2 layers: ~0.03 at values up to ~3
            torch.testing.assert_close(b, a, rtol=0.02, atol=0.05)
        else:  # FIFO heads and lengths, chunk bookkeeping: exact
            assert torch.equal(a, b)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(ids[:, :3], memory=mixed, max_new_tokens=4)
    assert out.shape == (2, 7) and mixed.buffers()[0].dtype == torch.float32


def test_trainer_bf16_autocast_lowers_the_loss():
    torch.manual_seed(0)
    history = _trainer(tiny_comet("qwen3"), 30, bf16_autocast=True).train()
    first, last = np.mean([h["loss"] for h in history[:3]]), np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.6 * first, (first, last)
