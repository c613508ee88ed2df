"""Every op traces into one graph under torch.compile(fullgraph=True), forward and backward; the whole
model under torch.compile (graph breaks included) computes what the eager one does; torch.export of
it is refused by name."""
from __future__ import annotations

import pytest
import torch
from modeling_utils import VOCAB, tiny_comet
from test_hf_trainer import counting_data
from transformers import Trainer, TrainingArguments

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


# ---------------------------------------------------------------- the whole model under torch.compile
#
# The forward runs a Python loop over chunks, planned from host reads of the input (lengths, which
# chunks hold labels): dynamo breaks the graph there and compiles the pieces. What matters is that
# the compiled model computes what the eager one does, and that what cannot be captured is refused.


def _loss_and_grads(model, fn, **kwargs):
    model.zero_grad(set_to_none=True)
    out = fn(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(model, compiled_model, **kwargs):
    want, want_grads = _loss_and_grads(model, model, **kwargs)
    got, got_grads = _loss_and_grads(model, compiled_model, **kwargs)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    if want.logits is not None:
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_model_forward_backward_equals_eager_over_chunks():
    """torch.compile(model) with AOT autograd (a compiled backward) over three chunks, with padding
    and chosen chunk sizes: the loss, the logits and every parameter's gradient are the eager
    model's."""
    model = tiny_comet("qwen3").train()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    _assert_same_step(model, torch.compile(model, backend="aot_eager"), input_ids=ids,
                      labels=ids.masked_fill(mask == 0, -100), attention_mask=mask, chunk_sizes=[10, 16, 14])


def test_compiled_model_recompiles_and_reads_the_new_weights():
    """A call with another batch shape recompiles (or runs the pieces dynamically), and a call with
    a shape it has seen, after the weights changed in place (an optimizer step), reads the new
    weights: both still equal the eager model."""
    model = tiny_comet("llama").train()
    compiled_model = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 40), generator=g)
    _assert_same_step(model, compiled_model, input_ids=ids, labels=ids)
    other = torch.randint(0, VOCAB, (3, 23), generator=g)
    _assert_same_step(model, compiled_model, input_ids=other, labels=other)
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # (the grads of the last step)
    _assert_same_step(model, compiled_model, input_ids=ids, labels=ids)


def test_compiled_model_trains_as_eager_under_transformers_trainer(tmp_path):
    """TrainingArguments(torch_compile=True), with gradient accumulation (num_items_in_batch): the
    same losses step by step as without compiling."""

    def losses(compile_: bool) -> list[float]:
        torch.manual_seed(0)
        model = tiny_comet("llama").train()
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compile_ else {}
        args = TrainingArguments(output_dir=str(tmp_path / str(compile_)), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=3e-3, use_cpu=True, report_to=[],
                                 save_strategy="no", logging_steps=1, disable_tqdm=True, **extra)
        trainer = Trainer(model=model, args=args, train_dataset=counting_data(12, 37, 0))
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    want = losses(False)
    assert losses(True) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_the_model_is_refused_by_name(strict):
    """The forward has no single graph (its chunk plan is read from the input's values): torch.export
    says so, instead of failing on a data-dependent guard deep inside the input checks."""
    ids = torch.randint(0, VOCAB, (2, 20))
    with pytest.raises(Exception) as caught:
        torch.export.export(tiny_comet("llama"), (ids,), strict=strict)
    # (strict export, through dynamo, reports the exception it observed in its own, or as the cause)
    said = [str(e) for e in (caught.value, caught.value.__cause__, caught.value.__context__) if e is not None]
    assert any("torch.export of CometForCausalLM is not supported" in m for m in said), said
