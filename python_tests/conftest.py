"""Shared test helpers: devices, tolerances, random inputs."""
from __future__ import annotations

import os

import pytest
import torch
from _hypothesis import AVAILABLE, settings

import comet_ext  # noqa: F401  (loads the op library)

if AVAILABLE:
    settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
    settings.register_profile("dev", max_examples=60, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
LOW_PRECISION = [torch.bfloat16, torch.float16]


def has_kernel(op: str, device: str) -> bool:
    """Whether comet::<op> has a kernel registered for this device."""
    key = "CUDA" if device == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"comet::{op}", key)


def devices_for(op: str):
    """pytest params over devices; CUDA skips cleanly without a GPU or without a kernel."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
                pytest.mark.skipif(
                    HAS_CUDA and not has_kernel(op, "cuda"),
                    reason=f"comet::{op} has no CUDA kernel in this build",
                ),
            ],
        ),
    ]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_flash_rule(name: str, ours: torch.Tensor, low_ref: torch.Tensor, ref: torch.Tensor):
    """FlashAttention's low-precision rule: our error against the fp32 oracle is at most
    twice the error of the same oracle run in the low dtype, plus one rounding of the
    output's magnitude (the floor for outputs the low-precision oracle gets exact)."""
    dtype = ours.dtype
    floor = torch.finfo(dtype).eps * ref.abs().max().item() if ref.numel() else 0.0
    ours_err, ref_err = max_err(ours, ref), max_err(low_ref, ref)
    assert ours_err <= 2 * ref_err + floor, (
        f"{name}: kernel error {ours_err:.3g} > 2 x low-precision oracle error {ref_err:.3g}"
        f" + floor {floor:.3g}"
    )


def assert_close_fp32(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol=2e-5, atol=2e-5):
    """fp32 kernel against the fp64 oracle: tight, scaled by the reference magnitude."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = max_err(ours, ref)
    bound = atol * scale + rtol * scale
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def outputs_and_grads(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fn(*inputs)'s floating outputs and the gradients of a loss over them for every input."""
    for t in inputs:
        t.grad = None
    outs = fn(*inputs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.is_floating_point()]
    sum(o.double().square().sum() for o in outs).backward()
    return [o.detach().clone() for o in outs] + [t.grad.clone() for t in inputs]


def assert_deterministic(fn, inputs: list[torch.Tensor], thread_counts=()) -> None:
    """Outputs and gradients are bit for bit the same when run again, and under each of
    thread_counts CPU threads (for the CPU kernels whose partial sums do not follow the threads)."""
    first = outputs_and_grads(fn, inputs)
    again = outputs_and_grads(fn, inputs)
    threads = torch.get_num_threads()
    try:
        for n in thread_counts:
            torch.set_num_threads(n)
            again += outputs_and_grads(fn, inputs)
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(first * (1 + len(thread_counts)), again)):
        assert torch.equal(a, b), f"output / gradient {i % len(first)} differs between runs"
