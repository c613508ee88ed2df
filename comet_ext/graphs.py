"""CUDA graphs of a streaming step's layer loop.

A read step launches a few hundred small kernels per layer; with a deep model on a
slow host that launching, not the GPU, sets the pace. Every full chunk of a long
read has the same shape once the FIFO is full, so StepGraphs records the layer loop
as one CUDA graph the second time a step shape is seen and replays it for every
later step of that shape: the host then launches one graph per chunk.

What a recording bakes in is exactly what the loop's Python decided on, so that
is the graph's key: the shapes and dtypes of every tensor the loop is given, the
host-side values beside them (which samples close, which have global rows, how
many keys attention reads, ...), and the addresses of the tensors it reads or
writes without being given them (the model's parameters, the memory's buffers,
which it updates in place), and the ambient modes the loop ran under (autocast and
its dtype, inference mode, grad mode). A replay first copies the step's tensors
into the recording's own; nothing else may change between steps, and
modeling._stream_step is written so.

A recording is made on the step's own device, on a capture stream of that device,
and under autocast with autocast's weight-cast cache off: the cached casts live only
as long as the caller's autocast block, so the graph makes its own.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Hashable, Iterator

import torch
from torch import Tensor


def tensor_leaves(obj: Any) -> list[Tensor]:
    """Every tensor in obj (tensors, dataclasses, tuples and lists of them), in a fixed order."""
    out: list[Tensor] = []

    def walk(o):
        if isinstance(o, Tensor):
            out.append(o)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                walk(getattr(o, f.name))
        elif isinstance(o, (tuple, list)):
            for item in o:
                walk(item)

    walk(obj)
    return out


def host_key(obj: Any) -> Hashable:
    """Everything in obj but its tensors' values: the tensors' shapes and dtypes and every
    other value (ints, bools, tuples), as a hashable tuple."""
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__,) + tuple(host_key(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__,) + tuple(host_key(item) for item in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"StepGraphs: cannot key a step on a {type(obj).__name__}")


def with_leaves(obj: Any, leaves: Iterator[Tensor]) -> Any:
    """obj with its tensors (in tensor_leaves order) replaced by the next ones from leaves."""
    if isinstance(obj, Tensor):
        return next(leaves)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: with_leaves(getattr(obj, f.name), leaves)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple):
        return tuple(with_leaves(item, leaves) for item in obj)
    if isinstance(obj, list):
        return [with_leaves(item, leaves) for item in obj]
    return obj


def ambient_key(device: torch.device) -> Hashable:
    """The modes a recording bakes in beside its arguments: autocast on device's type and its
    dtype (the casts are recorded), inference mode (the recording's input copies are inference
    tensors under it: a replay outside could not write them), and grad mode."""
    autocast = torch.is_autocast_enabled(device.type)
    return (autocast, torch.get_autocast_dtype(device.type) if autocast else None,
            torch.is_inference_mode_enabled(), torch.is_grad_enabled())


@dataclasses.dataclass
class _Recording:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[Tensor]  # the recording's own copies of the step's tensors
    output: Tensor


class StepGraphs:
    """Recorded layer loops of streaming steps, at most `capacity` of them (least recently
    used dropped first)."""

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"StepGraphs: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._recordings: collections.OrderedDict[Hashable, _Recording] = collections.OrderedDict()
        self._seen: collections.Counter = collections.Counter()
        self._unrecordable: set[Hashable] = set()  # keys whose recording failed: they run eagerly
        self._pool = None
        self._streams: dict[int, "torch.cuda.Stream"] = {}  # a capture stream per device index
        self.replays = 0  # how many steps ran as a replay (for tests and benchmarks)

    def run(self, fn: Callable[..., Tensor], args: tuple, context: Hashable) -> Tensor:
        """fn(*args) -> a tensor, for one step. args: the step's tensors (in tensors,
        dataclasses, tuples); context: what else the loop depends on (see the module doc).
        Runs eagerly while the step's key is new; the second time, runs eagerly and then
        records; from the third, replays. A recording that fails is reported once (a
        RuntimeWarning) and its key runs eagerly from then on: the step itself has already
        run, so its result and the memory it updated stand."""
        leaves = tensor_leaves(args)
        if not leaves:
            raise ValueError("StepGraphs: a step needs at least one tensor argument (it names the device)")
        key = (host_key(args), context, ambient_key(leaves[0].device))
        rec = self._recordings.get(key)
        if rec is not None:
            self._recordings.move_to_end(key)
            for dst, src in zip(rec.inputs, leaves):
                dst.copy_(src)
            rec.graph.replay()
            self.replays += 1
            return rec.output.clone()  # the next replay overwrites the recording's output
        out = fn(*args)
        if len(self._seen) >= 1024:  # keys seen once (the first chunks of many reads) would pile up
            self._seen.clear()
        self._seen[key] += 1
        if self._seen[key] >= 2 and key not in self._unrecordable:
            try:
                self._record(key, fn, args)
            except RuntimeError as e:
                self._unrecordable.add(key)
                del self._seen[key]
                warnings.warn(f"StepGraphs: a streaming step could not be recorded as a CUDA graph; steps "
                              f"of its shape run eagerly from now on. The error: {e}", RuntimeWarning,
                              stacklevel=2)
        return out

    def _record(self, key: Hashable, fn: Callable[..., Tensor], args: tuple) -> None:
        # Recording runs nothing: the step has already run eagerly, and the memory it
        # updated in place is not updated twice.
        inputs = [t.clone() for t in tensor_leaves(args)]
        static_args = with_leaves(args, iter(inputs))
        device = inputs[0].device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with contextlib.ExitStack() as stack:
            # torch's default capture stream lives on whichever device was current when the first
            # graph was made: a model on another device would run its kernels instead of recording
            stack.enter_context(torch.cuda.device(device))
            if device.index not in self._streams:
                self._streams[device.index] = torch.cuda.Stream(device)
            stream = self._streams[device.index]
            if torch.is_autocast_enabled(device.type):
                stack.enter_context(torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                                                   cache_enabled=False))
            stack.enter_context(torch.cuda.graph(graph, pool=self._pool, stream=stream))
            output = fn(*static_args)
        self._recordings[key] = _Recording(graph, inputs, output)
        del self._seen[key]
        while len(self._recordings) > self.capacity:
            self._recordings.popitem(last=False)

    def clear(self) -> None:
        self._recordings.clear()
        self._seen.clear()
        self._unrecordable.clear()
        self._pool = None  # a fresh pool: nothing the old recordings allocated is reused
