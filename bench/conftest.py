"""Shared pieces of the op benchmarks (pytest-benchmark).

Every benchmark records `op`, `provider`, `mode` and a `case` id in
extra_info; bench/report.py turns one run's JSON into ratios (ours / each
baseline, same case, same run). Absolute times on shared machines are noise.
"""
from __future__ import annotations

import os

import pytest
import torch

import comet_ext  # noqa: F401  (loads the op library)
from report import BANDWIDTH_MODES, StaleBuild, measured_build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The device the benchmarks run on: `COMET_BENCH_DEVICE=cuda pytest bench/...` on a GPU.
DEVICE = os.environ.get("COMET_BENCH_DEVICE", "cpu")
ON_GPU = DEVICE.startswith("cuda")


def pytest_configure(config):
    """Refuses to time a comet_ext that is not this tree's code (report.measured_build)."""
    try:
        measured_build()
    except StaleBuild as e:
        raise pytest.UsageError(str(e)) from None


def run_case(benchmark, fn, *, op, provider, mode, case, rounds=5, setup=None, **extra):
    """Times fn() (after one warm-up) and tags the result for the report."""
    benchmark.group = f"{op} {case} {mode}"
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, case=case, device=DEVICE, **extra)
    if ON_GPU:  # time the kernels, not their launch
        inner = fn
        if "bytes" in extra and mode in BANDWIDTH_MODES:  # memory-bound: bandwidth from the device time
            ms, how = device_ms(inner)
            benchmark.extra_info.update(device_ms=ms, device_timing=how)

        def fn():
            inner()
            torch.cuda.synchronize()

    if setup is None:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    else:
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)


def device_ms(fn, calls: int = 20) -> tuple[float, str]:
    """GPU time of one fn() call (no autograd), without the host: `calls` calls recorded as one
    CUDA graph, replayed between CUDA events, best of 5. A memory-bound op at these sizes runs
    for microseconds, less than its launch takes from Python on a slow host; timed per call, the
    host would be measured. -> (milliseconds, how it was timed)."""
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            replay, how = graph.replay, f"{calls} calls replayed as one CUDA graph"
        except RuntimeError as err:  # an op that cannot be recorded: back-to-back launches instead
            replay, how = (lambda: [fn() for _ in range(calls)]), f"{calls} back-to-back calls ({err})"[:120]
        replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / calls)
    return best, how


def backward_of(forward):
    """fwd+bwd callable: forward() returns tensors; all of them get a ones gradient."""

    def fn():
        outs = forward()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return fn


@pytest.fixture(autouse=True)
def _no_grad_leaks():
    yield
    torch.set_grad_enabled(True)
