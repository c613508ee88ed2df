"""CometForCausalLM under Hugging Face's own training tools: transformers.Trainer (bf16
autocast, evaluation, save_model -> from_pretrained, data parallel over DDP) and HF's
activation-checkpointing switch, which maps to the forward's per-(layer, chunk) recomputation."""
from __future__ import annotations

import copy

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


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_trainer_resumes_from_its_checkpoint_exactly(tmp_path, monkeypatch, sharded):
    """Also from checkpoints in HF's sharded layout (a model over max_shard_size, 50GB by
    default: here a few KB), which transformers.Trainer reads shard by shard."""
    if sharded:
        save = CometForCausalLM.save_pretrained
        monkeypatch.setattr(CometForCausalLM, "save_pretrained",
                            lambda self, *a, **kw: save(self, *a, **{"max_shard_size": 20_000, **kw}))

    def trainer():
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                 learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="steps", save_steps=6,
                                 logging_steps=3, disable_tqdm=True, seed=0)
        return Trainer(model=tiny_comet("qwen3").train(), args=args, train_dataset=counting_data(48, 50, 0))

    full = trainer()
    full.train()
    resumed = trainer()
    assert ("model.safetensors.index.json" in {p.name for p in (tmp_path / "checkpoint-6").iterdir()}) == sharded
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
    with pytest.raises(TypeError, match="variant"):
        model.save_pretrained(tmp_path / "x", variant="fp16")
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


def padded(samples: list[dict]) -> dict:
    """Right-pads a batch as DataCollatorForSeq2Seq does: ids with 0, labels with -100, and the mask."""
    n = max(len(s["input_ids"]) for s in samples)

    def pad(key, value):
        return torch.stack([torch.cat([s[key], torch.full((n - len(s[key]),), value)]) for s in samples])

    mask = torch.stack([(torch.arange(n) < len(s["input_ids"])).long() for s in samples])
    return {"input_ids": pad("input_ids", 0), "labels": pad("labels", -100), "attention_mask": mask}


def uneven_data(n: int, seed: int) -> list[dict]:
    """Counting sequences of 8..40 tokens whose first few labels are masked (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length, start = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((8, 41), (0, VOCAB)))
        ids = (start + torch.arange(length)) % VOCAB
        labels = ids.clone()
        labels[:int(torch.randint(1, length - 1, (1,), generator=g))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def next_token_accuracy(pred) -> dict:
    p, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
    keep = labels != -100
    return {"accuracy": float((p[keep] == labels[keep]).mean()), "predicted": int(keep.sum())}


@pytest.mark.parametrize("options", [
    dict(label_smoothing_factor=0.1),  # Trainer pops the labels and shifts them only for causal LMs it knows
    dict(neftune_noise_alpha=5.0),  # noise from a hook on the input embeddings, scaled by the sequence length
    dict(gradient_accumulation_steps=2, max_grad_norm=0.5, optim="adafactor", lr_scheduler_type="cosine",
         warmup_steps=1),
    dict(gradient_checkpointing=True, eval_accumulation_steps=1, include_num_input_tokens_seen=True),
], ids=["label-smoothing", "neftune", "accumulation-adafactor", "checkpointing"])
def test_transformers_trainer_on_one_chunk_without_temp_memory_is_the_base_models(tmp_path, options):
    """With the temporary memory off and every sample within one chunk, CoMeT computes what its base
    model computes, so transformers.Trainer on the two (same weights, seed, data, arguments) logs the
    same losses, grad norms, eval losses and metrics, predicts the same tokens and ends at the same
    base weights (the memory's parameters get no gradient: the readout tokens follow the text).
    Label smoothing was computed against unshifted labels, and NEFTune noise was drawn over
    the chunk's rows, readout tokens included, instead of over the input's tokens."""
    model = tiny_comet("llama", temp_stride=-1, chunk_size=64).train()
    base = copy.deepcopy(model.base).train()
    train, held = uneven_data(16, 0), uneven_data(5, 1)

    def run(m, name):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
                                 per_device_eval_batch_size=2, learning_rate=1e-2, use_cpu=True, report_to=[],
                                 save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                                 prediction_loss_only=False, **options)
        trainer = Trainer(model=m, args=args, train_dataset=train, eval_dataset=held, data_collator=padded,
                          compute_metrics=next_token_accuracy,
                          preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))
        trainer.train()
        logs = [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k
                 and k != "total_flos"}  # (counted from the parameters: the memory's too)
                for h in trainer.state.log_history]
        return logs, trainer.evaluate(), trainer.predict(held)

    (logs, evaluated, predicted), (base_logs, base_evaluated, base_predicted) = run(model, "comet"), run(base, "base")
    assert len(logs) == len(base_logs) == 5
    for got, want in zip(logs, base_logs):
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-4, abs=1e-6), (got, want)
    for key in ("eval_loss", "eval_accuracy", "eval_predicted"):
        assert evaluated[key] == pytest.approx(base_evaluated[key], rel=1e-4), key
    assert (predicted.label_ids == base_predicted.label_ids).all()
    labelled = predicted.label_ids[:, 1:] != -100  # (padded positions' logits are not HF's: they predict nothing)
    assert (predicted.predictions[:, :-1][labelled] == base_predicted.predictions[:, :-1][labelled]).all()
    for (name, a), b in zip(model.base.named_parameters(), base.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=3e-3, msg=name)  # Adam turns rounding into sign flips


def test_packed_rows_and_left_padding_are_refused_by_name():
    """transformers.Trainer keeps a dataset's columns that the forward names and drops the others
    (remove_unused_columns): a pre-packed dataset's position_ids column was dropped without a word and
    its packed rows trained as one sequence each (HF's models read the restarts as boundaries), and
    DataCollatorWithFlattening met a bare TypeError. Positions that ask for nothing still pass."""
    model = tiny_comet("llama")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    plain = model(ids, labels=ids, attention_mask=mask).loss
    counting = torch.arange(20).expand(2, 20).clone()
    counting[1, 15:] = 1  # padding's positions are not read
    for positions in (counting, torch.arange(20).unsqueeze(0)):
        torch.testing.assert_close(model(ids, labels=ids, attention_mask=mask, position_ids=positions).loss, plain)
    packed = torch.cat([torch.arange(12), torch.arange(8)]).unsqueeze(0)
    with pytest.raises(ValueError, match="packed rows .* DataCollatorWithFlattening"):
        model(ids[:1], labels=ids[:1], position_ids=packed)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(ids, position_ids=torch.arange(19).unsqueeze(0))
    with pytest.raises(ValueError, match="right-padded .* padding_side='left'"):
        model(ids, labels=ids, attention_mask=mask.flip(1))


def _ddp_data() -> list[dict]:
    """Four samples over several chunks, with different numbers of labelled tokens: a step's
    loss is the token mean over both replicas' halves only if the replicas agree on the count."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        x = torch.randint(0, VOCAB, (40,), generator=g)
        labels = x.clone()
        labels[:5 + 7 * i] = -100
        rows.append({"input_ids": x, "labels": labels})
    return rows


def _ddp_train(out: str, world: int, checkpointing: bool) -> dict:
    """Two SGD steps of transformers.Trainer over the whole of _ddp_data (one global batch of 4:
    the order of samples within it does not matter) -> the trained model's state dict."""
    model = tiny_comet("qwen3").train()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4 // world, max_steps=2, learning_rate=0.5,
                             optim="sgd", lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", disable_tqdm=True, gradient_checkpointing=checkpointing,
                             ddp_backend="gloo" if world > 1 else None)
    Trainer(model=model, args=args, train_dataset=_ddp_data()).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, world: int, port: int, out: str, checkpointing: bool) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    state = _ddp_train(out + "/run", world, checkpointing)
    if rank == 0:
        torch.save(state, out + "/state.pt")
    torch.distributed.destroy_process_group()  # (left to interpreter exit, gloo's threads may abort it)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_transformers_trainer_data_parallel_equals_one_process(tmp_path, checkpointing):
    """transformers.Trainer over torch DDP (two gloo processes, as torchrun / accelerate launch
    start them; HF's activation-checkpointing switch makes DDP look for no unused parameter)
    trains the weights one process trains on the same global batch: the memory's parameters
    get their gradients on every replica and the token mean spans both."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), checkpointing), nprocs=2, join=True)
    two = torch.load(tmp_path / "state.pt")
    one = _ddp_train(str(tmp_path / "one"), 1, checkpointing)
    start = tiny_comet("qwen3").state_dict()
    assert any(not torch.equal(start[k], one[k]) for k in one if "memory_layers" in k)  # the memory trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
