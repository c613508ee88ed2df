"""Activation memory of a training step against the number of chunks, with and
without recomputation (comet_ext.training's recompute=True checkpoints each
(layer, chunk) step).

    python bench/bench_training_memory.py --out bench/results/training_memory_cpu.md

Each (chunks, recompute) point runs in a fresh process; peak RSS growth over
the model's own footprint is the step's memory. The slope per chunk is compared
with the theoretical checkpoint size of one chunk: batch x rows x hidden x
layers x bytes (rows = text + compression + readout rows of a chunk).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, sys, torch
from comet_ext import CometConfig, CometForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM
torch.manual_seed(0)
chunks, recompute = int(sys.argv[1]), sys.argv[2] == "1"
cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
comet = CometConfig(chunk_size=256, num_global=32, temp_stride=8, temp_budget=64, rla_rank=8)
model = CometForCausalLM.from_base(Qwen3ForCausalLM(cfg), comet).train()
x = torch.randint(0, 256, (2, chunks * 256))
model(x[:, :256], labels=x[:, :256], recompute=recompute, return_logits=False).loss.backward()  # warm-up: allocator, grads
model.zero_grad(set_to_none=False)
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
seen = {}
def pack(t):  # what autograd keeps for backward, each storage once
    seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return t
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS:")
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = model(x, labels=x, recompute=recompute, return_logits=False).loss
loss.backward()
print(json.dumps({"chunks": chunks, "recompute": recompute, "peak_extra_mb": (kb("VmHWM:") - before) / 1024,
                  "saved_mb": sum(seen.values()) / 2**20}))
"""
ROWS = 256 + 32 + 32  # text + compression (256 / 8) + readout rows of a chunk
THEORY_MB = 2 * ROWS * 256 * 4 * 4 / 2**20  # batch x rows x hidden x layers x fp32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for recompute in (True, False):
        for n in args.chunks:
            res = subprocess.run([sys.executable, "-c", CHILD, str(n), "1" if recompute else "0"],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    def slope(recompute: bool, field: str) -> float:
        pts = [(r["chunks"], r[field]) for r in rows if r["recompute"] == recompute]
        return float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])

    slopes = {rc: slope(rc, "peak_extra_mb") for rc in (True, False)}
    saved = {rc: slope(rc, "saved_mb") for rc in (True, False)}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    lines = ["# Training-step activation memory against chunks (CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()}", f"- commit: {commit()}",
             f"- command: `python bench/bench_training_memory.py --out {args.out}`",
             "- model: tiny Qwen3 (hidden 256, 4 layers), batch 2, chunks of 256 tokens, 32 global slots, "
             "FIFO 64, stride 8; fp32", "",
             "| chunks | recompute: peak RSS growth (MB) | saved for backward (MB) "
             "| no recompute: peak RSS growth (MB) | saved for backward (MB) |", "|---|---|---|---|---|"]
    for n in args.chunks:
        a = next(r for r in rows if r["chunks"] == n and r["recompute"])
        b = next(r for r in rows if r["chunks"] == n and not r["recompute"])
        lines.append(f"| {n} | {a['peak_extra_mb']:.1f} | {a['saved_mb']:.1f} | {b['peak_extra_mb']:.1f} "
                     f"| {b['saved_mb']:.1f} |")
    lines += ["", f"Theoretical checkpoint size of one chunk: {THEORY_MB:.2f} MB.", "",
              f"- saved for backward, per chunk: **{saved[True]:.2f} MB with recomputation** "
              f"({saved[True] / THEORY_MB:.2f}x the theory; it also keeps each (layer, chunk) step's memory-state "
              f"inputs), {saved[False]:.2f} MB without ({saved[False] / saved[True]:.1f}x more)",
              f"- peak RSS growth per chunk: {slopes[True]:.2f} MB with recomputation "
              f"({slopes[True] / THEORY_MB:.2f}x the theory), {slopes[False]:.2f} MB without; RSS also holds "
              "backward's per-chunk gradients and what the CPU allocator does not return", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"points": rows, "rss_slope_mb_per_chunk": {"recompute": slopes[True], "plain": slopes[False]},
                   "saved_slope_mb_per_chunk": {"recompute": saved[True], "plain": saved[False]},
                   "theory_mb_per_chunk": THEORY_MB}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
