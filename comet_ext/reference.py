"""Plain-PyTorch oracles of every comet op.

Each function computes, in the most obvious way, what the kernel of the same
name in ``comet_ext.ops`` computes: fp32 accumulation (fp64 for fp64 inputs)
unless ``upcast=False``, which runs the same math in the input dtype (the
low-precision baseline of the FlashAttention tolerance rule). Autograd through
these functions is the gradient oracle. Imported only by tests, benchmarks and
examples/ops_demo.py (which shows the ops against it), never by the package.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "prefix_attention",
    "rms_norm",
    "rla",
    "gated_update",
    "fifo_push",
    "fifo_view",
    "apply_rope",
    "naive_comet_forward",
]


def _compute_dtype(t: Tensor, upcast: bool) -> torch.dtype:
    if not upcast:
        return t.dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_mask(
    batch: int, n_q: int, n_k: int, q_lens: Optional[Tensor], k_lens: Optional[Tensor], device
) -> Tensor:
    """Bool (B, N, K): query i sees key j iff i < ql, j < kl and j <= kl - ql + i."""
    ql = q_lens.long() if q_lens is not None else torch.full((batch,), n_q, device=device)
    kl = k_lens.long() if k_lens is not None else torch.full((batch,), n_k, device=device)
    i = torch.arange(n_q, device=device).view(1, -1, 1)
    j = torch.arange(n_k, device=device).view(1, 1, -1)
    ql, kl = ql.view(-1, 1, 1), kl.view(-1, 1, 1)
    return (i < ql) & (j < kl) & (j <= kl - ql + i)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    q_lens: Optional[Tensor] = None,
    k_lens: Optional[Tensor] = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Bottom-right causal attention of chunk queries over [prefix ; chunk] keys.

    q (B, N, Hq, D), k / v (B, K, Hkv, D) -> out (B, N, Hq, D) in q's dtype and
    lse (B, Hq, N) in fp32 (fp64 for fp64). Rows that see no key (padding) give
    out = 0, lse = -inf.
    """
    B, N, Hq, D = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if K == 0:  # no key: every row is a padded one (amax over no key would raise)
        # zeros in q's, k's and v's graphs (their gradients zeros); k and v are empty, so sum to 0
        out = q.masked_fill(torch.ones((), dtype=torch.bool, device=q.device), 0) + (k.sum() + v.sum()).to(q.dtype)
        return out, torch.full((B, Hq, N), float("-inf"), dtype=lse_dtype, device=q.device)
    ct = _compute_dtype(q, upcast)
    qf = q.to(ct).transpose(1, 2)  # (B, Hq, N, D)
    kf = k.to(ct).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
    vf = v.to(ct).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
    visible = attention_mask(B, N, K, q_lens, k_lens, q.device).unsqueeze(1)
    # Like the kernels, never read keys / values past k_lens: padding may hold garbage.
    readable = visible.any(2, keepdim=True).transpose(-1, -2)  # (B, 1, K, 1)
    zero = torch.zeros((), dtype=ct, device=q.device)
    kf, vf = torch.where(readable, kf, zero), torch.where(readable, vf, zero)
    s = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hq, N, K)
    s = s.masked_fill(~visible, float("-inf"))
    empty = ~visible.any(-1)  # (B, 1, N)
    m = s.amax(-1, keepdim=True).masked_fill(empty.unsqueeze(-1), 0).detach()
    e = torch.where(visible, torch.exp(s - m), torch.zeros((), dtype=ct, device=q.device))
    total = e.sum(-1)
    p = e / torch.where(empty, torch.ones((), dtype=ct, device=q.device), total).unsqueeze(-1)
    out = (p @ vf).transpose(1, 2).to(q.dtype)
    safe_total = torch.where(empty, torch.ones((), dtype=ct, device=q.device), total)
    lse = torch.where(empty, float("-inf"), m.squeeze(-1) + torch.log(safe_total)).to(lse_dtype)
    return out, lse


def rms_norm(x: Tensor, weight: Tensor, eps: float, upcast: bool = True) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in the compute dtype."""
    ct = _compute_dtype(x, upcast)
    xf = x.to(ct)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)


def rla(
    x: Tensor,
    down: Tensor,
    up: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = 1e-12,
    upcast: bool = True,
) -> Tensor:
    """Residual low-rank adapter: y = n + up(down(n)), n = RMSNorm(x) (or x). x (..., d)."""
    ct = _compute_dtype(x, upcast)
    n = rms_norm(x, norm_weight, eps, upcast) if norm_weight is not None else x.to(ct)
    y = n + (n @ down.to(ct).t()) @ up.to(ct).t()
    return y.to(x.dtype)


def gated_update(
    readout: Tensor,
    state: Optional[Tensor],
    norm_weight: Tensor,
    gate_weight: Tensor,
    down: Tensor,
    up: Tensor,
    eps: Optional[float] = None,
    gate_snap: float = 1.0,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Global-memory update (docs/model.md, "What is computed"): returns (new state,
    RLA(new state)), (B, n, d).

    A gate above ``gate_snap`` blends as exactly 1; its gradient passes straight through."""
    eps = torch.finfo(readout.dtype).eps if eps is None else eps
    ct = _compute_dtype(readout, upcast)
    c = rms_norm(readout, norm_weight, eps, upcast)
    if state is None:
        new = c
    else:
        s = state.to(ct)
        g = torch.sigmoid(torch.cat([c, s], dim=-1) @ gate_weight.to(ct).t())  # (B, n, 1)
        g = g + (torch.where(g > gate_snap, 1.0, g) - g).detach()  # straight through the snap
        new = g * s + (1 - g) * c
    memory = new + (new @ down.to(ct).t()) @ up.to(ct).t()
    return new.to(readout.dtype), memory.to(readout.dtype)


def fifo_push(buffer: Tensor, head: Tensor, length: Tensor, rows: Tensor, counts: Tensor) -> None:
    """In place: append rows[b, :counts[b]] to sample b's ring, evicting the oldest rows."""
    C = buffer.shape[1]
    for b in range(buffer.shape[0]):
        n = int(counts[b])
        kept = [r for r in range(n)][max(0, n - C):]
        old = [buffer[b, (int(head[b]) + i) % C].clone() for i in range(int(length[b]))] if C else []
        ordered = old + [rows[b, r] for r in kept]
        ordered = ordered[max(0, len(ordered) - C):]
        # Any valid ring layout is acceptable; the view defines the contents.
        # Lay out the same slots as the kernel does, so the buffers compare equal.
        start = (int(head[b]) + int(length[b]) + n - len(ordered)) % C if C else 0
        for i, row in enumerate(ordered):
            buffer[b, (start + i) % C] = row
        head[b] = start
        length[b] = len(ordered)


def fifo_view(
    buffer: Tensor,
    head: Tensor,
    length: Tensor,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
) -> Tensor:
    """(B, C, *F) rows oldest-first, zeros past length; RoPE with table row i on row i."""
    B, C = buffer.shape[:2]
    i = torch.arange(C, device=buffer.device)
    idx = (head.view(-1, 1) + i.view(1, -1)) % max(C, 1)
    out = buffer[torch.arange(B, device=buffer.device).view(-1, 1), idx]
    valid = (i.view(1, -1) < length.view(-1, 1)).view(B, C, *([1] * (buffer.dim() - 2)))
    out = torch.where(valid, out, torch.zeros((), dtype=buffer.dtype, device=buffer.device))
    if cos is not None:
        out = apply_rope(out, cos[:C], sin[:C])
    return out


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF rotate-half RoPE of x (B, C, H, D) with tables (C, D), computed in fp32."""
    xf = x.float() if x.dtype != torch.float64 else x
    c = cos.to(xf.dtype).view(1, x.shape[1], 1, -1)
    s = sin.to(xf.dtype).view(1, x.shape[1], 1, -1)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * c + rotated * s).to(x.dtype)


@torch.no_grad()
def naive_comet_forward(model, ids: Tensor, chunk_sizes: list[int]) -> Tensor:
    """Text-token logits computed the reference implementation's way: memory rows are
    placeholder rows in the sequence, replaced at every layer's input by that layer's
    memory, and the *full* HF decoder layer runs over all rows (causal mask, positions
    from 0). Memory updates use comet_ext.reference. -> (B, T, vocab)."""
    from .segments import plan_segment

    cc = model.comet_config
    layers, dec = model.decoder.layers, model.decoder
    B, L, G = ids.shape[0], len(layers), cc.num_global
    state, glob = [None] * L, [None] * L
    dtype, device = next(model.parameters()).dtype, ids.device
    fifo = [torch.zeros(B, 0, model.config.hidden_size, dtype=dtype, device=device) for _ in range(L)]
    out, start = [], 0
    for n in chunk_sizes:
        seg = plan_segment(cc, [0] * B, [n] * B, [True] * B, ids.device)
        chunk = model._embed(seg, ids[:, start:start + n])
        start += n
        n_mem = (G if glob[0] is not None else 0) + fifo[0].shape[1]
        S = n_mem + chunk.shape[1]
        pos = torch.arange(S, device=device).unsqueeze(0)
        cos, sin = dec.rotary_emb(chunk, pos)
        mask = torch.full((S, S), float("-inf"), dtype=dtype, device=device).triu(1).view(1, 1, S, S).expand(B, 1, S, S)
        x = torch.cat([chunk.new_zeros(B, n_mem, chunk.shape[-1]), chunk], dim=1)
        for l, layer in enumerate(layers):
            mem = [glob[l]] if glob[l] is not None else []
            x = torch.cat(mem + [fifo[l], x[:, n_mem:]], dim=1)  # this layer's memory into the placeholders
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
            y = x[:, n_mem:]
            net = model.memory_layers[l]
            t = net.temp_memory_net
            comp = y[:, seg.comp_rows[0, : int(seg.comp_count[0])]]
            m = rla(comp, t.rla.down, t.rla.up, t.norm.weight, t.norm.eps)
            g = net.global_memory_net
            readout = y[:, seg.readout_rows[0]]
            state[l], glob[l] = gated_update(readout, state[l], g.norm.weight, g.gate.weight, g.rla.down, g.rla.up,
                                             gate_snap=cc.gate_snap)
            if cc.uses_temp_memory:
                fifo[l] = torch.cat([fifo[l], m], dim=1)[:, -cc.temp_budget:]
        text = x[:, n_mem:][:, seg.text_rows[0]]
        out.append(model.base.lm_head(dec.norm(text)))
    return torch.cat(out, dim=1)
