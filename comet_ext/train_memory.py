"""One layer's memory during a training forward (gradients flow through it).

Streaming keeps the FIFO in a ring buffer that is updated in place
(comet_ext.memory). A training forward cannot: each checkpointed (layer,
chunk) step keeps its inputs until backward, and a new ring per chunk would
keep `temp_budget` rows of keys and values per chunk and layer on top of the
chunk's own checkpoint — at the reference defaults (budget 2048, chunk 2048)
more than that checkpoint itself. Likewise the global memory's keys / values
are not carried: a step derives them from the state it receives.

So what is carried, and kept, per (layer, chunk) is only new information: the
global state S (num_global rows) and the pre-RoPE keys / values of the chunk's
compression rows (a `FifoPiece`). A step reads its FIFO out of the
concatenation of the recent pieces (a `FifoWindow`) with one fifo_view
(gather + RoPE), which checkpointing recomputes in backward.

`loss_divisor`: what a training forward divides its summed loss by (the batch's labelled
tokens, or a whole gradient-accumulation step's), shared by the forward and the pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from . import ops
from .transfer import upload


@dataclasses.dataclass(frozen=True)
class FifoPiece:
    """Compression rows one chunk pushed: pre-RoPE keys / values k, v (B, R, Hkv, D);
    sample b's rows are the first counts[b] of the R."""

    k: Tensor
    v: Tensor
    counts: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FifoWindow:
    """A FIFO of `capacity` rows as the pieces that may still hold some of its rows.
    Sample b's FIFO is the newest `capacity` of its valid rows in the pieces'
    concatenation, where they must be contiguous: every piece but a sample's last
    one is full for it (true of right-padded samples, the only padding a training
    forward takes).

    The first `frozen` pieces hold the FIFOs of samples that have ended (they push
    no more rows), one piece per set of samples ending together; the others are the
    pushed pieces that samples still pushing may read. Freezing ended samples is what
    lets old pieces go: it costs one copy of their FIFOs when they end."""

    capacity: int
    batch: int
    pieces: tuple[FifoPiece, ...] = ()
    frozen: int = 0

    def pushed(self, k: Tensor | None, v: Tensor | None, counts: Sequence[int]) -> "FifoWindow":
        """The window after a chunk pushed rows k, v (B, R, Hkv, D), counts[b] of them valid."""
        if self.capacity == 0 or k is None or k.shape[1] == 0 or not any(counts):
            return self
        window = dataclasses.replace(self, pieces=self.pieces + (FifoPiece(k, v, tuple(counts)),))
        ended = [b for b in range(self.batch) if counts[b] == 0
                 and any(p.counts[b] for p in window.pieces[window.frozen:])]
        if ended:
            window = window._freeze(ended)
        return window._without_stale_pieces()

    def layout(self) -> tuple[list[int], list[int]]:
        """Per sample, (head, length): where its FIFO rows start in the pieces'
        concatenation and how many there are."""
        heads, lengths = [], []
        for b in range(self.batch):
            start = end = None
            offset = 0
            for piece in self.pieces:
                n = piece.counts[b]
                if n:
                    if start is None:
                        start = offset
                    elif end != offset:
                        raise RuntimeError(f"FifoWindow: sample {b}'s FIFO rows are not contiguous (a piece before "
                                           f"row {offset} is not full); training chunks must pad on the right only")
                    end = offset + n
                offset += piece.k.shape[1]
            if start is None:
                heads.append(0)
                lengths.append(0)
            else:
                head = max(start, end - self.capacity)
                heads.append(head)
                lengths.append(end - head)
        return heads, lengths

    def _freeze(self, samples: Sequence[int]) -> "FifoWindow":
        """Copies the FIFOs of `samples` (ended) into one frozen piece; the pushed
        pieces then no longer count their rows."""
        heads, lengths = self.layout()
        mask = [n if b in samples else 0 for b, n in enumerate(lengths)]
        dev = self.pieces[0].k.device
        heads_t, mask_t = upload(torch.tensor([heads, mask], dtype=torch.long), dev)
        k, v = FifoWindow.view(self.tensors(), heads_t, mask_t, self.capacity)
        rows = max(mask)
        piece = FifoPiece(k[:, :rows], v[:, :rows], tuple(mask))
        pushed = tuple(dataclasses.replace(p, counts=tuple(0 if b in samples else n for b, n in enumerate(p.counts)))
                       for p in self.pieces[self.frozen:])
        return dataclasses.replace(self, pieces=self.pieces[:self.frozen] + (piece,) + pushed, frozen=self.frozen + 1)

    def _without_stale_pieces(self) -> "FifoWindow":
        # A pushed piece that ends before every sample's FIFO starts can never be read again.
        heads, lengths = self.layout()
        offset = sum(p.k.shape[1] for p in self.pieces[:self.frozen])
        first = min((h for h, n in zip(heads, lengths) if n and h >= offset), default=None)
        stale = 0
        for piece in self.pieces[self.frozen:]:
            if first is not None and offset + piece.k.shape[1] > first:
                break
            offset += piece.k.shape[1]
            stale += 1
        if not stale:
            return self
        return dataclasses.replace(self, pieces=self.pieces[:self.frozen] + self.pieces[self.frozen + stale:])

    def tensors(self) -> list[Tensor]:
        """The pieces' keys, then their values: what a step takes as inputs."""
        return [p.k for p in self.pieces] + [p.v for p in self.pieces]

    @staticmethod
    def view(kv: Sequence[Tensor], head: Tensor, length: Tensor, capacity: int, cos: Tensor | None = None,
             sin: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """From tensors() (and layout() as tensors): the FIFO keys / values (B, capacity,
        Hkv, D), oldest first, zeros past length[b]; the keys RoPE'd with table rows
        0.. when cos / sin are given. None when there are no pieces."""
        n = len(kv) // 2
        if n == 0:
            return None
        k = kv[0] if n == 1 else torch.cat(kv[:n], dim=1)
        v = kv[n] if n == 1 else torch.cat(kv[n:], dim=1)
        fk, fv = ops.fifo_view(k, head, length, cos, sin), ops.fifo_view(v, head, length)
        rows = fk.shape[1]
        if rows >= capacity:
            return fk[:, :capacity], fv[:, :capacity]
        pad = (0, 0, 0, 0, 0, capacity - rows)
        return F.pad(fk, pad), F.pad(fv, pad)


@dataclasses.dataclass(frozen=True)
class TrainMemory:
    """Layer l's memory between two chunks of a training forward: the global state
    (B, G, d), which samples have one (B,) — also on the host, has_global_list, so a
    step can branch on it without waiting on the device — and the FIFO window."""

    state: Tensor
    has_global: Tensor
    fifo: FifoWindow
    has_global_list: tuple[bool, ...] = ()

    def __post_init__(self):
        if len(self.has_global_list) != self.has_global.shape[0]:  # not given: read it once
            object.__setattr__(self, "has_global_list", tuple(bool(g) for g in self.has_global.tolist()))

    # A pipeline edge carries the memory as fixed-shape tensors: state, FIFO keys,
    # FIFO values (these three carry gradients), has_global, FIFO length.
    WIRE_GRADS = 3

    def to_wire(self, kv_heads: int, head_dim: int, dtype: torch.dtype | None = None) -> list[Tensor]:
        """state, FIFO k, FIFO v (B, C, Hkv, D) oldest first, has_global, FIFO length (B,).

        dtype: the wire's float dtype, which state, k and v are cast to. A pipeline must
        give it: under autocast a step returns some of these in bfloat16 and others in
        float32, while the receiver's buffers have one dtype fixed in advance. The cast
        is differentiable, so each gradient comes back in its tensor's own dtype."""
        B, C = self.fifo.batch, self.fifo.capacity
        heads, lengths = self.fifo.layout()
        dev = self.state.device
        heads_t, length = upload(torch.tensor([heads, lengths], dtype=torch.long), dev)
        fifo = FifoWindow.view(self.fifo.tensors(), heads_t, length, C)
        if fifo is None:
            zeros = self.state.new_zeros(B, C, kv_heads, head_dim)
            fifo = (zeros, zeros.clone())
        floats = [self.state, fifo[0], fifo[1]]
        if dtype is not None:
            floats = [t.to(dtype) for t in floats]
        return [*floats, self.has_global, length]

    @classmethod
    def from_wire(cls, tensors: Sequence[Tensor]) -> "TrainMemory":
        state, k, v, has_global, length = tensors
        counts = length.tolist()
        rows = max(counts, default=0)  # samples that still read have full FIFOs: trim to them
        fifo = FifoWindow(k.shape[1], k.shape[0]).pushed(k[:, :rows], v[:, :rows], counts)
        return cls(state, has_global, fifo)


def loss_divisor(labels: Tensor, num_items_in_batch: Optional[Tensor | int | float], device) -> Tensor:
    """What a summed next-token loss is divided by: num_items_in_batch where given (a whole
    step's labelled tokens), else the labelled tokens of `labels` (B, T), at least 1."""
    if num_items_in_batch is None:
        return (labels[:, 1:] != -100).sum().clamp(min=1).to(device)
    if isinstance(num_items_in_batch, Tensor):  # (HF's count, on the device: checked without a host read)
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be one number, got shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.to(device).reshape(()).clamp(min=1)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)) \
            or not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be a positive number, got {num_items_in_batch!r}")
    return torch.tensor(float(num_items_in_batch), device=device)
