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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The device the benchmarks run on: `COMET_BENCH_DEVICE=cuda pytest bench/...` on a GPU.
DEVICE = os.environ.get("COMET_BENCH_DEVICE", "cpu")
ON_GPU = DEVICE.startswith("cuda")


def run_case(benchmark, fn, *, op, provider, mode, case, rounds=5, setup=None, **extra):
    """Times fn() (after one warm-up) and tags the result for the report."""
    benchmark.group = f"{op} {case} {mode}"
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, case=case, device=DEVICE, **extra)
    if ON_GPU:  # time the kernels, not their launch
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    if setup is None:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    else:
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)


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
