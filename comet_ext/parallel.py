"""Layer-level pipeline over torch.distributed (docs/model.md, "Layer-order freedom").

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

Two rules keep the ranks in step; neither depends on what a rank computes:
- The wire format (shape and dtype of each tensor an edge carries) follows from
  the model (config, dtype) and the batch size alone, whatever autocast makes of
  the state; the ranks check at the start that they agree, and a tensor off that
  format is an error before it is sent (gloo would take fewer bytes into a larger
  buffer as garbage). With it they compare a fingerprint of the step (the batch's
  ids, labels and mask, the chunk sizes, the layer count and CoMeT config): ranks
  given other batches exchange state of the same shapes and would give a wrong
  loss with no word.
- Every state sent forward has its gradient sent back, zeros where nothing
  depends on it: each edge's send and receive leave a zero "tie" in their rank's
  loss, so backward reaches both ends of every edge whatever requires grad and
  wherever the labels are.
"""
from __future__ import annotations

import json
import zlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .train_memory import TrainMemory, loss_divisor

# A pipeline edge carries a layer's memory as TrainMemory.to_wire's tensors; the first
# of them carry gradients.
_FLOAT = TrainMemory.WIRE_GRADS

# What a tensor's dtype travels as: gloo and NCCL send no bool.
_ON_WIRE = {torch.bool: torch.uint8}
# The dtypes a wire format may name, as the codes the ranks compare at the start.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.bool, torch.uint8, torch.int32,
           torch.int64)
_HEADER = 64  # int64s of an encoded wire format: its length, then the codes, then -1s

# The shape and dtype of each tensor an edge carries, in order.
WireFormat = list[tuple[torch.Size, torch.dtype]]


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


def _describe(fmt: WireFormat) -> str:
    return ", ".join(f"{tuple(shape)} {dtype}" for shape, dtype in fmt)


def _send(t: Tensor, fmt: tuple, peer: int, group, what: str) -> None:
    """Sends t, which must have the wire format fmt = (shape, dtype) the peer's buffer has."""
    shape, dtype = fmt
    if t.shape != shape or t.dtype != dtype:
        raise RuntimeError(f"comet_ext pipeline: {what} for rank {peer} is {tuple(t.shape)} {t.dtype}, off the wire "
                           f"format agreed with it, {tuple(shape)} {dtype}")
    _p2p(True, t.to(_ON_WIRE.get(dtype, dtype)).contiguous(), peer, group, what)


def _recv(fmt: tuple, device, peer: int, group, what: str) -> Tensor:
    shape, dtype = fmt
    buf = torch.empty(shape, dtype=_ON_WIRE.get(dtype, dtype), device=device)
    _p2p(False, buf, peer, group, what)
    return buf.to(dtype)


def _wire_format(model, B: int) -> WireFormat:
    """What an edge carries, from the model (config, dtype) and the batch size only:
    the same on every rank, whatever autocast or the data do."""
    wire = model._train_memory(B).to_wire(model.config.num_key_value_heads, model._head_dim(), dtype=model.dtype)
    return [(t.shape, t.dtype) for t in wire]


def _encode(fmt: WireFormat) -> list[int]:
    codes = []
    for shape, dtype in fmt:
        codes += [_DTYPES.index(dtype), len(shape), *shape]
    if len(codes) >= _HEADER:
        raise ValueError(f"comet_ext pipeline: the wire format {_describe(fmt)} does not fit its header")
    return [len(codes), *codes] + [-1] * (_HEADER - 1 - len(codes))


def _decode(header: list[int]) -> WireFormat:
    codes, fmt, i = header[1:1 + header[0]], [], 0
    while i < len(codes):
        ndim = codes[i + 1]
        fmt.append((torch.Size(codes[i + 2:i + 2 + ndim]), _DTYPES[codes[i]]))
        i += 2 + ndim
    return fmt


def _digest(t: Optional[Tensor], device) -> Tensor:
    """An int64 fingerprint (3,) of an integer tensor: its batch size, its size and a
    position-weighted sum of its values, computed where it lives (no host read; the sum wraps
    modulo 2**64 alike on every rank)."""
    if t is None:
        return torch.full((3,), -1, dtype=torch.long, device=device)
    flat = t.reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.long) * 2654435761 % 4294967291 + 1
    sizes = torch.tensor([t.shape[0] if t.dim() else 0, t.numel()], device=flat.device)
    return torch.cat([sizes, (flat * weights).sum().reshape(1)]).to(device)


def _step_digest(model, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor],
                 sizes: Sequence[int]) -> Tensor:
    """What every rank of a pipeline must share for one call: the batch (ids, labels, mask),
    the chunk sizes, and the model's layer count and CoMeT config: (10,) int64 on the ids' device."""
    settings = json.dumps([list(sizes), model.config.num_hidden_layers, model.comet_config.to_dict()])
    device = input_ids.device
    parts = [_digest(t, device) for t in (input_ids, labels, attention_mask)]
    return torch.cat(parts + [torch.tensor([zlib.crc32(settings.encode())], device=device)])


def _agree_on_the_step(fmt: WireFormat, digest: Tensor, prev: Optional[int], nxt: Optional[int], group,
                       device) -> None:
    """Checks that the previous rank sends what this rank's buffers take (ranks with
    models of other dtypes or configs, or other batches, would otherwise exchange
    garbage) and runs the same step on the same batch (other ids, labels, chunk sizes,
    layer counts or CoMeT configs would give a wrong loss silently, or hang), then tells
    the next rank. Once per pipeline_loss: the format does not change from layer to layer."""
    what = "the wire format of a layer's memory state and the step's fingerprint"
    ours = torch.cat([torch.tensor(_encode(fmt), dtype=torch.long, device=device), digest.to(device)])
    if prev is not None:
        header = torch.empty_like(ours)
        _p2p(False, header, prev, group, what)
        theirs = header.tolist()
        if theirs[:_HEADER] != ours[:_HEADER].tolist():
            raise ValueError(f"comet_ext pipeline: rank {prev} sends a layer's memory state as "
                             f"[{_describe(_decode(theirs))}], but this rank's wire format is [{_describe(fmt)}]: "
                             f"every rank of a pipeline needs the same model (config and dtype) and batch")
        if theirs != ours.tolist():
            raise ValueError(f"comet_ext pipeline: rank {prev} runs this step on another batch (input_ids, labels, "
                             f"attention_mask), other chunk sizes or another model (layers, CoMeT config) than this "
                             f"rank: every rank of a pipeline passes the same full batch to the same model")
    if nxt is not None:
        _p2p(True, ours, nxt, group, what)


class _Recv(torch.autograd.Function):
    """Receives a layer's memory state from the previous rank: (tie, *state), where tie
    is a zero scalar for this rank's loss. The tie makes backward always reach this
    node, which then sends the state's gradient back (zeros for what the loss does not
    depend on: the previous rank waits for it either way)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, src: int, group, fmt: WireFormat):
        ctx.src, ctx.group, ctx.fmt, ctx.device = src, group, fmt, anchor.device
        out = [_recv(f, anchor.device, src, group, "a layer's memory state") for f in fmt]
        ctx.mark_non_differentiable(*out[_FLOAT:])
        return (anchor.new_zeros(()), *out)

    @staticmethod
    def backward(ctx, _tie, *grads):
        for g, (shape, dtype) in zip(grads[:_FLOAT], ctx.fmt):
            g = torch.zeros(shape, dtype=dtype, device=ctx.device) if g is None else g
            _send(g, (shape, dtype), ctx.src, ctx.group, "a memory-state gradient")
        return None, None, None, None


class _Send(torch.autograd.Function):
    """Sends a layer's memory state to the next rank; returns a zero scalar that ties
    the send into this rank's graph, whose backward receives the state's gradient.
    The tie hangs off the anchor too, so backward receives that gradient even when
    nothing on this rank needs it (the next rank sends it either way)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, dst: int, group, fmt: WireFormat, *state: Tensor):
        ctx.dst, ctx.group, ctx.fmt, ctx.device, ctx.n = dst, group, fmt, anchor.device, len(state)
        for t, f in zip(state, fmt):
            _send(t, f, dst, group, "a layer's memory state")
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        grads = [_recv(f, ctx.device, ctx.dst, ctx.group, "a memory-state gradient") for f in ctx.fmt[:_FLOAT]]
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[4:])]
        return (None, None, None, None, *grads) + (None,) * (ctx.n - _FLOAT)


def pipeline_loss(model, input_ids: Tensor, labels: Tensor, chunk_sizes: Optional[Sequence[int]] = None,
                  attention_mask: Optional[Tensor] = None, recompute: bool = True, group=None,
                  num_items_in_batch: Optional[Tensor | int | float] = None) -> Tensor:
    """This rank's share of the mean next-token loss of a CometForCausalLM over the
    whole sequence (summing it over the pipeline group gives the single-process
    loss; the summed loss is divided by num_items_in_batch where given, as in the model's
    forward). Every rank passes the same full batch; each computes only its chunks."""
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    input_ids = model._check_ids(input_ids)
    labels = model._check_labels(labels, input_ids)  # (as the model's forward: a wrong shape is no loss at all)
    segs, xs, ropes, sizes, first = model._plan_chunks(input_ids, chunk_sizes, attention_mask)
    if first is not None:
        raise ValueError("pipeline_loss: attention_mask must be right-padded (ones, then zeros) in every row, as "
                         "for the model's forward with labels")
    mine = block_of(rank, size, len(segs))
    prev = _global_rank(group, rank - 1) if rank > 0 else None
    nxt = _global_rank(group, rank + 1) if rank < size - 1 else None
    B = input_ids.shape[0]
    fmt = _wire_format(model, B)
    _agree_on_the_step(fmt, _step_digest(model, input_ids, labels, attention_mask, sizes), prev, nxt, group,
                       model.device)
    hidden = {t: xs[t] for t in mine}
    # This rank's positions: logits at text position p predict labels[p + 1].
    targets = dict(zip(mine, model._chunk_targets(labels, [sizes[t] for t in mine], sum(sizes[: mine.start]))))
    # Requires grad, so that every edge's tie does, on every rank, whatever else requires grad.
    anchor = torch.zeros((), device=model.device, requires_grad=True)
    ties, total = [], 0.0
    last = model.config.num_hidden_layers - 1
    wire = (model.config.num_key_value_heads, model._head_dim())
    for l in range(last + 1):
        if prev is None:
            mem = model._train_memory(B)
        else:
            tie, *state = _Recv.apply(anchor, prev, group, fmt)
            ties.append(tie)
            mem = TrainMemory.from_wire(state)
        for t in mine:
            target = targets[t] if l == last else None
            out, mem = model._run_train_step(l, segs[t], ropes[t], hidden[t], mem, recompute, target)
            if target is not None:
                total = total + out
            else:
                hidden[t] = out
        if nxt is not None:
            ties.append(_Send.apply(anchor, nxt, group, fmt, *mem.to_wire(*wire, dtype=model.dtype)))
    loss = total / loss_divisor(labels, num_items_in_batch, model.device) if isinstance(total, Tensor) else anchor * 0
    # The ties add zero, but put every send and receive of this rank into its backward.
    return loss + sum(ties) if ties else loss


def _reduce_grads(model, group, average: bool) -> None:
    """Sums (or averages) parameter gradients over the group. A parameter with a gradient on some
    rank only gets zeros on the others first, so every rank reduces the same tensors; one with
    a gradient on no rank keeps none, as in one process (an optimizer skips it: zeros would move
    it by its momentum and weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    n = dist.get_world_size(group)
    for p, anywhere in zip(params, present.tolist()):  # (one host read per step)
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        if average:
            p.grad.div_(n)


def all_reduce_grads(model, group=None) -> None:
    """Sums parameter gradients over the group (pipeline, or pipeline x data)."""
    _reduce_grads(model, group, average=False)


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
    if data_group is not None:
        _reduce_grads(model, data_group, average=True)
