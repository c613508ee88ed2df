"""Row layout of a piece of a chunk (docs/model.md, "Rows"): which rows are text,
compression or readout tokens, and where their outputs are gathered.

A *segment* is what one step appends to each sample's open chunk: `take[b]`
text tokens, a compression token after every `temp_stride` text tokens of the
chunk, and — if the sample's chunk closes in this step — a compression token
after a final partial group and the `num_global` readout tokens. With
`take[b] = 0` and a closing chunk, the segment is those closing rows alone: how
`read(..., end_chunk=True)` closes the open chunk of a sample that reads no token.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .config import CometConfig
from .transfer import upload

TEXT, COMPRESSION, READOUT, PAD = 0, 1, 2, -1


@dataclasses.dataclass
class Segment:
    """Rows of one segment, per sample left-aligned and right-padded to N rows.

    kind (B, N): TEXT / COMPRESSION / READOUT / PAD. token (B, N): for text rows,
    the index of the token among the segment's tokens. slot (B, N): for readout
    rows, the global slot. q_lens (B,): rows per sample. text_rows / comp_rows /
    readout_rows (B, n): row indices of each kind (padded with 0), with counts
    text_count / comp_count. closing (B,) bool: the chunk closes in this segment.
    closing_list / comp_counts: the same on the host.
    """

    kind: Tensor
    token: Tensor
    slot: Tensor
    q_lens: Tensor
    text_rows: Tensor
    text_count: Tensor
    comp_rows: Tensor
    comp_count: Tensor
    readout_rows: Tensor
    closing: Tensor
    # Host copies, for the decisions a step makes before it queues device work (reading
    # the tensors back would make the host wait on the device).
    closing_list: tuple[bool, ...] = ()
    q_lens_list: tuple[int, ...] = ()
    comp_counts: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return self.kind.shape[1]


def _pad(rows: list[list[int]], fill: int, min_len: int = 0) -> Tensor:
    n = max([len(r) for r in rows] + [min_len])
    return torch.tensor([r + [fill] * (n - len(r)) for r in rows], dtype=torch.long).view(len(rows), n)


def plan_segment(
    cfg: CometConfig, open_text: list[int], take: list[int], close: list[bool], device
) -> Segment:
    """Lays out the rows each sample appends to its open chunk.

    open_text[b]: text tokens already in sample b's open chunk; take[b]: text
    tokens appended now (0 too); close[b]: the chunk closes after them (a chunk
    that closes holds text: open_text[b] + take[b] > 0).
    """
    stride = cfg.temp_stride if cfg.uses_temp_memory else 0
    kinds, tokens, slots, text_rows, comp_rows, readout_rows = [], [], [], [], [], []
    for b, (start, n, closes) in enumerate(zip(open_text, take, close)):
        kind, token, slot, tr, cr, rr = [], [], [], [], [], []
        for i in range(n):
            tr.append(len(kind))
            kind.append(TEXT), token.append(i), slot.append(0)
            if stride and (start + i + 1) % stride == 0:
                cr.append(len(kind))
                kind.append(COMPRESSION), token.append(0), slot.append(0)
        if closes:
            if stride and (start + n) % stride != 0 and start + n > 0:  # final partial group
                cr.append(len(kind))
                kind.append(COMPRESSION), token.append(0), slot.append(0)
            for j in range(cfg.num_global):
                rr.append(len(kind))
                kind.append(READOUT), token.append(0), slot.append(j)
        kinds.append(kind), tokens.append(token), slots.append(slot)
        text_rows.append(tr), comp_rows.append(cr), readout_rows.append(rr)
    host = {
        "kind": _pad(kinds, PAD), "token": _pad(tokens, 0), "slot": _pad(slots, 0),
        "q_lens": torch.tensor([len(k) for k in kinds], dtype=torch.long),
        "text_rows": _pad(text_rows, 0), "text_count": torch.tensor([len(r) for r in text_rows], dtype=torch.long),
        "comp_rows": _pad(comp_rows, 0), "comp_count": torch.tensor([len(r) for r in comp_rows], dtype=torch.long),
        "readout_rows": _pad(readout_rows, 0, cfg.num_global), "closing": torch.tensor(close, dtype=torch.long),
    }
    # one copy to the device for all of them (each copy of its own would be a host-device sync)
    flat = upload(torch.cat([t.flatten() for t in host.values()]), device)
    parts = flat.split([t.numel() for t in host.values()])
    dev = {name: part.view(t.shape) for (name, t), part in zip(host.items(), parts)}
    dev["closing"] = dev["closing"].bool()
    return Segment(
        **dev,
        closing_list=tuple(bool(c) for c in close),
        q_lens_list=tuple(len(k) for k in kinds),
        comp_counts=tuple(len(r) for r in comp_rows),
    )


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (B, N, d), rows (B, n) -> (B, n, d)."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def max_compression_rows(cfg: CometConfig) -> int:
    """Compression rows of one chunk (its final partial group included)."""
    if not cfg.uses_temp_memory:
        return 0
    return -(-cfg.chunk_size // cfg.temp_stride)


def max_chunk_rows(cfg: CometConfig) -> int:
    """Rows of the largest chunk a layer runs over (positions 0 .. this - 1): the global rows,
    a full FIFO, the text, its compression rows and the readout rows of a closed chunk."""
    return 2 * cfg.num_global + cfg.fifo_capacity + cfg.chunk_size + max_compression_rows(cfg)
