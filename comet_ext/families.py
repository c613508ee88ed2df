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


def sliding_window(config) -> Optional[int]:
    """The window of the config's sliding-window layers (Mistral; Qwen2 / Qwen3 with
    use_sliding_window or such layer_types), None when no layer has one."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _rope_parameters(config) -> list[dict]:
    """The config's RoPE settings (transformers 5's rope_parameters, else rope_scaling), one dict
    per layer type where they are given per layer type."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


def check_positions(config, rows: int, why: str) -> None:
    """A ValueError where the base model would not compute over `rows` rows (positions 0 ..
    rows - 1, the most a CoMeT chunk has, `why` says of what) what CoMeT's layers compute:
    a sliding window shorter than `rows` (CoMeT's attention has none, so it would attend past
    it), or a RoPE whose frequencies depend on each forward's length (dynamic NTK, longrope)
    once `rows` passes the length where they change (CoMeT takes the memory rows' and the
    chunk rows' tables in separate calls, which would then get different frequencies). Up to
    those lengths both behave as the base model does; positions restart every chunk, so the
    length scaling is not needed."""
    window = sliding_window(config)
    if window is not None and rows > window:
        raise ValueError(f"the model's sliding window ({window} keys) is shorter than the {rows} rows a CoMeT chunk "
                         f"attends over ({why}), and comet_ext's attention has no window: it would attend past "
                         f"the model's window; choose sizes with at most {window} rows")
    for params in _rope_parameters(config):
        kind = params.get("rope_type", params.get("type", "default"))
        if "dynamic" in kind or kind == "longrope":
            limit = (params.get("original_max_position_embeddings") if kind == "longrope" else None) \
                or config.max_position_embeddings
            if rows > limit:
                raise ValueError(f"the model's RoPE ({kind!r}) changes its frequencies with the length of each "
                                 f"forward past {limit} positions, and a CoMeT chunk runs over {rows} ({why}) in "
                                 f"separate RoPE calls for its memory rows and its text, which would get "
                                 f"different frequencies; choose sizes with at most {limit} rows (positions "
                                 f"restart every chunk, so the length scaling is not needed)")


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
