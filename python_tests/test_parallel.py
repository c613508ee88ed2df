"""The layer-level pipeline on 2 and 4 gloo ranks equals one process: loss and every gradient."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comet_ext.parallel import block_of

HERE = os.path.dirname(os.path.abspath(__file__))


def _model_and_batch():
    sys.path.insert(0, HERE)
    from modeling_utils import tiny_comet

    model = tiny_comet("qwen3").train()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 97, (2, 75), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    mask[1, 61:] = 0
    labels[1, 61:] = -100
    return model, ids, labels, mask


def _exit_quietly() -> None:
    """Leave the worker without running C++ static destructors: gloo's background
    threads occasionally abort there ("terminate called without an active
    exception") after all work and the results are done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, store: str, out: str, chunk_sizes: list[int]) -> None:
    from comet_ext.parallel import all_reduce_grads, pipeline_loss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, ids, labels, mask = _model_and_batch()
    loss = pipeline_loss(model, ids, labels, chunk_sizes, mask, recompute=True)
    loss.backward()
    all_reduce_grads(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total, "grads": {n: p.grad for n, p in model.named_parameters()}}, out)
    dist.barrier()  # no rank tears gloo down while another still talks
    dist.destroy_process_group()
    _exit_quietly()


@pytest.mark.parametrize("world, chunk_sizes", [(2, [16, 16, 16, 16, 11]), (4, [16, 9, 16, 3, 16, 15]),
                                                (2, [40, 35])], ids=["2-ranks-5-chunks", "4-ranks-6-chunks",
                                                                     "2-ranks-2-chunks"])
def test_pipeline_equals_one_process(tmp_path, world, chunk_sizes):
    model, ids, labels, mask = _model_and_batch()
    expected = model(ids, labels=labels, chunk_sizes=chunk_sizes, attention_mask=mask).loss
    expected.backward()
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), out, chunk_sizes), nprocs=world, join=True)
    got = torch.load(out)
    torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


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

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    pipeline_group, data_group = make_mesh(2)
    model = tiny_comet("llama").train()
    cfg = TrainConfig(total_steps=2, batch_size=1, lr=3e-3, progress=False)
    trainer = Trainer(model, synthetic_recall(8, 60, vocab=97), cfg, ChunkPlanner(16, mix={"fixed": 1.0}),
                      pipeline_group=pipeline_group, data_group=data_group)
    trainer.train()
    if rank == 0:
        torch.save(model.state_dict(), out)
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
    Trainer(model, synthetic_recall(8, 60, vocab=97), cfg, ChunkPlanner(16, mix={"fixed": 1.0})).train()
    out = str(tmp_path / "weights.pt")
    mp.spawn(_mesh_worker, args=(4, str(tmp_path / "store"), out), nprocs=4, join=True)
    got = torch.load(out)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-5, msg=name)


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
    assert "comet_ext pipeline: sending a layer's memory state to rank 1 failed" in open(out).read()
