"""Per-family layer steps of the fast CoMeT formulation (docs/model.md, "Memory rows only give
keys and values").

A supported decoder has the standard layout `embed_tokens / layers[i].{
input_layernorm, self_attn.{q,k,v,o}_proj[, q_norm, k_norm],
post_attention_layernorm, mlp} / norm / lm_head`. Families differ only in what
a registry entry records; adding a family is one entry in FAMILIES.

Shapes: B batch, N new rows, P prefix (memory + earlier rows of the open
chunk) rows, d hidden, Hq / Hkv heads, D head dim.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between decoder families, as far as the layer step goes."""

    model_type: str
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", qk_norm=False),
    "mistral": Family("mistral", qk_norm=False),
    "qwen2": Family("qwen2", qk_norm=False),
    "qwen3": Family("qwen3", qk_norm=True),
}


def family_of(config) -> Family:
    """The registry entry for an HF config, or a ValueError listing the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"comet_ext does not support model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF rotate-half RoPE: x (B, S, H, D), cos / sin (B, S, D) or (S, D)."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


def kv_projection(layer: nn.Module, family: Family, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Pre-RoPE keys and values of rows (B, M, d) at this layer: all a memory row is
    ever needed for. -> k, v (B, M, Hkv, D)."""
    attn = layer.self_attn
    h = layer.input_layernorm(rows)
    shape = (*rows.shape[:2], attn.config.num_key_value_heads, attn.head_dim)
    k = attn.k_proj(h).view(shape)
    if family.qk_norm:
        k = attn.k_norm(k)
    return k, attn.v_proj(h).view(shape)


def pack_keys(prefix: Tensor, prefix_lens: Tensor, new: Tensor, new_lens: Tensor,
              prefix_full: Optional[bool] = None) -> Tensor:
    """Per sample, the valid prefix rows followed by the valid new rows, right-padded.

    prefix (B, P, ...), new (B, N, ...) -> (B, P + N, ...); row j of sample b is
    prefix[b, j] for j < prefix_lens[b], then new[b, j - prefix_lens[b]].
    prefix_full: whether every prefix_lens[b] == P, when the caller knows it on the host
    (else it is read from the device).
    """
    P, N = prefix.shape[1], new.shape[1]
    both = torch.cat([prefix, new], dim=1)
    if prefix_full if prefix_full is not None else bool((prefix_lens == P).all()):
        return both
    j = torch.arange(P + N, device=prefix.device).unsqueeze(0)
    pl = prefix_lens.view(-1, 1)
    idx = torch.where(j < pl, j, (P + j - pl).clamp(max=P + N - 1))
    idx = idx.view(*idx.shape, *([1] * (prefix.dim() - 2))).expand(-1, -1, *prefix.shape[2:])
    return torch.gather(both, 1, idx)


def layer_step(
    layer: nn.Module,
    family: Family,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_lens: Tensor,
    q_lens: Tensor,
    prefix_full: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer over the new rows x (B, N, d) of a chunk.

    The new rows attend (bottom-right causal) to the prefix keys / values
    (B, P, Hkv, D), already RoPE'd, of which prefix_lens[b] rows are valid, and
    to themselves (q_lens[b] valid rows). cos / sin (B, N, D) are the new rows'
    rotary tables. Returns the layer output (B, N, d) and the new rows' keys
    (RoPE'd) and values, which later rows of the same chunk attend to.
    prefix_full: whether every prefix_lens[b] == P, when known on the host.
    """
    attn = layer.self_attn
    B, N, _ = x.shape
    h = layer.input_layernorm(x)
    # head counts spelled out, not -1: a chunk may have no new rows (a batch padded past its samples)
    q = attn.q_proj(h).view(B, N, attn.config.num_attention_heads, attn.head_dim)
    kv_shape = (B, N, attn.config.num_key_value_heads, attn.head_dim)
    k = attn.k_proj(h).view(kv_shape)
    v = attn.v_proj(h).view(kv_shape)
    if family.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys = pack_keys(prefix_k, prefix_lens, k, q_lens, prefix_full)
    values = pack_keys(prefix_v, prefix_lens, v, q_lens, prefix_full)
    out, _ = ops.prefix_attention(q, keys, values, attn.scaling, q_lens, prefix_lens + q_lens)
    x = x + attn.o_proj(out.flatten(2))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, k, v
