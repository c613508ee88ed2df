"""Activation memory of a training step against the number of chunks, with and
without recomputation (comet_ext.training's recompute=True checkpoints each
(layer, chunk) step).

    python bench/bench_training_memory.py --out bench/results/training_memory_cpu.md

Each (chunks, recompute, measure) point runs in a fresh process. Three measures
of a step's memory: what autograd keeps for backward; the peak of live tensor
bytes (every CPU allocation and free, from torch.profiler's memory events —
what torch.cuda.max_memory_allocated is on a GPU); and the peak RSS growth over
the model's own footprint, with glibc's default malloc and with a fixed mmap
threshold (MALLOC_MMAP_THRESHOLD_, so freed tensors go back to the system). The
slope per chunk is compared with the theoretical checkpoint size of one chunk:
batch x rows x hidden x layers x bytes (rows = text + compression + readout rows).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

from child import run_child  # bench/child.py

CHILD = r"""
import json, sys, torch
from comet_ext import CometConfig, CometForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM
torch.manual_seed(0)
chunks, recompute, measure = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
comet = CometConfig(chunk_size=256, num_global=32, temp_stride=8, temp_budget=64, rla_rank=8)
model = CometForCausalLM.from_base(Qwen3ForCausalLM(cfg), comet).train()
x = torch.randint(0, 256, (2, chunks * 256))
model(x[:, :256], labels=x[:, :256], recompute=recompute, return_logits=False).loss.backward()  # warm-up: allocator, grads
model.zero_grad(set_to_none=False)
step = lambda: model(x, labels=x, recompute=recompute, return_logits=False).loss.backward()
if measure == "saved":  # what autograd keeps for backward, each storage once
    from comet_ext.training import saved_for_backward_mb
    mb = saved_for_backward_mb(lambda: model(x, labels=x, recompute=recompute, return_logits=False).loss)
elif measure == "live":  # allocations inside an op count towards it (self), in time order
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    mb = peak / 2**20
else:  # peak RSS growth
    def kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    open("/proc/self/clear_refs", "w").write("5")
    before = kb("VmRSS:")
    step()
    mb = (kb("VmHWM:") - before) / 1024
print(json.dumps({"chunks": chunks, "recompute": recompute, "measure": measure, "mb": mb}))
"""
MEASURES = {  # name -> (child measure, extra environment, column title)
    "saved": ("saved", {}, "saved for backward"),
    "live": ("live", {}, "peak live tensors"),
    "rss": ("rss", {}, "peak RSS growth"),
    "rss_mmap": ("rss", {"MALLOC_MMAP_THRESHOLD_": "131072"}, "peak RSS growth, fixed mmap threshold"),
}
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
            for name, (measure, env, _) in MEASURES.items():
                res = run_child(CHILD, str(n), "1" if recompute else "0", measure, check=True,
                                env={**os.environ, **env})
                rows.append({**json.loads(res.stdout.strip().splitlines()[-1]), "name": name})
                print(rows[-1], flush=True)

    def value(recompute: bool, n: int, name: str) -> float:
        return next(r["mb"] for r in rows if r["recompute"] == recompute and r["chunks"] == n and r["name"] == name)

    def slope(recompute: bool, name: str) -> float:
        return float(np.polyfit(args.chunks, [value(recompute, n, name) for n in args.chunks], 1)[0])

    slopes = {(rc, name): slope(rc, name) for rc in (True, False) for name in MEASURES}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    titles = [title for _, _, title in MEASURES.values()]
    lines = ["# Training-step activation memory against chunks (CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()}", f"- commit: {commit()}",
             f"- command: `python bench/bench_training_memory.py --out {args.out}`",
             "- model: tiny Qwen3 (hidden 256, 4 layers), batch 2, chunks of 256 tokens, 32 global slots, "
             "FIFO 64, stride 8; fp32", "- fixed mmap threshold: `MALLOC_MMAP_THRESHOLD_=131072` (glibc)", "",
             "All in MB.", "",
             "| chunks | " + " | ".join(f"recompute: {t}" for t in titles) + " | "
             + " | ".join(f"no recompute: {t}" for t in titles) + " |",
             "|---" * (1 + 2 * len(titles)) + "|"]
    for n in args.chunks:
        cells = [f"{value(rc, n, name):.1f}" for rc in (True, False) for name in MEASURES]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Theoretical checkpoint size of one chunk: {THEORY_MB:.2f} MB.", "",
              "Growth per chunk (slope of a least-squares line), as a multiple of the theory:", "",
              "| measure | recompute | no recompute |", "|---|---|---|"]
    for name, (_, _, title) in MEASURES.items():
        lines.append(f"| {title} | {slopes[(True, name)]:.2f} MB = **{slopes[(True, name)] / THEORY_MB:.2f}x** "
                     f"| {slopes[(False, name)]:.2f} MB = {slopes[(False, name)] / THEORY_MB:.2f}x |")
    lines += ["", "With recomputation a step keeps per chunk each layer's input rows, the global state and the "
              "chunk's FIFO piece (comet_ext/train_memory.py); the live-tensor peak adds the gradients backward holds "
              "at once. glibc's default malloc keeps freed blocks, so RSS grows faster than the live tensors unless "
              "the mmap threshold is fixed.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"points": rows, "theory_mb_per_chunk": THEORY_MB,
                   "slope_mb_per_chunk": {f"{'recompute' if rc else 'plain'}/{name}": v
                                          for (rc, name), v in slopes.items()}}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
