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
(B, n) with n < Sk, and the attention reads the first n keys.

Packed sequences (several sequences in one row, as DataCollatorWithFlattening or
padding-free training make them): HF finds them from position_ids that restart
and folds them into the mask function it hands to `comet_mask` (causal AND same
sequence); `comet_mask` reads them back by probing that function and hands over
an int64 (B, S) tensor of sequence ids instead of the bool padding mask (1, 2, ...
along each row, 0 for padding). FlashAttention-style `cu_seq_lens_q` /
`cu_seq_lens_k` kwargs reach the attention function directly and win over
position_ids; as in FlashAttention's varlen call they are offsets into the B * S
tokens flattened (a sequence may run on into the next row). Each sequence becomes
one sample of a kernel batch: the sequences are grouped by length into power-of-two
buckets (lengths in (2^(j-1), 2^j]), one kernel call per non-empty bucket, padded
to that bucket's longest, so the padded rows stay under twice the real tokens
however uneven the lengths, for about log2(longest) calls per layer. Where the
tokens go (the layout, buckets included) takes host reads of device values; HF
hands every decoder layer the same mask tensor, so the layout is computed once
per forward and cached on that tensor (or on cu_seq_lens_q), weakly, and
recomputed after an in-place edit (seen by the version counter, or for inference
tensors, which keep none, by a content check: one host read per layer). The output is in
the kernel's dtype (autocast's under autocast). Under torch.compile the layout's
data-dependent sizes break the graph (fullgraph=True refuses). Prefill only: HF
detects packing only without a KV cache. Other masks (a custom mask function, a
bidirectional or block overlay, a sliding window that hides keys: some models put it in
the mask function only), non-causal modules (is_causal=False) and arguments that change
the scores (`_SCORE_CHANGES`) are refused, not silently ignored.
"""
from __future__ import annotations

import threading
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

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


def _sequence_ids(batch_size: int, mask_function, queries: Tensor, kv_offset: int, kv_length: int,
                  window: Optional[int]) -> Optional[Tensor]:
    """Reads HF's mask function where it is not plain `causal_mask_function` (a sliding window of
    `window` keys, packed sequences, a custom mask), by probing it at O(B * S) points for the S
    queries at absolute positions `queries`. Returns None where it is causal (within the window),
    int64 (B, S) sequence ids (1, 2, ... along each row) where it is causal within sequences packed
    into each row, and raises NotImplementedError otherwise: the kernel applies the causal part
    itself and would silently drop the rest. A query starts a sequence where it does not see the key
    just before it; each query must then see itself and the oldest key of its sequence that the
    window allows, and neither the key before its sequence nor the key after itself. Probes tell
    HF's masks apart; they are not a proof for any function."""
    kv_end = kv_offset + kv_length
    b = torch.arange(batch_size, device=queries.device).view(-1, 1)
    q = queries.view(1, -1)

    def sees(keys: Tensor) -> Tensor:  # (B, S) bool: does each query see its key in `keys`
        seen = mask_function(b, torch.zeros_like(b), q, keys.clamp(kv_offset, kv_end - 1))
        return torch.as_tensor(seen).to(q.device).expand(batch_size, q.shape[1])  # a tensor on q's device: no copy

    starts = ~sees(q - 1) & (q > kv_offset)
    first = torch.where(starts, q, kv_offset).cummax(1).values  # each query's sequence starts here
    oldest = first if window is None else torch.maximum(first, q - window + 1)
    ok = (sees(q).all() & sees(oldest).all() & ~(sees(first - 1) & (first > kv_offset)).any()
          & ~(sees(q + 1) & (q + 1 < kv_end)).any())
    # Where a query's sequence so far is longer than the window, the window masks its oldest keys:
    # the kernel would attend them (a model that passes no sliding_window to the attention).
    seen = (q - first + 1).max()  # the most keys a query sees (within its sequence)
    ok, seen, packed, whole = torch.stack([ok, seen, starts.any(), queries[0] == kv_offset]).tolist()
    if not ok:
        raise NotImplementedError(
            "comet attention implements causal attention with padding masks or packed sequences only; this call "
            "asked for another mask (a custom mask function, a bidirectional or block overlay)")
    if window is not None and seen > window:
        raise NotImplementedError(f"comet attention does not implement sliding-window attention: {seen} keys exceed "
                                  f"the model's sliding_window {window} (its mask function hides the oldest)")
    if not packed:
        return None
    if not whole or queries.numel() != kv_length:  # the sequences of the cached keys are not known
        raise NotImplementedError("comet attention takes a mask that restarts within a row (packed sequences: "
                                  "position_ids that restart; chunked attention) only for a prefill without a KV cache")
    return 1 + starts.long().cumsum(1)


def comet_mask(batch_size: int, q_length: Optional[int] = None, *, kv_length: int,
               attention_mask: Optional[Tensor] = None, kv_offset: int = 0, mask_function=None,
               **kwargs) -> Optional[Tensor]:
    """The mask HF hands to `comet_attention`: None when nothing is padded, else the
    2D bool padding mask (B, n) of real tokens among the first n = kv_length key slots, or
    fewer: with a static cache the slots after the last query are not written yet and
    n stops there. For packed sequences, the int64 (B, kv_length) sequence ids of
    `_sequence_ids`, 0 for padding. Registered with transformers' AttentionMaskInterface:
    without it the attention function would silently receive no mask at all (the causal
    part is the kernel's). Early transformers 5 releases (5.0 among them) pass cache_position
    instead of q_length / q_offset: it lands in kwargs."""
    from transformers.masking_utils import causal_mask_function

    if attention_mask is not None:  # as HF reads it: columns kv_offset.. of key slots, padding past its end
        attention_mask = attention_mask.bool()
        attention_mask = torch.nn.functional.pad(attention_mask, (0, max(0, kv_offset + kv_length
                                                                          - attention_mask.shape[1])))
        attention_mask = attention_mask[:, kv_offset:kv_offset + kv_length]
    queries = _query_positions(q_length, kwargs)
    if mask_function not in (None, causal_mask_function) and queries is not None and queries.numel():
        ids = _sequence_ids(batch_size, mask_function, queries, kv_offset, kv_length, kwargs.get("local_size"))
        if ids is not None:  # packed: padding (HF passes none with packing; a caller may) is sequence 0
            return ids if attention_mask is None else ids * attention_mask
    end = _query_end(q_length, kwargs)
    written = kv_length if end is None else min(kv_length, end - kv_offset)
    if written < kv_length:  # a static cache: the mask's length tells the attention where keys end
        if attention_mask is None:
            device = kwargs.get("device", getattr(kwargs.get("cache_position"), "device", None))
            return torch.ones(batch_size, written, dtype=torch.bool, device=device)
        return attention_mask[:, :written]
    if attention_mask is None or bool(attention_mask.all()):
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


def _cu_seq_ids(cu_q: Optional[Tensor], cu_k: Optional[Tensor], B: int, S: int, device) -> Tensor:
    """FlashAttention-style `cu_seq_lens_q` / `cu_seq_lens_k` ((n + 1,) offsets of n sequences
    in the B * S tokens, flattened) as (B, S) sequence ids; 0 for tokens outside them."""
    if cu_q is None or cu_k is None or (cu_q is not cu_k and not torch.equal(cu_q, cu_k)):
        raise NotImplementedError("comet attention takes cu_seq_lens_q / cu_seq_lens_k for packed self-attention "
                                  "only: both given, and equal")
    cu = cu_q.to(device=device, dtype=torch.long)
    # Offsets that are not 0, ..., <= B * S, non-decreasing would attend the wrong tokens silently
    # (one host read, once per forward: the layout is cached).
    if cu.dim() != 1 or cu.numel() < 1 or bool((cu[0] != 0) | (cu[-1] > B * S) | (cu.diff() < 0).any()):
        raise ValueError(f"comet attention: cu_seq_lens_q / cu_seq_lens_k must be 1D offsets 0 = c_0 <= c_1 <= "
                         f"... <= {B * S} (the batch's {B} x {S} tokens, flattened); got {cu_q.tolist()}")
    t = torch.arange(B * S, device=device)
    ids = torch.searchsorted(cu[1:], t, right=True) + 1
    return torch.where((t >= cu[0]) & (t < cu[-1]), ids, 0).view(B, S)


# Length buckets: a sequence of n tokens goes to bucket ceil(log2(n)) (lengths in (2^(j-1), 2^j]),
# one kernel call per non-empty bucket, padded to that bucket's longest. Every sequence is more than
# half its bucket's longest, so the padded rows stay under 2x the real tokens, for about log2 of the
# longest calls. One batch padded to the longest of all would take (sequences x longest) rows: 32x
# the tokens for one 4096-token sequence beside 63 of 64 tokens. _BUCKETS bounds the bucket index
# (lengths up to 2^62).
_BUCKETS = 63


class _Layout(NamedTuple):
    """Where the T real tokens of packed sequences sit: token t at (row[t], col[t]) of the callers'
    (B, S), and at flat row dest[t] (T,) of the kernel calls' padded batches laid end to end. The
    j-th call (the j-th non-empty length bucket, shortest first) takes a batch of sizes[j] =
    (n_j, L_j): n_j sequences padded to the bucket's longest, L_j, the n_j * L_j flat rows after
    the earlier calls', its sequence i at rows i * L_j + 0 .. len - 1 of those; lens[j] (n_j,) the
    lengths of its sequences, in that order."""
    row: Tensor
    col: Tensor
    dest: Tensor
    lens: tuple[Tensor, ...]
    sizes: tuple[tuple[int, int], ...]

    @property
    def L(self) -> int:
        """The longest sequence (0: no real token)."""
        return max((L for _, L in self.sizes), default=0)


def _layout(seq: Tensor, rows_split: bool = True) -> _Layout:
    """The layout of (B, S) sequence ids where each run of equal nonzero ids is one sequence (0:
    padding, in no sample), along a row, or with `rows_split=False` along the flattened B * S
    tokens (FlashAttention's varlen reading of cu_seq_lens: a sequence may run on into the next
    row). Reads the device three times (two nonzero's sizes, the buckets' sizes)."""
    device = seq.device
    row, col = seq.nonzero(as_tuple=True)  # the real tokens (T,), in row-major order
    ids = seq[row, col]
    new = torch.ones_like(ids, dtype=torch.bool)  # each sequence's first token
    new[1:] = ids[1:] != ids[:-1]
    if rows_split:
        new[1:] |= row[1:] != row[:-1]
    sample = new.cumsum(0) - 1  # (T,) the sequence of each token
    first = new.nonzero().squeeze(1)  # (n,) the first token of each sequence
    lens = torch.diff(first, append=first.new_tensor([ids.numel()]))  # (n,)
    pos = torch.arange(ids.numel(), device=device) - first[sample]  # (T,) place within its sequence
    # (n,) bucket ceil(log2(len)): the index of the first power of two >= len, in integers (exact)
    bucket = torch.searchsorted(1 << torch.arange(_BUCKETS, device=device), lens)
    count = torch.zeros(_BUCKETS, dtype=torch.long, device=device).index_add_(0, bucket, torch.ones_like(lens))
    longest = torch.zeros_like(count).scatter_reduce_(0, bucket, lens, "amax")
    # Each sequence's slot in its bucket: its rank in the sequences sorted by bucket, less the
    # bucket's first rank (any order within a bucket would do; stable keeps it deterministic).
    order = torch.argsort(bucket, stable=True)  # (n,) the sequences, bucket by bucket
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=device))
    slot = rank - (count.cumsum(0) - count)[bucket]
    rows = count * longest  # (_BUCKETS,) each bucket's padded rows; their starts in the flat batches:
    start = (rows.cumsum(0) - rows)[bucket] + slot * longest[bucket]  # (n,) each sequence's first row
    dest = start[sample] + pos
    sizes = [(n, L) for n, L in zip(*torch.stack([count, longest]).tolist()) if n]  # the one read of sizes
    lens = lens[order].split([n for n, _ in sizes])
    return _Layout(row, col, dest, tuple(lens), tuple(sizes))


def _packed_ids(mask: Optional[Tensor], cu_q: Optional[Tensor], cu_k: Optional[Tensor], B: int, S: int,
                device) -> Tensor:
    """The (B, S) sequence ids of a packed call: comet_mask's, or cu_seq_lens_q / _k's (as in
    FlashAttention these win over position_ids) without the tokens a padding mask drops."""
    seq = mask
    if cu_q is not None or cu_k is not None:
        cu_ids = _cu_seq_ids(cu_q, cu_k, B, S, device)
        seq = cu_ids if seq is None else cu_ids * (seq.to(device) != 0)
    if seq.shape != (B, S):
        raise ValueError(f"comet attention expects ({B}, {S}) sequence ids, got shape {tuple(seq.shape)}")
    return seq.to(device)


# HF hands every decoder layer of one forward the same mask tensor (and the same cu_seq_lens), so
# the layout is computed once per forward: cached on that tensor, weakly (the entry goes with it),
# the newest _MAX_LAYOUTS only (cu_seq_lens of batches a caller keeps would keep theirs otherwise).
_LAYOUTS = WeakIdKeyDictionary()
_LAYOUTS_LOCK = threading.Lock()
_MAX_LAYOUTS = 8


def _packed_layout(mask: Optional[Tensor], cu_q: Optional[Tensor], cu_k: Optional[Tensor], B: int, S: int,
                   device) -> _Layout:
    """`_layout` of `_packed_ids`, cached. An entry holds for the same source tensors (the same
    objects, by weak reference), unchanged since, and the same B, S and device. "Unchanged" is
    their `_version` (an in-place edit is a miss, at no cost); inference tensors keep no version
    counter, so for them it is their contents, compared with a copy kept in the entry (one host
    read per layer, where computing the layout takes three). Not cached while torch.compile traces
    (it graph-breaks on the layout's data-dependent sizes and runs it eagerly)."""
    sources = (mask, cu_q, cu_k)

    def compute() -> _Layout:
        return _layout(_packed_ids(mask, cu_q, cu_k, B, S, device), rows_split=cu_q is None and cu_k is None)

    if torch.compiler.is_compiling():
        return compute()
    key = next(t for t in sources if t is not None)
    stamp = (B, S, torch.device(device), *(None if t is None else "inference" if t.is_inference() else t._version
                                           for t in sources))
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0] == stamp and all(
            (r is None and t is None) or (r is not None and r() is t) for r, t in zip(hit[1], sources)) \
            and _same_contents(hit[2], sources):
        return hit[3]
    layout = compute()
    copies = tuple(t.clone() if t is not None and t.is_inference() and all(t is not u for u in sources[:i])
                   else None for i, t in enumerate(sources))  # cu_seq_lens_k is often cu_seq_lens_q
    with _LAYOUTS_LOCK:  # replicas of nn.DataParallel run their layers in threads of one process
        _LAYOUTS.pop(key, None)  # re-entered as the newest
        while len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.pop(next(iter(_LAYOUTS.keys())), None)
        _LAYOUTS[key] = (stamp, tuple(None if t is None else weakref.ref(t) for t in sources), copies, layout)
    return layout


def _same_contents(copies: tuple[Optional[Tensor], ...], sources: tuple[Optional[Tensor], ...]) -> bool:
    """Whether each source kept as a copy (an inference tensor) still holds it: True with no
    host read where none was kept, else one read for all of them."""
    pairs = [(c, t) for c, t in zip(copies, sources) if c is not None]
    if not pairs:
        return True
    if any(c.shape != t.shape or c.dtype != t.dtype or c.device != t.device for c, t in pairs):
        return False
    return bool(torch.stack([torch.eq(c, t).all() for c, t in pairs]).all())


def _attend_by_sequence(q: Tensor, k: Tensor, v: Tensor, scaling: Optional[float], layout: _Layout,
                        window: Optional[int]) -> Tensor:
    """Causal attention within each sequence of `layout`: q (B, S, Hq, D), k / v (B, S, Hkv, D).
    The sequences are attended by length bucket (see `_Layout`): one kernel call per non-empty
    bucket, on a batch of (n_j, L_j, H, D), its sequences padded to the bucket's longest, L_j.
    Gathered in, attended, scattered back to (B, S, Hq, D) in the kernel's output dtype (the
    autocast dtype under autocast); rows of no sequence (padding) are zeros."""
    row, col, dest, lens, sizes = layout
    L = layout.L
    if not sizes:
        return q.new_zeros(q.shape)
    if window is not None and L > window:
        raise NotImplementedError(f"comet attention does not implement sliding-window attention: a packed sequence "
                                  f"of {L} tokens exceeds the model's sliding_window {window}")
    flat = [n * Lj for n, Lj in sizes]

    def pack(t: Tensor) -> list[Tensor]:  # (B, S, H, D) -> [(n_j, L_j, H, D)], zeros past each length
        # index_put_ into a fresh buffer autograd does not need (no clone of it); the buckets are
        # views of it, so every token is gathered once.
        buf = t.new_zeros(sum(flat), *t.shape[2:]).index_put_((dest,), t[row, col])
        return [b.view(n, Lj, *t.shape[2:]) for b, (n, Lj) in zip(buf.split(flat), sizes)]

    outs = [ops.prefix_attention(qj, kj, vj, scaling, lj, lj)[0]
            for qj, kj, vj, lj in zip(pack(q), pack(k), pack(v), lens)]
    out = torch.cat([o.flatten(0, 1) for o in outs]) if len(outs) > 1 else outs[0].flatten(0, 1)  # dest's rows
    return out.new_zeros(*q.shape[:2], *out.shape[1:]).index_put_((row, col), out[dest])


# Keyword arguments by which HF models change the scores or the softmax (logit soft-capping,
# attention sinks, T5's position bias, sparse attention's selected keys): the kernel would drop them.
_SCORE_CHANGES = ("softcap", "s_aux", "sinks", "position_bias", "indices", "block_indices")


def comet_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Optional[Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                    **kwargs) -> tuple[Tensor, None]:
    """HF attention-interface function backed by comet::prefix_attention. attention_mask is
    `comet_mask`'s: None, a bool (B, n) padding mask, or int64 (B, S) ids of packed sequences."""
    if dropout:
        raise NotImplementedError("comet attention does not implement attention dropout; set attention_dropout=0")
    is_causal = kwargs.get("is_causal")
    if (getattr(module, "is_causal", True) if is_causal is None else is_causal) is False:
        raise NotImplementedError("comet attention is causal attention only; this module asks for non-causal "
                                  "attention (is_causal=False: an encoder, or cross-attention)")
    changed = [name for name in _SCORE_CHANGES if kwargs.get(name) is not None]
    if changed:
        raise NotImplementedError(f"comet attention implements plain softmax attention; this model passes "
                                  f"{', '.join(changed)}, which change it")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"comet attention expects the 2D mask of its mask function, got shape "
                         f"{tuple(attention_mask.shape)}: a 4D or float mask (a custom mask, or a bias such as "
                         f"ALiBi) is not implemented; or was the model created before comet_ext.register()?")
    window = kwargs.get("sliding_window")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    B, S, Sk = q.shape[0], q.shape[1], k.shape[1]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    has_ids = attention_mask is not None and attention_mask.dtype != torch.bool  # comet_mask's packed sequences
    if cu_q is not None or cu_k is not None or has_ids:
        if Sk != S:
            raise NotImplementedError(f"comet attention takes packed sequences only for a prefill without a KV cache "
                                      f"(as many keys as queries); got {S} queries over {Sk} keys")
        layout = _packed_layout(attention_mask, cu_q, cu_k, B, S, q.device)
        return _attend_by_sequence(q, k, v, scaling, layout, window), None
    if window is not None and Sk > window:  # inside the window a sliding mask masks nothing
        raise NotImplementedError(f"comet attention does not implement sliding-window attention: "
                                  f"{Sk} keys exceed the model's sliding_window {window}")
    if attention_mask is None:
        out, _ = ops.prefix_attention(q, k, v, scaling)
        return out, None
    if attention_mask.shape[1] < Sk:  # a static cache: the slots past the mask are not written yet
        k, v = k[:, :attention_mask.shape[1]], v[:, :attention_mask.shape[1]]
        if bool(attention_mask.all()):
            out, _ = ops.prefix_attention(q, k, v, scaling)
            return out, None
    Sk = k.shape[1]
    k_start, k_len = _runs(attention_mask[:, -Sk:].bool())
    q_offset = Sk - S  # the first query's place among the keys
    q_first = (k_start - q_offset).clamp(min=0)
    q_len = (k_start + k_len - q_offset - q_first).clamp(min=0, max=S)
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
