"""`attn_implementation="comet"` for any HF model: attention through comet::prefix_attention.

    import comet_ext
    comet_ext.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="comet")

HF calls the attention function with q (B, Hq, S, D) and k / v (B, Hkv, Sk, D)
(not repeated for GQA) and expects (B, S, Hq, D) back. Without padding the
mask is None and the attention is causal aligned to the bottom-right, which
covers prefill and KV-cached decoding. With padding the mask function hands
over the 2D mask (B, Sk); each sample's real tokens must form one contiguous run
(left or right padding), which is shifted to the front for the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops

NAME = "comet"


def comet_mask(batch_size: int, q_length: Optional[int] = None, *, kv_length: int,
               attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """The mask HF hands to `comet_attention`: None when nothing is padded, else the
    2D padding mask (B, kv_length) of real tokens. Registered with
    transformers' AttentionMaskInterface: without it the attention function would
    silently receive no mask at all. Only `kv_length` and `attention_mask` matter
    (the causal part is the kernel's). Early transformers 5 releases (5.0 among
    them) pass cache_position instead of q_length / q_offset: it lands in kwargs."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _runs(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Start and length of each row's run of True; a ValueError if a row has two runs."""
    n = valid.shape[1]
    count = valid.sum(1)
    start = torch.where(count > 0, valid.long().argmax(1), torch.zeros_like(count))
    j = torch.arange(n, device=valid.device)
    expected = (j >= start[:, None]) & (j < (start + count)[:, None])
    if not torch.equal(valid, expected):
        raise ValueError("comet attention: every row of attention_mask must be one contiguous run of real "
                         "tokens (left or right padding); got a mask with holes")
    return start, count


def comet_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Optional[Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                    **kwargs) -> tuple[Tensor, None]:
    """HF attention-interface function backed by comet::prefix_attention."""
    if dropout:
        raise NotImplementedError("comet attention does not implement attention dropout; set attention_dropout=0")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:  # inside the window a sliding mask masks nothing
        raise NotImplementedError(f"comet attention does not implement sliding-window attention: "
                                  f"{key.shape[2]} keys exceed the model's sliding_window {window}")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if attention_mask is None:
        out, _ = ops.prefix_attention(q, k, v, scaling)
        return out, None
    if attention_mask.dim() != 2:
        raise ValueError(f"comet attention expects the 2D padding mask of its mask function, got shape "
                         f"{tuple(attention_mask.shape)}; was the model created before comet_ext.register()?")
    B, S, Sk = q.shape[0], q.shape[1], k.shape[1]
    k_start, k_len = _runs(attention_mask[:, -Sk:].bool())
    window = Sk - S  # absolute position of the first query
    q_first = (k_start - window).clamp(min=0)
    q_len = (k_start + k_len - window - q_first).clamp(min=0, max=S)
    rows = torch.arange(max(S, Sk), device=q.device).unsqueeze(0)

    def shift(t: Tensor, first: Tensor, n: int) -> Tensor:
        idx = (first.unsqueeze(1) + rows[:, :n]).clamp(max=t.shape[1] - 1)
        return torch.gather(t, 1, idx.view(B, n, 1, 1).expand(-1, -1, *t.shape[2:]))

    out, _ = ops.prefix_attention(shift(q, q_first, S), shift(k, k_start, Sk), shift(v, k_start, Sk),
                                  scaling, q_len, k_len)
    # Back to the callers' rows; padded query rows get zeros.
    dest = (rows[:, :S] - q_first.unsqueeze(1))
    valid = (dest >= 0) & (dest < q_len.unsqueeze(1))
    back = torch.gather(out, 1, dest.clamp(0, S - 1).view(B, S, 1, 1).expand(-1, -1, *out.shape[2:]))
    return torch.where(valid.view(B, S, 1, 1), back, torch.zeros((), dtype=out.dtype, device=out.device)), None


def register() -> None:
    """Registers `attn_implementation="comet"` (attention and mask) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, comet_attention)
    AttentionMaskInterface.register(NAME, comet_mask)
