"""Would exactly closed gates keep the first-chunk key longer? A diagnostic.

    python bench/passkey_closed_gates.py --close-above 0.999 --length 262144 --keys 10

Reads haystacks with the needle at --depth (default 0: the first chunk; keys of
seeds 0..keys-1, as in `comet-passkey --sweep`) with the model's global-memory gates g set to exactly 1
wherever g > --close-above: slots that are nearly closed then leak nothing. If the
misses of the plain model (`--close-above 2`: no gate changed) turn into hits, the
small leaks of closed slots are what loses the key; if not, they are not. The gated
update runs here in plain PyTorch (comet_ext.reference's formula with the clamp),
not through comet::gated_update. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from comet_ext import modeling
from comet_ext.passkey import DEFAULT_MODEL, load, run_batch
from comet_ext.reference import rms_norm


def closed_gates_forward(tau: float):
    """GlobalMemoryNet.forward (DESIGN.md §1) with g -> 1 where g > tau."""
    def forward(self, readout, state):
        c = rms_norm(readout, self.norm.weight, torch.finfo(readout.dtype).eps, True)
        new = c
        if state is not None:
            s = state.float()
            g = torch.sigmoid(torch.cat([c, s], dim=-1) @ self.g_proj.weight.float().t())
            g = torch.where(g > tau, torch.ones_like(g), g)
            new = g * s + (1 - g) * c
        memory = new + (new @ self.o_proj.down_proj.weight.t()) @ self.o_proj.up_proj.weight.t()
        return new.to(readout.dtype), memory.to(readout.dtype)
    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--close-above", type=float, default=0.999, help="gates above this become exactly 1")
    ap.add_argument("--length", type=int, default=262144)
    ap.add_argument("--depth", type=float, default=0.0)
    ap.add_argument("--keys", type=int, default=10)
    args = ap.parse_args()
    modeling.GlobalMemoryNet.forward = closed_gates_forward(args.close_above)
    model, tok = load(args.model)
    start = time.time()
    runs = run_batch(model, tok, args.length, args.depth, list(range(args.keys)))
    print(json.dumps({"close_above": args.close_above, "length": args.length, "depth": args.depth,
                      "correct": sum(r["correct"] for r in runs), "keys": args.keys,
                      "expected": [r["expected"] for r in runs], "found": [r["found"] for r in runs],
                      "minutes": (time.time() - start) / 60}))


if __name__ == "__main__":
    main()
