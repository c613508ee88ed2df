"""gated_update: comet vs the reference (fp32 oracle) vs the same composition in the input dtype."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, backward_of, run_case

from comet_ext import ops
from comet_ext import reference as ref

# B x num_global slots x hidden, rank 8 (reference default num_global 512).
SHAPES = {"B8-n512-d1024-r8": (8, 512, 1024, 8), "B2-n512-d4096-r8": (2, 512, 4096, 8)}
PROVIDERS = {
    "comet": ops.gated_update,
    "reference": ref.gated_update,
    "torch-lowp": lambda *a: ref.gated_update(*a, upcast=False),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gated_update(benchmark, provider, mode, dtype, shape):
    if provider == "torch-lowp" and dtype == "fp32":
        pytest.skip("same as the reference in fp32")
    B, n, d, r = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    rg = mode == "fwd+bwd"
    dt = DTYPES[dtype]

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt).requires_grad_(rg)

    args = (t(B, n, d), t(B, n, d), t(d, scale=0.1), t(1, 2 * d, scale=(2 * d) ** -0.5),
            t(r, d, scale=d**-0.5), t(d, r, scale=r**-0.5))
    fwd = lambda: PROVIDERS[provider](*args, 1e-6)  # noqa: E731
    run_case(benchmark, fwd if mode == "fwd" else backward_of(fwd), op="gated_update",
             provider=provider, mode=mode, case=f"{shape} {dtype}",
             bytes=4 * B * n * d * args[0].element_size())  # reads readout + state, writes state + memory
