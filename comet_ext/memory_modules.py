"""The learned modules of the CoMeT memory, one CometLayerMemory per decoder layer: the
global memory's RMSNorm, gate and low-rank adapter, the temporary memory's RMSNorm and
low-rank adapter; and MemoryEmbeddings, the embeddings of CoMeT's own tokens.

Their forwards are the comet ops (docs/ops.md), which read the weights directly. Shapes:
B batch, N rows, G = num_global, d hidden, r = rla_rank.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import ops
from .segments import COMPRESSION, READOUT


class LowRankAdapter(nn.Module):
    """RLA: x + up(down(x)), optionally after a fused RMSNorm (comet::rla). down (rank, hidden)
    and up (hidden, rank) are plain parameters, named as the op names them: the memory holds no
    nn.Linear and no module called o_proj / down_proj / up_proj, so the LoRA targets people
    write for a decoder (those names, "all-linear") reach the base model only; an adapter on
    the memory would not apply anyway, since its ops read the weights, not a forward."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, hidden))
        self.up = nn.Parameter(torch.empty(hidden, rank))

    def forward(self, x: Tensor, norm: Optional[nn.RMSNorm] = None) -> Tensor:
        if norm is None:
            return ops.rla(x, self.down, self.up)
        return ops.rla(x, self.down, self.up, norm.weight, norm.eps)


class MemoryGate(nn.Module):
    """W_g: one scalar gate logit per slot from [candidate ; state], weight (1, 2 x hidden).
    A module of its own (not a parameter of GlobalMemoryNet) so that the memory's parameters
    keep the order norm, gate, RLA, which optimizer states saved before are indexed by."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, 2 * hidden))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class GlobalMemoryNet(nn.Module):
    """RMSNorm_g (eps = finfo(dtype).eps), the scalar gate W_g (2d -> 1) and RLA_g."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.gate = MemoryGate(hidden)
        self.rla = LowRankAdapter(hidden, rank)

    def gate_logit(self, readout: Tensor, state: Tensor) -> Tensor:
        """W_g [RMSNorm_g(R) ; S]: the logit of each slot's gate, (B, G), in plain PyTorch (what
        comet::gated_update computes inside its kernel; for diagnostics and gate losses)."""
        return self.gate(torch.cat([self.norm(readout), state.to(readout.dtype)], dim=-1)).squeeze(-1)

    def forward(self, readout: Tensor, state: Optional[Tensor], gate_snap: float = 1.0) -> tuple[Tensor, Tensor]:
        return ops.gated_update(readout, state, self.norm.weight, self.gate.weight, self.rla.down, self.rla.up,
                                gate_snap=gate_snap)


class TempMemoryNet(nn.Module):
    """RMSNorm_t (eps 1e-12) then RLA_t: compression rows -> FIFO rows."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-12)
        self.rla = LowRankAdapter(hidden, rank)

    def forward(self, rows: Tensor) -> Tensor:
        return self.rla(rows, self.norm)


class MemoryEmbeddings(nn.Module):
    """The learned embeddings of CoMeT's own tokens: `compression` (1, hidden), shared by every
    compression token, and `readout` (num_global, hidden), one per global slot. One module (not
    two parameters of the model) so that PEFT's modules_to_save can train and save them."""

    def __init__(self, hidden: int, num_global: int):
        super().__init__()
        self.compression = nn.Parameter(torch.empty(1, hidden))
        self.readout = nn.Parameter(torch.empty(num_global, hidden))

    def forward(self, emb: Tensor, kind: Tensor, slot: Tensor) -> Tensor:
        """Rows (B, N, hidden): emb (B, N, hidden), the token embeddings, with the compression
        embedding where kind (B, N) is COMPRESSION and readout embedding slot[b, n] where it is
        READOUT."""
        kind = kind.unsqueeze(-1)
        x = torch.where(kind == COMPRESSION, self.compression.to(emb.dtype), emb)
        return torch.where(kind == READOUT, self.readout[slot].to(emb.dtype), x)


class CometLayerMemory(nn.Module):
    """One decoder layer's memory modules, under the reference implementation's names."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.global_memory_net = GlobalMemoryNet(hidden, rank)
        self.temp_memory_net = TempMemoryNet(hidden, rank)
