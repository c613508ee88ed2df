"""What the global memory's gates do while a passkey model reads a haystack.

    python bench/passkey_gates.py --out bench/results/passkey/gates.md

For each layer, the gate g = sigmoid(W_g [RMSNorm_g(R) ; S]) of every global slot
at every gated update (every chunk after the first), captured from the model's
GlobalMemoryNet while `read` streams a filler haystack: (1) with the needle in the
first chunk — which slots stay closed (g ~ 1, the first chunk kept for ever); (2)
with the needle mid-haystack — which slots, closed on the filler before it, open at
the needle's chunk, and how much of what they wrote they keep afterwards.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys

import torch

from comet_ext import CometForCausalLM
from comet_ext.data import byte_tokenizer
from comet_ext.passkey import DEFAULT_MODEL, NEEDLE, build_haystack, make_key


def capture_gates(model) -> dict[int, list[torch.Tensor]]:
    """Wraps every layer's GlobalMemoryNet.forward to record its gates (B, G) per update
    (after the model's gate snap)."""
    gates: dict[int, list[torch.Tensor]] = {}
    for l, layer_memory in enumerate(model.memory_layers):
        net = layer_memory.global_memory_net
        forward = net.forward

        def record(readout, state, gate_snap=1.0, *, net=net, forward=forward, l=l):
            if state is not None:  # the gate as the update uses it: snapped to 1 above gate_snap
                g = torch.sigmoid(net.gate_logit(readout, state))
                gates.setdefault(l, []).append(torch.where(g > gate_snap, 1.0, g))
            return forward(readout, state, gate_snap)

        net.forward = record
    return gates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = byte_tokenizer()
    model = CometForCausalLM.from_pretrained(args.model).eval()
    gates = capture_gates(model)
    n = model.comet_config.chunk_size * args.chunks
    key = make_key(random.Random(0))

    def read(depth: float) -> tuple[dict[int, torch.Tensor], int]:
        gates.clear()
        hay, _ = build_haystack(tok, n, depth, key)
        needle_ids = tok(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        needle = next(i for i in range(n) if hay[i:i + len(needle_ids)] == needle_ids)
        model.read(torch.tensor([hay]), progress=False)
        # update u (0-based) is the gated update of chunk u + 1
        return {l: torch.stack(g)[:, 0] for l, g in gates.items()}, needle // model.comet_config.chunk_size - 1

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    lines = ["# Global-memory gates of the passkey model", "", f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {machine()}", f"- commit: {commit()}", f"- model: {os.path.relpath(args.model)}",
             f"- command: `python bench/passkey_gates.py {' '.join(sys.argv[1:])}`",
             f"- haystack: {args.chunks} chunks ({n} tokens); g per slot, one scalar per slot and update", "",
             "## Needle in the first chunk", "",
             "| layer | mean g | slots with g > 0.999 at every update | their product of g over all updates |",
             "|---|---|---|---|"]
    first, _ = read(0.0)
    for l, g in first.items():
        closed = (g > 0.999).all(0).nonzero().flatten().tolist()
        keep = [f"{float(g[:, s].prod()):.3f}" for s in closed]
        lines.append(f"| {l} | {float(g.mean()):.3f} | {closed} | {keep} |")
    middle, u = read(0.5)
    lines += ["", f"## Needle mid-haystack (its chunk: gated update {u})", "",
              "| layer | slots closed before (g > 0.9 over the 4 updates before) and open at the needle (g < 0.5) "
              "| g at the needle | product of g over the updates after it |", "|---|---|---|---|"]
    for l, g in middle.items():
        opened = ((g[u - 5:u - 1].mean(0) > 0.9) & (g[u] < 0.5)).nonzero().flatten().tolist()
        at = [f"{float(g[u, s]):.3f}" for s in opened]
        keep = [f"{float(g[u + 1:, s].prod()):.3f}" for s in opened]
        lines.append(f"| {l} | {opened} | {at} | {keep} |")
    lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
