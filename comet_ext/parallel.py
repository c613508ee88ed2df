"""Layer-level pipeline over torch.distributed (DESIGN.md §1, "layer-order freedom").

The chunks of a sequence are split into contiguous blocks, one per rank of a
pipeline group. For each layer l, rank k receives layer l's memory state (as it
stands after all earlier chunks) from rank k-1, runs layer l over its chunks,
sends the state on to rank k+1, and moves to layer l+1 while rank k+1 works on
layer l: a wavefront. Backward sends the memory-state gradients back along the
same edges. Each rank's loss covers its own tokens; parameter gradients are
summed over all ranks (pipeline and data) afterwards.

    dist.init_process_group("gloo")          # torchrun --nproc-per-node 4 ...
    loss = pipeline_loss(model, input_ids, labels, chunk_sizes, attention_mask)
    loss.backward()
    all_reduce_grads(model)

Works with gloo (CPU) and NCCL (GPU). A failed peer surfaces as an error from
send / recv within the process group's timeout, never as a silent hang.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .train_memory import TrainMemory

# A pipeline edge carries a layer's memory as TrainMemory.to_wire's tensors; the first
# of them carry gradients.
_FLOAT = TrainMemory.WIRE_GRADS


def block_of(rank: int, size: int, n_chunks: int) -> range:
    """Chunks rank `rank` of `size` owns: contiguous, sizes differing by at most one."""
    if n_chunks < size:
        raise ValueError(f"pipeline: {n_chunks} chunks cannot be shared by {size} ranks; give every rank at "
                         f"least one chunk (shorter chunks, or fewer ranks)")
    base, extra = divmod(n_chunks, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _p2p(send: bool, tensor: Tensor, peer: int, group, what: str) -> None:
    """dist.send / dist.recv that says which pipeline edge failed when a peer is gone."""
    try:
        (dist.send if send else dist.recv)(tensor, peer, group=group)
    except RuntimeError as e:
        raise RuntimeError(f"comet_ext pipeline: {'sending' if send else 'receiving'} {what} "
                           f"{'to' if send else 'from'} rank {peer} failed (a peer crashed or timed out): {e}") from e


def _global_rank(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


class _Recv(torch.autograd.Function):
    """Receives a layer's memory state from the previous rank; backward sends its gradient back."""

    @staticmethod
    def forward(ctx, anchor: Tensor, src: int, group, *templates: Tensor):
        ctx.src, ctx.group = src, group
        out = []
        for t in templates:
            buf = torch.empty_like(t, dtype=torch.uint8 if t.dtype == torch.bool else t.dtype)
            _p2p(False, buf, src, group, "a layer's memory state")
            out.append(buf.bool() if t.dtype == torch.bool else buf)
        ctx.mark_non_differentiable(*out[_FLOAT:])
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in out[:_FLOAT]]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        for g, (shape, dtype, device) in zip(grads[:_FLOAT], ctx.shapes):
            g = torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
            _p2p(True, g, ctx.src, ctx.group, "a memory-state gradient")
        return (None, None, None) + (None,) * len(grads)


class _Send(torch.autograd.Function):
    """Sends a layer's memory state to the next rank; returns a zero scalar that ties
    the send into this rank's graph, whose backward receives the state's gradient."""

    @staticmethod
    def forward(ctx, dst: int, group, *state: Tensor):
        ctx.dst, ctx.group = dst, group
        ctx.templates = [(t.shape, t.dtype, t.device) for t in state[:_FLOAT]]
        ctx.n = len(state)
        for t in state:
            _p2p(True, (t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous(), dst, group,
                 "a layer's memory state")
        return state[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for shape, dtype, device in ctx.templates:
            buf = torch.empty(shape, dtype=dtype, device=device)
            _p2p(False, buf, ctx.dst, ctx.group, "a memory-state gradient")
            grads.append(buf)
        return (None, None, *grads) + (None,) * (ctx.n - _FLOAT)


def pipeline_loss(model, input_ids: Tensor, labels: Tensor, chunk_sizes: Optional[Sequence[int]] = None,
                  attention_mask: Optional[Tensor] = None, recompute: bool = True, group=None) -> Tensor:
    """This rank's share of the mean next-token loss of a CometForCausalLM over the
    whole sequence (summing it over the pipeline group gives the single-process
    loss). Every rank passes the same full batch; each computes only its chunks."""
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    plan = model._plan_chunks(input_ids, chunk_sizes, attention_mask)
    segs, xs, ropes, sizes = plan
    mine = block_of(rank, size, len(segs))
    prev = _global_rank(group, rank - 1) if rank > 0 else None
    nxt = _global_rank(group, rank + 1) if rank < size - 1 else None
    B = input_ids.shape[0]
    hidden = {t: xs[t] for t in mine}
    # This rank's positions: logits at text position p predict labels[p + 1].
    targets = dict(zip(mine, model._chunk_targets(labels, [sizes[t] for t in mine], sum(sizes[: mine.start]))))
    anchor = torch.zeros((), device=model.device, requires_grad=True)
    ties, total = [], 0.0
    last = model.config.num_hidden_layers - 1
    wire = (model.config.num_key_value_heads, model._head_dim())
    for l in range(last + 1):
        mem = model._train_memory(B)
        if prev is not None:
            mem = TrainMemory.from_wire(_Recv.apply(anchor, prev, group, *mem.to_wire(*wire)))
        for t in mine:
            target = targets[t] if l == last else None
            out, mem = model._run_train_step(l, segs[t], ropes[t], hidden[t], mem, recompute, target)
            if target is not None:
                total = total + out
            else:
                hidden[t] = out
        if nxt is not None:
            ties.append(_Send.apply(nxt, group, *mem.to_wire(*wire)))
    count = (labels[:, 1:] != -100).sum().clamp(min=1).to(model.device)
    loss = total / count if isinstance(total, Tensor) else anchor * 0
    return loss + sum(ties) if ties else loss


def all_reduce_grads(model, group=None) -> None:
    """Sums parameter gradients over the group (pipeline, or pipeline x data)."""
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)


def make_mesh(pipeline_size: int):
    """Splits the world into a 2-D mesh, data x pipeline: global rank = d * P + p.
    Returns (pipeline_group, data_group) of this rank (data_group is None for a
    single replica). Every rank must call it, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if pipeline_size < 1 or world % pipeline_size:
        raise ValueError(f"make_mesh: the world of {world} ranks does not split into pipelines of {pipeline_size}")
    replicas = world // pipeline_size
    pipeline_group = data_group = None
    for d in range(replicas):  # every rank creates every group, in one order
        g = dist.new_group(list(range(d * pipeline_size, (d + 1) * pipeline_size)))
        if rank // pipeline_size == d:
            pipeline_group = g
    for p in range(pipeline_size):
        g = dist.new_group(list(range(p, world, pipeline_size))) if replicas > 1 else None
        if rank % pipeline_size == p:
            data_group = g
    return pipeline_group, data_group


def average_over_data(model, data_group) -> None:
    """Averages parameter gradients over the data-parallel replicas."""
    if data_group is None:
        return
    n = dist.get_world_size(data_group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=data_group)
            p.grad.div_(n)
