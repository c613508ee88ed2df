"""fifo_push / fifo_view: cost against capacity, and against the reference.

fifo_push must cost O(new rows): its time should not depend on the capacity.
Between two pushes into one layer's FIFO the whole model runs, so the ring is
not in cache; the `cold` cases flush the cache before each push to measure
that, the `warm` cases repeat pushes back to back.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU, run_case

from comet_ext import ops
from comet_ext import reference as ref

B, NEW, D = 4, 256, 1024  # reference defaults: 2048-token chunk / stride 8 = 256 rows
_FLUSH = torch.empty(64 * 2**20 // 4, device=DEVICE)  # 64 MiB, larger than the last-level cache


def _flush_cache():
    _FLUSH.add_(1.0)


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("capacity", [256, 1024, 4096])
@pytest.mark.parametrize("provider", ["comet", "reference"])
def test_fifo_push(benchmark, provider, capacity, cache):
    if provider == "reference" and (cache == "warm" or ON_GPU):
        pytest.skip("one reference case per capacity is enough (none on GPU: it is a Python loop)")
    state = ops.fifo_empty(B, capacity, (D,), device=DEVICE)
    rows = torch.randn(B, NEW, D, device=DEVICE)
    counts = torch.full((B,), NEW, device=DEVICE)
    push = ops.fifo_push if provider == "comet" else ref.fifo_push
    setup = _flush_cache if cache == "cold" else None
    run_case(benchmark, lambda: push(*state, rows, counts), op="fifo_push", provider=provider,
             mode=cache, case=f"C{capacity}", rounds=30, setup=setup, bytes=2 * B * NEW * D * 4)


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("provider", ["comet", "reference"])
def test_fifo_view(benchmark, provider, rope):
    C, H, Dh = 2048, 8, 128
    state = ops.fifo_empty(B, C, (H, Dh), device=DEVICE)
    ops.fifo_push(*state, torch.randn(B, C + 100, H, Dh, device=DEVICE), torch.full((B,), C + 100, device=DEVICE))
    inv = 1.0 / 10000 ** (torch.arange(0, Dh, 2) / Dh)
    emb = torch.outer(torch.arange(C, dtype=torch.float32), inv).repeat(1, 2)
    tables = (emb.cos().to(DEVICE), emb.sin().to(DEVICE)) if rope else ()
    view = ops.fifo_view if provider == "comet" else ref.fifo_view
    run_case(benchmark, lambda: view(*state, *tables), op="fifo_view", provider=provider,
             mode="rope" if rope else "plain", case=f"C{C}-H{H}-D{Dh}", rounds=10, bytes=2 * B * C * H * Dh * 4)
