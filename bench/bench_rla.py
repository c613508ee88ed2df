"""rla: comet vs the reference (fp32 oracle) vs the same composition in the input dtype."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, backward_of, run_case

from comet_ext import ops
from comet_ext import reference as ref

SHAPES = {"M4096-d1024-r8": (4096, 1024, 8), "M4096-d2048-r8": (4096, 2048, 8)}
PROVIDERS = {
    "comet": ops.rla,
    "reference": ref.rla,
    "torch-lowp": lambda *a: ref.rla(*a, upcast=False),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rla(benchmark, provider, mode, dtype, shape):
    if provider == "torch-lowp" and dtype == "fp32":
        pytest.skip("same as the reference in fp32")
    M, d, r = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    rg = mode == "fwd+bwd"
    dt = DTYPES[dtype]
    x = torch.randn(M, d, generator=g).to(DEVICE, dt).requires_grad_(rg)
    down = (torch.randn(r, d, generator=g) * d**-0.5).to(DEVICE, dt).requires_grad_(rg)
    up = (torch.randn(d, r, generator=g) * r**-0.5).to(DEVICE, dt).requires_grad_(rg)
    w = torch.ones(d, dtype=dt, device=DEVICE, requires_grad=rg)
    fwd = lambda: PROVIDERS[provider](x, down, up, w, 1e-6)  # noqa: E731
    run_case(benchmark, fwd if mode == "fwd" else backward_of(fwd), op="rla",
             provider=provider, mode=mode, case=f"{shape} {dtype}", bytes=2 * M * d * x.element_size())
