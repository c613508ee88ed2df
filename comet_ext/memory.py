"""CometMemory: everything a CoMeT model carries from one piece of input to the
next while streaming. Its size depends on the model and the batch, never on how
much has been read.

Per layer l (tensors stacked over layers on dim 0):
  state        (L, B, G, d)        global memory state S (zeros before the first closed chunk)
  kv_k, kv_v   (L, B, R, Hkv, D)   per sample, packed: the memory rows' keys / values
                                   (global rows at positions 0..G-1, then the FIFO rows),
                                   then the open chunk's rows, all RoPE'd; R = G + C + open capacity
  fifo_k/v     (L, B, C, Hkv, D)   FIFO ring of pre-RoPE keys / values of compressed rows
  fifo_head/len (L, B)
  pending_k/v  (L, B, Cp, Hkv, D)  pre-RoPE keys / values of the open chunk's compression rows
Per sample:
  has_global (B,) bool, mem_len (B,) memory rows before the open chunk, open_rows (B,)
  rows of the open chunk so far, open_text (B,) its text tokens, pending (B,) its
  compression rows, tokens (B,) text tokens read in all.

G = num_global, C = temp_budget, Cp = compression rows of one chunk. Keys of FIFO
rows are projected once, when pushed; only RoPE depends on their position.

The tensors are the model's to write: `read` and `generate` update them in place. A
streaming step decides on the host what to queue (how many rows each sample appends,
where they go), so the memory also keeps its per-sample counters on the host
(`host_counts`), written by the step that changed them: a decode step then never waits
for the device to tell it where it is.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_write

FORMAT_VERSION = 1
_FIELDS = (
    "state", "kv_k", "kv_v", "fifo_k", "fifo_v", "fifo_head", "fifo_len", "pending_k", "pending_v",
    "has_global", "mem_len", "open_rows", "open_text", "pending", "tokens",
)


# The per-sample counters a streaming step plans with (fifo_len: every layer's is the same).
_COUNTERS = ("has_global", "mem_len", "open_rows", "open_text", "pending", "fifo_len")


@dataclasses.dataclass(frozen=True)
class HostCounts:
    """The memory's per-sample counters on the host, one entry per sample; fifo_len is
    the FIFO's length (the same in every layer)."""

    has_global: tuple[bool, ...]
    mem_len: tuple[int, ...]
    open_rows: tuple[int, ...]
    open_text: tuple[int, ...]
    pending: tuple[int, ...]
    fifo_len: tuple[int, ...]

    @classmethod
    def empty(cls, batch_size: int) -> "HostCounts":
        """The counters of a memory that has read nothing."""
        zeros = (0,) * batch_size
        return cls((False,) * batch_size, zeros, zeros, zeros, zeros, zeros)


def signature_diff(have: dict, want: dict) -> dict:
    """Where a memory's signature `have` differs from a model's `want`: {key: (have, want)}."""
    return {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}


@dataclasses.dataclass
class CometMemory:
    state: Tensor
    kv_k: Tensor
    kv_v: Tensor
    fifo_k: Tensor
    fifo_v: Tensor
    fifo_head: Tensor
    fifo_len: Tensor
    pending_k: Tensor
    pending_v: Tensor
    has_global: Tensor
    mem_len: Tensor
    open_rows: Tensor
    open_text: Tensor
    pending: Tensor
    tokens: Tensor
    signature: dict = dataclasses.field(default_factory=dict)
    # (HostCounts, the counters' identity and version when they were taken): see host_counts
    _host: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False, compare=False)
    # What interrupted a step half-way (see mark_interrupted), or None
    _interrupted: Optional[str] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        # Every buffer is a normal tensor, never an inference tensor: steps write them in place,
        # which torch refuses for inference tensors outside inference mode (a memory read under
        # torch.inference_mode() could not be continued after it). Normal tensors take in-place
        # writes under inference mode too, and keep their versions, which the host copy of the
        # counters is checked against (see _counters_key).
        for f in _FIELDS:
            t = getattr(self, f)
            if t.is_inference():
                with torch.inference_mode(False):
                    setattr(self, f, t.clone())

    def _counters_key(self) -> tuple:
        # Every in-place write bumps a tensor's version (comet::fifo_push's too, see ops.py), so
        # counters written by anything but the step that recorded them are read back, never
        # trusted stale. A write that bypasses autograd's bookkeeping (.data, numpy views, a
        # CUDA graph replay) is not seen: the model's steps record their counters after
        # their replays.
        return tuple((t.data_ptr(), t._version) for t in (getattr(self, f) for f in _COUNTERS))

    def host_counts(self) -> HostCounts:
        """The per-sample counters on the host. Read back from the device (one host-device
        sync) only when the step that last wrote them did not record them."""
        if self._host is not None and self._host[1] == self._counters_key():
            return self._host[0]
        rows = torch.stack([getattr(self, f).long() for f in _COUNTERS[:-1]] + [self.fifo_len[0]]).tolist()
        counts = HostCounts(tuple(bool(g) for g in rows[0]), *(tuple(r) for r in rows[1:]))
        self._host = (counts, self._counters_key())
        return counts

    def record_host_counts(self, counts: HostCounts) -> None:
        """Records counts as the host copy of the counters as they now are (after the
        step that wrote them)."""
        self._host = (counts, self._counters_key())

    def mark_interrupted(self, what: str) -> None:
        """Records that a step stopped half-way (`what`: the exception), after some layers wrote
        their part of this memory and before the others and the counters did: continuing it
        would close chunks twice in some layers and never in others, a silently wrong memory.
        Every later use (reading on, save, and the copies select / clone / to make) refuses it."""
        self._interrupted = what

    def require_intact(self, who: str) -> None:
        """A ValueError if a step was interrupted half-way through this memory."""
        if self._interrupted is not None:
            raise ValueError(f"{who}: this memory was left half-written by a read / generate step interrupted by "
                             f"{self._interrupted}: some layers hold the step and others do not. Start again from "
                             f"a copy taken before (memory.clone()) or from a saved one")

    def _same_history(self, copy: "CometMemory") -> "CometMemory":
        """copy (a copy of this memory's values), interrupted if this memory is."""
        copy._interrupted = self._interrupted
        return copy

    def check_layout(self, layout: dict, who: str) -> None:
        """A ValueError unless every tensor has the shape and dtype of `layout` ({field: (shape,
        dtype)}, a model's `memory_layout` for this batch)."""
        wrong = {f: (tuple(getattr(self, f).shape), getattr(self, f).dtype, tuple(shape), dtype)
                 for f, (shape, dtype) in layout.items()
                 if tuple(getattr(self, f).shape) != tuple(shape) or getattr(self, f).dtype != dtype}
        if wrong:
            raise ValueError(f"{who}: memory tensors do not fit this model; (shape, dtype) held vs expected: "
                             + "; ".join(f"{f} {h} {hd} vs {e} {ed}" for f, (h, hd, e, ed) in wrong.items()))

    def check_counters(self, chunk_size: int, who: str) -> None:
        """A ValueError unless the counters hold what steps leave in them (one host read): counters
        edited, or written by something else, would make the next step read past its buffers or
        count tokens that were never read. Takes a memory whose layout fits (`check_layout`)."""
        G, C, Cp = self.state.shape[2], self.fifo_k.shape[2], self.pending_k.shape[2]
        rules = {
            f"fifo_len in [0, {C}] and the same in every layer":
                (self.fifo_len >= 0) & (self.fifo_len <= C) & (self.fifo_len == self.fifo_len[:1]),
            f"fifo_head in [0, {max(C, 1)})": (self.fifo_head >= 0) & (self.fifo_head < max(C, 1)),
            f"mem_len = {G} * has_global + fifo_len": self.mem_len == G * self.has_global.long() + self.fifo_len[0],
            f"open_text in [0, chunk_size = {chunk_size})": (self.open_text >= 0) & (self.open_text < chunk_size),
            f"pending in [0, {Cp}]": (self.pending >= 0) & (self.pending <= Cp),
            "open_rows = open_text + pending": self.open_rows == self.open_text + self.pending,
            "tokens >= open_text": self.tokens >= self.open_text,
        }
        held = torch.stack([rule.all() for rule in rules.values()]).tolist()
        broken = [name for name, ok in zip(rules, held) if not ok]
        if broken:
            raise ValueError(f"{who}: the memory's counters are not what reading leaves: {'; '.join(broken)} fails")

    def buffers(self) -> tuple[Tensor, ...]:
        """Every tensor of the memory (what a step updates in place, and its bookkeeping)."""
        return tuple(getattr(self, f) for f in _FIELDS)

    @property
    def batch_size(self) -> int:
        return self.state.shape[1]

    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in _FIELDS)

    def select(self, index) -> "CometMemory":
        """A copy holding the samples in `index` (an int, a slice, a sequence or tensor of sample
        numbers, or a boolean mask (B,)), in its order: e.g. beam reordering, dropping finished
        samples."""
        index = self._sample_index(index)
        per_layer = {"state", "kv_k", "kv_v", "fifo_k", "fifo_v", "fifo_head", "fifo_len", "pending_k", "pending_v"}
        parts = {f: getattr(self, f)[:, index] if f in per_layer else getattr(self, f)[index] for f in _FIELDS}
        return self._same_history(CometMemory(**parts, signature=dict(self.signature)))

    def _sample_index(self, index) -> Tensor:
        """select's index as sample numbers (n,) on the memory's device: an int, a slice, a
        sequence or tensor of ints, or a boolean mask (B,). Indexing with it copies, so the
        selection shares no storage with this memory (a slice would give views)."""
        B = self.batch_size
        if isinstance(index, slice):
            index = range(B)[index]
        if isinstance(index, numbers.Integral) and not isinstance(index, bool):
            index = [int(index)]
        if isinstance(index, Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = index.view(1)
        try:
            index = torch.as_tensor(index, device=self.state.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"select: index must be sample numbers (an int, a slice, or a 1-D sequence of ints) or "
                             f"a boolean mask; got {index!r}") from e
        if index.dtype == torch.bool:
            if index.shape != (B,):
                raise ValueError(f"select: a boolean index must have one entry per sample, shape ({B},); "
                                 f"got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        if index.numel() == 0:  # an all-False mask, [] or range(0) (as_tensor makes float32 of those)
            raise ValueError(f"select: the selection is empty (of {B} samples); a memory holds one sample at least")
        if index.dim() != 1 or index.is_floating_point() or index.is_complex():
            raise ValueError(f"select: index must be sample numbers (an int, a slice, or a 1-D sequence of ints) "
                             f"or a boolean mask; got dtype {index.dtype}, shape {tuple(index.shape)}")
        index = index.long()
        if not bool(((index >= -B) & (index < B)).all()):
            raise ValueError(f"select: index {index.tolist()} holds sample numbers outside [-{B}, {B})")
        return index

    def clone(self) -> "CometMemory":
        return self._with_host_counts(
            CometMemory(**{f: getattr(self, f).clone() for f in _FIELDS}, signature=dict(self.signature)))

    def _with_host_counts(self, other: "CometMemory") -> "CometMemory":
        """other (a copy of this memory's values) with this memory's host counters, if current."""
        if self._host is not None and self._host[1] == self._counters_key():
            other.record_host_counts(self._host[0])
        return self._same_history(other)

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> None:
        """Writes the memory to a safetensors file, atomically (temp file + rename).

        The header records the format version and the signature of the model
        and CoMeT config it belongs to; `load` refuses a mismatch.
        """
        self.require_intact("CometMemory.save")
        path = os.fspath(path)
        meta = {"format": "comet_ext.CometMemory", "version": str(FORMAT_VERSION),
                "signature": json.dumps(self.signature, sort_keys=True)}
        tensors = {f: getattr(self, f).detach().contiguous().cpu() for f in _FIELDS}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, device: Optional[torch.device | str] = None) -> "CometMemory":
        """Reads a memory saved by `save`. With `model`, checks that it belongs to it
        (same architecture sizes and CoMeT config) and moves it to the model's device and
        dtype (a memory saved in bfloat16 loads into a float32 model, and back)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CometMemory.load: no file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or not a safetensors file
            raise ValueError(f"CometMemory.load: {path!r} is not a readable memory file ({e})") from e
        if meta.get("format") != "comet_ext.CometMemory":
            raise ValueError(f"CometMemory.load: {path!r} is not a CometMemory file (header {meta})")
        if meta.get("version") != str(FORMAT_VERSION):
            raise ValueError(
                f"CometMemory.load: {path!r} has format version {meta.get('version')}, this comet_ext "
                f"reads version {FORMAT_VERSION}"
            )
        missing = [f for f in _FIELDS if f not in tensors]
        if missing:
            raise ValueError(f"CometMemory.load: {path!r} lacks tensors {missing}")
        signature = json.loads(meta.get("signature", "{}"))
        memory = cls(**{f: tensors[f] for f in _FIELDS}, signature=signature)
        if model is not None:
            diff = signature_diff(signature, model.memory_signature())
            if diff:
                raise ValueError(
                    f"CometMemory.load: {path!r} belongs to another model or CoMeT config; "
                    f"differences (file, model): {diff}"
                )
            memory = memory.to(device or model.device, model.dtype)
            if memory.state.dim() != 4:  # (the batch size is read from it)
                raise ValueError(f"CometMemory.load({path!r}): 'state' must be (layers, batch, slots, hidden), got "
                                 f"shape {tuple(memory.state.shape)}")
            memory.check_layout(model.memory_layout(memory.batch_size), f"CometMemory.load({path!r})")
            memory.check_counters(model.comet_config.chunk_size, f"CometMemory.load({path!r})")
            return memory
        return memory.to(device) if device is not None else memory

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CometMemory":
        """The memory on `device`, its floating buffers (state, keys, values) cast to
        `dtype`: what a model in another dtype reads (the counters stay int64). Like
        Tensor.to, a memory already on that device and in that dtype is shared, not copied;
        a copy shares no buffer with self (reading into one would corrupt the other)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        moved = {f: move(getattr(self, f)) for f in _FIELDS}
        if any(t is not getattr(self, f) for f, t in moved.items()):
            moved = {f: t.clone() if t is getattr(self, f) else t for f, t in moved.items()}
        return self._with_host_counts(CometMemory(**moved, signature=dict(self.signature)))
