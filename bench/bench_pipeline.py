"""Tokens/s of the layer-level pipeline on 1, 2 and 4 gloo ranks for the same
global work (one sequence of 16 chunks per step), on this machine.

    python bench/bench_pipeline.py --out bench/results/pipeline_cpu.md

Every rank uses one intra-op thread, so N ranks use N cores; on a machine with
fewer cores than ranks the ranks share them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, CHUNK, CHUNKS = 3, 256, 16


def _model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from comet_ext import CometConfig, CometForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    comet = CometConfig(chunk_size=CHUNK, num_global=32, temp_stride=8, temp_budget=128, rla_rank=8)
    return CometForCausalLM.from_base(Qwen3ForCausalLM(cfg), comet).train()


def _worker(rank: int, world: int, store: str, out: str) -> None:
    from comet_ext.parallel import all_reduce_grads, pipeline_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = _model()
    ids = torch.randint(0, 256, (1, CHUNK * CHUNKS), generator=torch.Generator().manual_seed(1))
    sizes = [CHUNK] * CHUNKS

    def step():
        model.zero_grad(set_to_none=True)
        if world == 1:
            model(ids, labels=ids, chunk_sizes=sizes, recompute=True).loss.backward()
        else:
            pipeline_loss(model, ids, ids, sizes, recompute=True).backward()
            all_reduce_grads(model)

    step()  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": world, "tokens_per_s": STEPS * ids.numel() / seconds}, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), out), nprocs=world, join=True)
            with open(out) as f:
                rows.append(json.load(f))
        print(rows[-1], flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    base = rows[0]["tokens_per_s"]
    lines = ["# Layer-level pipeline: training tokens/s against ranks (gloo, CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()} ({os.cpu_count()} cores)",
             f"- commit: {commit()}", f"- command: `python bench/bench_pipeline.py --out {args.out}`",
             f"- work per step: one sequence of {CHUNKS} chunks x {CHUNK} tokens, tiny Qwen3 (hidden 256, "
             "8 layers), recomputation on, one intra-op thread per rank", "",
             "| ranks | tokens/s | x of 1 rank |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} |")
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
