"""`attn_implementation="comet"` for any HF model: attention through comet::prefix_attention.

    import comet_ext
    comet_ext.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="comet")

HF calls the attention function with q (B, Hq, S, D) and k / v (B, Hkv, Sk, D)
(not repeated for GQA) and expects (B, S, Hq, D) back. Without padding the
mask is None and the attention is causal aligned to the bottom-right, which
covers prefill and KV-cached decoding. With padding the mask function hands
over the 2D mask (B, Sk); each sample's real tokens must form one contiguous run
(left or right padding), which is shifted to the front for the kernel. A static
cache (`cache_implementation="static"`) has key slots past the last query not
written yet: the mask function then hands over a mask of the written slots only,
(B, n) with n < Sk, and the attention reads the first n keys. A mask other than
causal + padding (packed sequences in one row, found from position_ids; a custom
mask function) is refused, not silently ignored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops

NAME = "comet"


def _query_positions(q_length: Optional[int], kwargs: dict) -> Optional[Tensor]:
    """The queries' absolute positions (S,), where HF says: cache_position (transformers 5.0-5.x)
    or q_offset + arange(q_length) (later; a static cache's q_offset is a tensor)."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        return cache_position
    q_offset = kwargs.get("q_offset")
    if q_offset is None or q_length is None:
        return None
    device = q_offset.device if isinstance(q_offset, Tensor) else kwargs.get("device")
    return torch.arange(q_length, device=device) + q_offset


def _query_end(q_length: Optional[int], kwargs: dict) -> Optional[int]:
    """One past the last query's absolute position, or None where HF does not say. Read on the
    host without waiting on the device where HF gives ints (q_offset of a dynamic cache)."""
    q_offset = kwargs.get("q_offset")
    if kwargs.get("cache_position") is None and isinstance(q_offset, int) and q_length is not None:
        return q_offset + q_length
    queries = _query_positions(q_length, kwargs)
    return int(queries[-1]) + 1 if queries is not None and queries.numel() else None


def _check_plain_causal(batch_size: int, mask_function, queries: Optional[Tensor], kv_offset: int,
                        window: Optional[int]) -> None:
    """A NotImplementedError when HF's mask function is more than causal (within a sliding window
    of `window` keys, if given): the kernel applies the causal part itself and would silently drop
    the rest. Probe: each query must see the oldest key that causality and the window allow;
    with packed sequences a query near the start of a later sequence does not."""
    if queries is None or not queries.numel():
        return
    b = torch.arange(batch_size, device=queries.device).view(-1, 1)
    oldest = queries - window + 1 if window else torch.zeros_like(queries)
    oldest = oldest.clamp(min=kv_offset).view(1, -1)
    seen = mask_function(b, torch.zeros_like(b), queries.view(1, -1), oldest)
    if not bool(torch.as_tensor(seen).all()):
        raise NotImplementedError(
            "comet attention implements causal attention with padding masks only; this call asked for "
            "another mask (several sequences packed into one row, found from position_ids, or a custom "
            "mask function). Pad the sequences into a batch with an attention_mask instead")


def comet_mask(batch_size: int, q_length: Optional[int] = None, *, kv_length: int,
               attention_mask: Optional[Tensor] = None, kv_offset: int = 0, mask_function=None,
               **kwargs) -> Optional[Tensor]:
    """The mask HF hands to `comet_attention`: None when nothing is padded, else the
    2D padding mask (B, n) of real tokens among the first n = kv_length key slots, or
    fewer: with a static cache the slots after the last query are not written yet and
    n stops there. Registered with transformers' AttentionMaskInterface: without it
    the attention function would silently receive no mask at all (the causal part is
    the kernel's). Early transformers 5 releases (5.0 among them) pass cache_position
    instead of q_length / q_offset: it lands in kwargs."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        _check_plain_causal(batch_size, mask_function, _query_positions(q_length, kwargs), kv_offset,
                            kwargs.get("local_size"))
    end = _query_end(q_length, kwargs)
    written = kv_length if end is None else min(kv_length, end - kv_offset)
    if written < kv_length:  # a static cache: the mask's length tells the attention where keys end
        if attention_mask is None:
            device = kwargs.get("device", getattr(kwargs.get("cache_position"), "device", None))
            return torch.ones(batch_size, written, dtype=torch.bool, device=device)
        mask = attention_mask.bool()[:, kv_offset:kv_offset + written]
        return torch.nn.functional.pad(mask, (0, written - mask.shape[1]))
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
    if attention_mask.shape[1] < k.shape[1]:  # a static cache: the slots past the mask are not written yet
        k, v = k[:, :attention_mask.shape[1]], v[:, :attention_mask.shape[1]]
        if bool(attention_mask.all()):
            out, _ = ops.prefix_attention(q, k, v, scaling)
            return out, None
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
