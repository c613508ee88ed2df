"""What a call hands CometForCausalLM, checked and laid out.

The model's entry points (forward, base_model, read, generate) take HF's arguments. These
functions refuse what the model cannot read with a ValueError naming the argument (HF's
arguments for things CoMeT does not compute, ids outside the vocabulary, masks that are not
one run of tokens per row, packed rows, ...), and lay the text out as the chunk loop reads
it: each row's tokens first. Shapes: B batch, T tokens, d hidden.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .transfer import upload


# Keyword arguments by which padding-free collators (DataCollatorWithFlattening, TRL's padding_free)
# pack several sequences into one row.
PACKED_ARGUMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
# HF's KV-cache argument, under its old and its new (transformers 5.x) name.
CACHE_ARGUMENTS = ("past_key_values", "cache")


def check_hf_arguments(who: str, output_attentions, output_hidden_states, return_dict, kwargs: dict) -> None:
    """HF's standard forward arguments that ask for something CoMeT's forward does not compute:
    refused by name (other unknown keywords: Python's TypeError)."""
    cache = [k for k in CACHE_ARGUMENTS if kwargs.get(k) is not None]
    if cache:
        raise ValueError(f"{who}: {cache[0]} is not supported: CoMeT's memory is its cache (a KV cache passed in, "
                         f"e.g. by PEFT's prefix tuning, would not be read); read a prefix into a memory and pass "
                         f"memory= instead")
    if output_attentions or output_hidden_states:
        raise ValueError(f"{who}: output_attentions / output_hidden_states are not supported (the fused "
                         "attention keeps no attention weights; hidden states exist per chunk only; the final ones "
                         "are model.base_model(...).last_hidden_state)")
    if return_dict is False:
        raise ValueError(f"{who}: return_dict=False is not supported; the output is a ModelOutput (which also "
                         "indexes like a tuple)")
    packed = [k for k in PACKED_ARGUMENTS if kwargs.get(k) is not None]
    if packed:
        raise ValueError(f"{who}: packed rows ({', '.join(packed)}: several sequences in one row, as padding-free "
                         f"collators such as DataCollatorWithFlattening make them) are not supported, since "
                         f"CometForCausalLM reads each row as one sequence, chunk by chunk; pad the samples into rows")
    unknown = sorted(k for k in kwargs if k not in PACKED_ARGUMENTS + CACHE_ARGUMENTS)
    if unknown:
        raise TypeError(f"{who}() got unexpected keyword arguments {unknown}")


def check_ids(input_ids, vocab: int, device: torch.device, allow_no_tokens: bool = False) -> Tensor:
    """input_ids (B, T) as int64 on device, token ids of a vocabulary of `vocab`, B >= 1 and
    T >= 1 (T = 0 too with allow_no_tokens: a read that only closes chunks, see `read`'s
    end_chunk). One host sync (the range of the ids)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be an int64 tensor of shape (batch, tokens), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[0] == 0 or (input_ids.shape[1] == 0 and not allow_no_tokens):
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        return input_ids.to(device).long()
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync, not two
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary), got values in [{lo}, {hi}]")
    return input_ids.to(device).long()


def check_embeds(inputs_embeds, hidden: int, device: torch.device, dtype: torch.dtype,
                 allow_no_tokens: bool = False) -> Tensor:
    """inputs_embeds (B, T, d = hidden) on device in dtype (the model's: as its embedding layer
    would give them), B >= 1 and T >= 1 (T = 0 with allow_no_tokens). No host sync: the
    values are not read."""
    d = hidden
    if not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d \
            or not inputs_embeds.is_floating_point():
        got = f"{inputs_embeds.dtype} {tuple(inputs_embeds.shape)}" if isinstance(inputs_embeds, Tensor) \
            else type(inputs_embeds).__name__
        raise ValueError(f"inputs_embeds must be a floating-point tensor of shape (batch, tokens, {d}) (the "
                         f"model's hidden size), got {got}")
    if inputs_embeds.shape[0] == 0 or (inputs_embeds.shape[1] == 0 and not allow_no_tokens):
        raise ValueError(f"inputs_embeds is empty: shape {tuple(inputs_embeds.shape)}")
    return inputs_embeds.to(device=device, dtype=dtype)


def check_labels(labels, text: Tensor, vocab: int, device: torch.device) -> Tensor:
    """labels (B, T) as int64 on device, for text (B, T) ids or (B, T, d) embeddings: token ids
    of a vocabulary of `vocab`, or -100 (ignored), as HF's losses take them."""
    if not isinstance(labels, Tensor) or labels.shape != text.shape[:2]:
        raise ValueError(f"forward: labels {tuple(getattr(labels, 'shape', ()))} must be a tensor of the shape "
                         f"of {'input_ids' if text.dim() == 2 else 'inputs_embeds (batch, tokens)'} "
                         f"{tuple(text.shape[:2])}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"forward: labels must be integer token ids (or -100), got dtype {labels.dtype}")
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab))
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"forward: labels must be token ids in [0, {vocab}) or -100 (ignored); got "
                         f"{sorted(set(labels[bad].tolist()))[:8]}")
    return labels.to(device).long()


def check_mask_values(attention_mask, shape: tuple[int, ...]) -> None:
    """A ValueError unless attention_mask is a tensor of `shape` holding ones (tokens) and zeros
    (padding): anything else nonzero would count as a token."""
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask must be a tensor of ones and zeros, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must have shape {tuple(shape)} (batch, tokens) like the input, got "
                         f"{tuple(attention_mask.shape)}")
    if not torch.equal(attention_mask, attention_mask.bool().to(attention_mask.dtype)):  # (NaN != NaN: refused)
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:4].tolist()
        raise ValueError(f"attention_mask must hold ones (tokens) and zeros (padding) only, got values such as {odd}")


def row_lengths(attention_mask: Optional[Tensor], B: int, T: int) -> tuple[Tensor, Tensor]:
    """Each row's token count and the column its tokens start at, (B,) host tensors, from
    attention_mask (B, T) (None: every row full; the one host read of the mask). A row's
    tokens must be one run: padding on the right, on the left, or on both sides (a
    left-padded prompt before a right-padded completion, as RL trainers batch them)."""
    if attention_mask is None:
        return torch.full((B,), T, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    mask = attention_mask.cpu() if isinstance(attention_mask, Tensor) else attention_mask  # the one host read
    check_mask_values(mask, (B, T))
    mask = mask.bool()
    lengths = mask.sum(1)  # (an all-zero row: 0 tokens from column 0)
    first = mask.int().argmax(1) if T else torch.zeros(B, dtype=torch.long)
    j = torch.arange(T)
    runs = (j >= first.unsqueeze(1)) & (j < (first + lengths).unsqueeze(1))
    if not torch.equal(mask, runs):
        holed = (mask != runs).any(1)
        peft = "" if not bool(mask[holed, 0].all()) else (
            " (a PEFT prompt-learning model puts ones for its soft prompt before the caller's mask, so a "
            "left-padded batch has a hole after them: pad it on the right)")
        raise ValueError("attention_mask must hold each row's tokens in one run: right-padded (ones, then "
                         "zeros), left-padded (zeros, then ones) or padded on both sides; the memory reads a "
                         "row's tokens in order and cannot step over zeros between them" + peft)
    return lengths, first


def check_plain_positions(position_ids, attention_mask, shape: tuple[int, ...]) -> None:
    """A ValueError unless position_ids (B, T) or (1, T) count 0, 1, 2, ... along every row's tokens
    (padding aside): positions that restart within a row pack several sequences into it, which
    transformers.Trainer would otherwise hand over silently (HF's models read them as boundaries).
    A mask whose rows are not one run of tokens is left to the mask's own check, which names it."""
    B, T = shape
    pos = position_ids.cpu() if isinstance(position_ids, Tensor) else torch.as_tensor(position_ids)
    if pos.dim() != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
        raise ValueError(f"forward: position_ids must have shape ({B}, {T}) like input_ids, got {tuple(pos.shape)}")
    real = (attention_mask.cpu().bool() if isinstance(attention_mask, Tensor) and attention_mask.shape == (B, T)
            else torch.ones(B, T, dtype=torch.bool))
    runs = real[:, :1].sum(1) + (real[:, 1:] & ~real[:, :-1]).sum(1)  # token runs per row
    if bool((runs > 1).any()):
        return
    if not torch.equal(pos.expand(B, T)[real], (real.cumsum(1) - 1)[real]):
        left = bool((~real[:, 0] & real.any(1)).any())
        raise ValueError("forward: position_ids must count 0, 1, 2, ... along each row's tokens"
                         + (" from its first one (with left padding: attention_mask.cumsum(-1) - 1, as HF makes them)"
                            if left else "")
                         + ": packed rows (positions restarting within a row, as DataCollatorWithFlattening or "
                         "padding-free training make them) are not supported, since CometForCausalLM reads each row "
                         "as one sequence, chunk by chunk; pad the samples into rows instead (e.g. "
                         "DataCollatorForSeq2Seq)")


def kept_positions(logits_to_keep, T: int) -> Optional[Tensor]:
    """forward's logits_to_keep as the positions (n,) (a host tensor) whose logits it computes,
    HF's way: an int k keeps the last k (0: all, None returned), a 1-D integer tensor lists them
    (negative ones count from the end)."""
    if isinstance(logits_to_keep, Tensor) and logits_to_keep.dim() == 1 and not logits_to_keep.is_floating_point() \
            and logits_to_keep.dtype != torch.bool:
        keep = logits_to_keep.cpu().long()
        if keep.numel() and not bool(((keep >= -T) & (keep < T)).all()):
            raise ValueError(f"forward: logits_to_keep lists positions outside the input's {T} tokens: "
                             f"{keep[(keep < -T) | (keep >= T)][:4].tolist()}")
        return keep % T if T else keep
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"forward: logits_to_keep must be an int >= 0 (keep the last ones; 0 keeps all) or a 1-D "
                         f"tensor of positions, got {logits_to_keep!r}")
    return None if logits_to_keep == 0 else torch.arange(max(T - logits_to_keep, 0), T)


def columns(text: Tensor, index: Tensor) -> Tensor:
    """text (B, T) ids or (B, T, d) embeddings at the columns index (B, n) names, per row."""
    if text.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, text.shape[-1])
    return torch.gather(text, 1, index)


def tokens_first(text: Tensor, first: Tensor) -> Tensor:
    """text (B, T) ids or (B, T, d) embeddings with row b rotated left by first[b] ((B,) host
    tensor): a row whose tokens start at column first[b] then holds them from column 0, its
    padding after them."""
    T = text.shape[1]
    return columns(text, upload((torch.arange(T) + first.unsqueeze(1)) % T, text.device))
