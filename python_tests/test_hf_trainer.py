"""CometForCausalLM under Hugging Face's own training tools: transformers.Trainer (bf16
autocast, evaluation, save_model -> from_pretrained) and HF's activation-checkpointing
switch, which maps to the forward's per-(layer, chunk) recomputation."""
from __future__ import annotations

import pytest
import torch
from modeling_utils import VOCAB, tiny_comet
from transformers import Trainer, TrainingArguments
from transformers.utils import ModelOutput

from comet_ext import CometForCausalLM


def counting_data(n: int, length: int, seed: int) -> list[dict]:
    """Learnable sequences: each token is the previous one + 1 (mod VOCAB), random starts."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    ids = (starts + torch.arange(length)) % VOCAB
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def test_forward_returns_an_hf_model_output():
    model = tiny_comet("qwen3")
    ids = torch.randint(0, VOCAB, (2, 40))
    out = model(ids, labels=ids)
    assert isinstance(out, ModelOutput)
    assert out["loss"] is out.loss is out[0] and out[1] is out.logits and out.logits.shape == (2, 40, VOCAB)
    plain = model(ids)  # no labels: no loss, and the logits come first
    assert plain.loss is None and plain[0] is plain.logits


def test_transformers_trainer_trains_evaluates_and_saves(tmp_path):
    torch.manual_seed(0)
    model = tiny_comet("qwen3").train()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=30, per_device_train_batch_size=4,
                             learning_rate=3e-3, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=5, disable_tqdm=True, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=counting_data(64, 50, 0),
                      eval_dataset=counting_data(8, 50, 1))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = trainer.evaluate()["eval_loss"]
    assert losses[-1] < 0.6 * losses[0] and after < 0.6 * before, (losses, before, after)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = CometForCausalLM.from_pretrained(str(tmp_path / "saved"))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_checkpointing_switch_turns_on_recomputation(monkeypatch):
    model = tiny_comet("llama").train()
    ids = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(2))
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    assert not calls and not model.is_activation_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    recomputed = grads()
    assert len(calls) == 2 * 4  # every (layer, chunk) step: 2 layers x 4 chunks of 16 for 50 tokens
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b)
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation_checkpointing_kwargs={"use_reentrant": True}), "use_reentrant=True"),
    (dict(activation_checkpointing_kwargs={"preserve_rng_state": False}), "preserve_rng_state"),
    (dict(every_n_layers=2), "every_n_layers=2"),
    (dict(offload=True), "offload=True"),
])
def test_unsupported_checkpointing_options_are_refused(kwargs, match):
    model = tiny_comet("llama")
    with pytest.raises(ValueError, match=match):
        model.activation_checkpointing_enable(**kwargs)
    assert not model.is_activation_checkpointing


def test_trainer_resumes_from_its_checkpoint_exactly(tmp_path):
    def trainer():
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                 learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="steps", save_steps=6,
                                 logging_steps=3, disable_tqdm=True, seed=0)
        return Trainer(model=tiny_comet("qwen3").train(), args=args, train_dataset=counting_data(48, 50, 0))

    full = trainer()
    full.train()
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_save_pretrained_takes_hfs_arguments(tmp_path):
    model = tiny_comet("llama")
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "given", state_dict=state)
    loaded = CometForCausalLM.from_pretrained(tmp_path / "given")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    with pytest.raises(TypeError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "x", max_shard_size="1GB")
    with pytest.raises(ValueError, match="safe_serialization=False"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match="push_to_hub=True"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    assert not (tmp_path / "x").exists()


def test_gradient_accumulation_in_transformers_trainer_is_the_token_mean_of_the_step(tmp_path):
    """transformers.Trainer passes num_items_in_batch (the step's labelled tokens) to a model that
    accepts it: one SGD step on two samples of 40 and 5 labelled tokens is the same update in one
    micro-batch or two. CometForCausalLM did not accept it, and HF then averaged the micro-batch
    means (a 10x different update here)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, VOCAB, (40,), generator=g) for _ in range(2))
    short = b.clone()
    short[:35] = -100
    data = [{"input_ids": a, "labels": a.clone()}, {"input_ids": b, "labels": short}]

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def update(batch_size, accumulation):
        model = tiny_comet("llama").train()
        before = [p.detach().clone() for p in model.parameters()]
        args = TrainingArguments(output_dir=str(tmp_path / f"run{accumulation}"), max_steps=1,
                                 per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                 learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0,
                                 use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
        InOrder(model=model, args=args, train_dataset=data).train()
        return [p.detach() - q for p, q in zip(model.parameters(), before)]

    for one, two in zip(update(2, 1), update(1, 2)):
        torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-6)
