"""Streaming a long input through a tiny CoMeT model on this CPU: time per token
and peak memory against input length, and the fast formulation against the
naive reference-structure oracle.

    python bench/bench_stream.py --lengths 16384 65536 262144 --out bench/results/stream_cpu.md

Each length runs in a fresh process (peak RSS is per process). The model is a
tiny random Qwen3 (hidden 256, 2 layers, 4 query and 2 kv heads of dim 64) with CoMeT at the reference defaults
(chunk 2048, 512 global slots, FIFO 2048, stride 8).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from child import run_child  # bench/child.py

CHILD = r"""
import json, sys, time, torch
from comet_ext import CometConfig, CometForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM
torch.manual_seed(0)
T = int(sys.argv[1])
cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
model = CometForCausalLM.from_base(Qwen3ForCausalLM(cfg).eval(), CometConfig()).eval()
ids = torch.randint(0, 256, (1, T))
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
model.read(ids[:, :64], progress=False)  # warm-up outside the measurement
start = time.perf_counter()
memory = model.read(ids, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"tokens": T, "seconds": seconds, "us_per_token": seconds / T * 1e6,
                  "peak_rss_mb": rss("VmHWM:"), "memory_mb": memory.nbytes() / 2**20}))
"""


def stream(length: int) -> dict:
    res = run_child(CHILD, str(length), check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def fast_vs_naive(hidden: int = 256, head_dim: int = 64, short: int = 10, long: int = 12) -> dict:
    """Marginal cost of one chunk once the memory is full (FIFO full after 8 chunks):
    (time of `long` chunks - time of `short` chunks) / (long - short), for the fast
    training forward and the naive oracle on the same tokens; and their output difference."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from comet_ext import CometConfig, CometForCausalLM
    from comet_ext.reference import naive_comet_forward

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    model = CometForCausalLM.from_base(Qwen3ForCausalLM(cfg).eval(), CometConfig()).eval()
    ids = torch.randint(0, 256, (1, long * 2048))
    times = {}
    with torch.no_grad():
        model(ids[:, :2048])  # warm-up
        for name, fn in (("fast", lambda x, s: model(x, chunk_sizes=s).logits),
                         ("naive", lambda x, s: naive_comet_forward(model, x, s))):
            for n in (short, long):
                start = time.perf_counter()
                out = fn(ids[:, : n * 2048], [2048] * n)
                times[name, n] = time.perf_counter() - start
                if n == long:
                    times[name, "out"] = out
    per_chunk = {k: (times[k, long] - times[k, short]) / (long - short) for k in ("fast", "naive")}
    return {"model": f"hidden {hidden}, head dim {head_dim}", "chunks": f"{short + 1}-{long}", "fast_s_per_chunk": per_chunk["fast"],
            "naive_s_per_chunk": per_chunk["naive"], "speedup": per_chunk["naive"] / per_chunk["fast"],
            "max_abs_logit_diff": float((times["fast", "out"] - times["naive", "out"]).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--out", required=True, help="markdown file to write (a .json beside it)")
    args = ap.parse_args()
    rows = []
    for n in args.lengths:
        rows.append(stream(n))
        print(rows[-1], flush=True)
    oracles = [fast_vs_naive(256, 64), fast_vs_naive(128, 32)]
    print(oracles, flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    base = rows[0]
    lines = ["# Streaming a long input (tiny Qwen3, CoMeT reference defaults, CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()}", f"- commit: {commit()}",
             f"- command: `python bench/bench_stream.py --lengths {' '.join(map(str, args.lengths))} --out {args.out}`",
             "", "| tokens | seconds | us / token | x of first | peak RSS (MB) | x of first | memory state (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['seconds']:.1f} | {r['us_per_token']:.1f} | "
                     f"{r['us_per_token'] / base['us_per_token']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:.3f} | {r['memory_mb']:.1f} |")
    lines += ["", "The FIFO fills during the first 8 chunks (16k tokens), so the first row reads with less "
              "memory per chunk than the steady state.", "",
              "## Fast formulation vs the naive reference-structure oracle", "",
              "Marginal time per chunk once the memory is full (chunks 11-12 of 2048 tokens), training-mode "
              "forward vs comet_ext.reference.naive_comet_forward (HF layers, sdpa), same tokens:", ""]
    for o in oracles:
        lines.append(f"- {o['model']}: fast {o['fast_s_per_chunk']:.2f} s, naive {o['naive_s_per_chunk']:.2f} s: "
                     f"**{o['speedup']:.2f}x**; max |logit difference| {o['max_abs_logit_diff']:.1e}")
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"stream": rows, "fast_vs_naive": oracles}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
