"""The layer-level pipeline on 2 and 4 gloo ranks equals one process: loss and every gradient."""
from __future__ import annotations

import datetime
import os
import re
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comet_ext.parallel import block_of

HERE = os.path.dirname(os.path.abspath(__file__))


# A short process-group timeout: a pipeline that stalls fails a test in seconds, not in
# gloo's default 30 minutes (every wait here is for a peer's few-second share of the work).
_TIMEOUT = datetime.timedelta(seconds=30)


def _model_and_batch(case: str = "plain", chunk_size: int = 16):
    """The model (chunks of at most `chunk_size` tokens) and batch the pipeline tests
    share; `case` varies what trains:
    "labels-on-rank-0-only": with chunks [16, 16, 16, 16, 11] on 2 ranks, rank 1's
    chunks (tokens 48..74) have no label; "only-lm-head": nothing but lm_head trains,
    so nothing rank 0 sends needs a gradient."""
    sys.path.insert(0, HERE)
    from modeling_utils import tiny_comet

    model = tiny_comet("qwen3", chunk_size=chunk_size).train()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 97, (2, 75), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    mask[1, 61:] = 0
    labels[1, 61:] = -100
    if case == "labels-on-rank-0-only":
        labels[:, 35:] = -100
    elif case == "only-lm-head":
        for name, p in model.named_parameters():
            p.requires_grad_("lm_head" in name)
    else:
        assert case == "plain", case
    return model, ids, labels, mask


def _exit_quietly() -> None:
    """Leave the worker without running C++ static destructors: gloo's background
    threads occasionally abort there ("terminate called without an active
    exception") after all work and the results are done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, store: str, out: str, chunk_sizes: list[int], case: str = "plain",
            bf16: bool = False) -> None:
    from comet_ext.parallel import all_reduce_grads, pipeline_loss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=_TIMEOUT)
    torch.set_num_threads(1)
    model, ids, labels, mask = _model_and_batch(case, max(16, *chunk_sizes))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = pipeline_loss(model, ids, labels, chunk_sizes, mask, recompute=True)
    loss.backward()
    all_reduce_grads(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total, "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}},
                   out)
    dist.barrier()  # no rank tears gloo down while another still talks
    dist.destroy_process_group()
    _exit_quietly()


@pytest.mark.parametrize("world, chunk_sizes", [(2, [16, 16, 16, 16, 11]), (4, [16, 9, 16, 3, 16, 15]),
                                                (2, [40, 35])], ids=["2-ranks-5-chunks", "4-ranks-6-chunks",
                                                                     "2-ranks-2-chunks"])
def test_pipeline_equals_one_process(tmp_path, world, chunk_sizes):
    # A chunk may not be longer than comet_config.chunk_size: 2-ranks-2-chunks takes a model of 40.
    model, ids, labels, mask = _model_and_batch("plain", max(16, *chunk_sizes))
    expected = model(ids, labels=labels, chunk_sizes=chunk_sizes, attention_mask=mask).loss
    expected.backward()
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), out, chunk_sizes), nprocs=world, join=True)
    got = torch.load(out)
    torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _one_process_and_pipeline(tmp_path, case: str, bf16: bool):
    """(loss, grads) of one process and of the 2-rank pipeline on chunks [16, 16, 16, 16, 11]."""
    chunk_sizes = [16, 16, 16, 16, 11]
    model, ids, labels, mask = _model_and_batch(case)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        expected = model(ids, labels=labels, chunk_sizes=chunk_sizes, attention_mask=mask, return_logits=False).loss
    expected.backward()
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out, chunk_sizes, case, bf16), nprocs=2, join=True)
    got = torch.load(out)
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(trained)
    return expected.detach(), trained, got["loss"], got["grads"]


def test_pipeline_under_bf16_autocast_equals_one_process(tmp_path):
    """Under autocast a layer hands back part of its memory in bfloat16; the pipeline
    still sends it in the format the receiver expects (it sent bfloat16 into float32
    buffers: garbage values, then a gloo abort in backward)."""
    expected, grads, loss, got = _one_process_and_pipeline(tmp_path, "plain", bf16=True)
    # The receiving rank computes from a float32 copy of the bfloat16 rows the sender had, where
    # one process keeps them in bfloat16: equal up to bfloat16 rounding, no more.
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    for name, g in grads.items():
        scale = g.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(got[name] / scale, g / scale, rtol=0, atol=3e-2, msg=name)


@pytest.mark.parametrize("case", ["labels-on-rank-0-only", "only-lm-head"])
def test_pipeline_with_a_side_that_needs_no_gradient_equals_one_process(tmp_path, case):
    """Every memory state sent forward has its gradient sent back, whether the receiver's
    loss depends on it (labels-on-rank-0-only: it did not, and rank 0 waited for a
    gradient never sent) or the sender's state needs one (only-lm-head: it did not, and
    rank 1 sent a gradient nobody received)."""
    expected, grads, loss, got = _one_process_and_pipeline(tmp_path, case, bf16=False)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _mismatch_worker(rank: int, world: int, store: str, out: str, case: str) -> None:
    import dataclasses

    from comet_ext.parallel import pipeline_loss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=10))
    torch.set_num_threads(1)
    model, ids, labels, mask = _model_and_batch()
    sizes = [16, 16, 16, 16, 11]
    if case == "labels":
        labels = labels[:, 1:]  # shifted by hand: a loss over the wrong targets, on every rank
    elif rank == 1:
        if case == "dtype":
            model.double()  # its memory state: float64 where rank 0 sends float32
        elif case == "ids":
            ids = ids.clone()
            ids[1, 5] = (ids[1, 5] + 1) % 97
        elif case == "chunk_sizes":
            sizes = [16, 16, 16, 11, 16]
        elif case == "comet_config":
            model.comet_config = dataclasses.replace(model.comet_config, temp_stride=2)
    try:
        pipeline_loss(model, ids, labels, sizes, mask).backward()
    except Exception as e:  # noqa: BLE001 - the point is which error, and that it comes
        with open(f"{out}.{rank}", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
    _exit_quietly()


@pytest.mark.parametrize("case, rank, pattern", [
    ("dtype", 1, r"rank 0 sends .* torch.float32.* but this rank's wire format is .*torch.float64"),
    ("ids", 1, r"rank 0 runs this step on another batch"),
    ("chunk_sizes", 1, r"rank 0 runs this step on another batch .*other chunk sizes"),
    ("comet_config", 1, r"rank 0 runs this step on another batch .*CoMeT config"),
    ("labels", 0, r"labels \(2, 74\) must be a tensor of the shape of input_ids \(2, 75\)")])
def test_ranks_that_disagree_stop_with_an_error(tmp_path, case, rank, pattern):
    """A receiver whose buffers differ from what the sender sends is an error naming both
    formats (gloo took the float32 bytes into float64 buffers as garbage); ranks given other
    batches, chunk sizes or CoMeT configs, which exchange state of the same shapes, gave a
    wrong loss with no word, and labels not of the ids' shape a loss over the wrong targets."""
    out = str(tmp_path / "error")
    ctx = mp.start_processes(_mismatch_worker, args=(2, str(tmp_path / "store"), out, case), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=90)
    assert all(p.exitcode is not None for p in ctx.processes), "a rank hung"
    assert os.path.exists(f"{out}.{rank}"), f"rank {rank} ran on without an error"
    message = open(f"{out}.{rank}").read()
    assert re.search(pattern, message), message


def test_a_tensor_off_the_wire_format_is_refused_before_it_is_sent():
    from comet_ext.parallel import _send

    fmt = (torch.Size([2, 4, 8]), torch.float32)
    with pytest.raises(RuntimeError, match=r"torch.bfloat16.*wire format.*torch.float32"):
        _send(torch.zeros(2, 4, 8, dtype=torch.bfloat16), fmt, 1, None, "a layer's memory state")
    with pytest.raises(RuntimeError, match=r"\(2, 4, 7\).*wire format.*\(2, 4, 8\)"):
        _send(torch.zeros(2, 4, 7), fmt, 1, None, "a layer's memory state")


def test_blocks_cover_the_chunks_and_refuse_too_many_ranks():
    for n, size in [(5, 2), (7, 4), (8, 4), (4, 4)]:
        blocks = [block_of(r, size, n) for r in range(size)]
        assert [t for b in blocks for t in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ValueError, match="3 chunks cannot be shared by 4 ranks"):
        block_of(0, 4, 3)


def _mesh_worker(rank: int, world: int, store: str, out: str) -> None:
    sys.path.insert(0, HERE)
    from modeling_utils import tiny_comet

    from comet_ext.data import synthetic_recall
    from comet_ext.parallel import make_mesh
    from comet_ext.planner import ChunkPlanner
    from comet_ext.training import TrainConfig, Trainer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=_TIMEOUT)
    torch.set_num_threads(1)
    pipeline_group, data_group = make_mesh(2)
    model = tiny_comet("llama").train()
    cfg = TrainConfig(total_steps=2, batch_size=1, lr=3e-3, progress=False)
    trainer = Trainer(model, synthetic_recall(8, 60, vocab=97), cfg, ChunkPlanner(16, mix={"fixed": 1.0}),
                      pipeline_group=pipeline_group, data_group=data_group)
    trainer.train()
    if rank == 0:
        torch.save({"weights": model.state_dict(), "losses": [h["loss"] for h in trainer.history]}, out)
    dist.barrier()
    dist.destroy_process_group()
    _exit_quietly()


def test_data_by_pipeline_mesh_trains_like_one_process(tmp_path):
    """4 ranks as 2 data replicas x 2 pipeline stages, batch 1 each, equal the weights of
    one process training on batches of 2 (equal-length samples: the means agree)."""
    from modeling_utils import tiny_comet

    from comet_ext.data import synthetic_recall
    from comet_ext.planner import ChunkPlanner
    from comet_ext.training import TrainConfig, Trainer

    model = tiny_comet("llama").train()
    cfg = TrainConfig(total_steps=2, batch_size=2, lr=3e-3, progress=False)
    history = Trainer(model, synthetic_recall(8, 60, vocab=97), cfg, ChunkPlanner(16, mix={"fixed": 1.0})).train()
    out = str(tmp_path / "weights.pt")
    mp.spawn(_mesh_worker, args=(4, str(tmp_path / "store"), out), nprocs=4, join=True)
    got = torch.load(out)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got["weights"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    # the logged loss is the step's, over both replicas (it was replica 0's alone)
    assert got["losses"] == pytest.approx([h["loss"] for h in history], rel=1e-5)


def _average_worker(rank: int, world: int, store: str, out: str, lengths: tuple[int, int]) -> None:
    sys.path.insert(0, HERE)
    from modeling_utils import tiny_comet

    from comet_ext.parallel import average_over_data

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=_TIMEOUT)
    torch.set_num_threads(1)
    model = tiny_comet("llama").train()
    ids = torch.randint(0, 97, (1, lengths[rank]), generator=torch.Generator().manual_seed(rank))
    model(ids, labels=ids).loss.backward()  # one chunk (10 tokens): no gradient reaches the gate
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    average_over_data(model, dist.group.WORLD)
    torch.save({"before": grads, "after": {n: p.grad for n, p in model.named_parameters()}}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    _exit_quietly()


@pytest.mark.parametrize("lengths", [(10, 40), (10, 12)], ids=["one-replica-short", "both-short"])
def test_average_over_data_when_replicas_have_no_gradient_for_some_parameters(tmp_path, lengths):
    """A replica whose batch never reached some module (one chunk: no gated update) skipped their
    all_reduce: its gradients of them stayed its own and the other replica hung or aborted. Where
    another replica has one, it counts as zeros; where none has, the gradient stays None, as in one
    process (zeros would let the optimizer move the parameter by its momentum and weight decay)."""
    out = str(tmp_path / "grads")
    ctx = mp.start_processes(_average_worker, args=(2, str(tmp_path / "store"), out, lengths), nprocs=2,
                             join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=90)
    assert [p.exitcode for p in ctx.processes] == [0, 0], "a replica hung or failed"
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    missing = [n for n, g in r0["before"].items() if g is None]
    assert missing
    for name, g0 in r0["before"].items():
        g1 = r1["before"][name]
        if g0 is None and g1 is None:
            assert r0["after"][name] is None and r1["after"][name] is None, name
            continue
        like = g0 if g0 is not None else g1
        expected = sum(torch.zeros_like(like) if g is None else g for g in (g0, g1)) / 2
        torch.testing.assert_close(r0["after"][name], expected, msg=name)
        torch.testing.assert_close(r1["after"][name], expected, msg=name)
    assert (lengths[1] > 16) == all(r1["before"][n] is not None for n in missing)


def _failing_worker(rank: int, world: int, store: str, out: str) -> None:
    import datetime

    from comet_ext.parallel import pipeline_loss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=10))
    if rank == 1:
        raise SystemExit(3)  # a stage dies before its first receive
    model, ids, labels, mask = _model_and_batch()
    try:
        pipeline_loss(model, ids, labels, [16, 16, 16, 16, 11], mask).backward()
    except Exception as e:  # noqa: BLE001 - the point is which error, and that it comes
        with open(out, "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise SystemExit(4)


def test_a_failed_rank_stops_the_others_with_an_error(tmp_path):
    import time

    out = str(tmp_path / "error.txt")
    ctx = mp.start_processes(_failing_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=False,
                             start_method="spawn")
    start = time.time()
    for p in ctx.processes:
        p.join(timeout=90)
    assert all(p.exitcode is not None for p in ctx.processes), "a rank hung"
    assert time.time() - start < 90
    assert ctx.processes[0].exitcode == 4
    # Its first send (the wire format, or the state itself) is what fails.
    assert re.search(r"comet_ext pipeline: sending .*a layer's memory state.* to rank 1 failed", open(out).read())
