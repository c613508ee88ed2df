"""Passkey retrieval over long haystacks: the main job.

A 5-digit pass key is hidden at a given depth of a haystack of filler text; the
model reads the haystack chunk by chunk into its memory (constant memory, any
length), then answers "What is the pass key?" from the memory alone.

    python -m comet_ext.passkey --model PATH --length 1048576 --depth 0.3
    python -m comet_ext.passkey --model PATH --sweep --out results/   # heatmap PNG + JSON
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from typing import Optional, Sequence

import torch

from .training import peak_memory_mb

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
SWEEP_LENGTHS = (4096, 16384, 65536, 262144, 1048576)
SWEEP_DEPTHS = tuple(i / 10 for i in range(11))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_key(rng: random.Random) -> str:
    return f"{rng.randint(10000, 99999)}"


def build_haystack(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(haystack ids of exactly `length` tokens with the needle at `depth` in [0, 1],
    question ids). The needle starts on a filler-sentence boundary."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"build_haystack: depth must lie in [0, 1], got {depth}")
    filler, needle = _encode(tokenizer, FILLER), _encode(tokenizer, NEEDLE.format(key=key))
    if length < len(needle):
        raise ValueError(f"build_haystack: length {length} is shorter than the needle ({len(needle)} tokens)")
    n_filler = length - len(needle)
    reps = -(-n_filler // len(filler))
    hay = (filler * reps)[:n_filler]
    units = n_filler // len(filler)  # whole filler passages: the needle goes between two
    at = min(round(depth * n_filler / len(filler)), units) * len(filler)
    return hay[:at] + needle + hay[at:], _encode(tokenizer, QUESTION)


@torch.no_grad()
def run_passkey(model, tokenizer, length: int, depth: float, seed: int = 0, progress: bool = False) -> dict:
    """Reads one haystack and asks for its key. -> the JSON record of the run."""
    key = make_key(random.Random(seed))
    hay, question = build_haystack(tokenizer, length, depth, key)
    ids = torch.tensor([hay], device=model.device)
    start = time.perf_counter()
    memory = model.read(ids, progress=progress)
    read_s = time.perf_counter() - start
    out = model.generate(torch.tensor([question], device=model.device), memory=memory, max_new_tokens=8)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode(out[0, len(question):].tolist())
    match = re.search(r"\d{5}", answer)
    found = match.group(0) if match else answer.strip()
    return {"length": length, "depth": depth, "seed": seed, "expected": key, "found": found,
            "correct": found == key, "seconds": seconds, "tokens_per_s": length / read_s,
            "peak_rss_mb": peak_memory_mb(torch.device("cpu"))}


def sweep(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int, out: str,
          seed: int = 0) -> dict:
    """Accuracy over a grid of lengths x depths (`samples` keys per cell); writes
    passkey_sweep.json and passkey_heatmap.png into `out`."""
    os.makedirs(out, exist_ok=True)
    cells = []
    for length in lengths:
        for depth in depths:
            runs = [run_passkey(model, tokenizer, length, depth, seed=seed + s) for s in range(samples)]
            cells.append({"length": length, "depth": depth, "accuracy": sum(r["correct"] for r in runs) / samples,
                          "runs": runs})
            print(f"length {length:>8} depth {depth:.1f}: {cells[-1]['accuracy']:.0%}", flush=True)
    result = {"lengths": list(lengths), "depths": list(depths), "samples": samples, "cells": cells}
    with open(os.path.join(out, "passkey_sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    heatmap(result, os.path.join(out, "passkey_heatmap.png"))
    return result


def heatmap(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = result["lengths"], result["depths"]
    grid = np.zeros((len(depths), len(lengths)))
    for c in result["cells"]:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.45 * len(depths) + 1.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("haystack length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="exact match")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(path: str):
    """A CometForCausalLM checkpoint folder with its tokenizer."""
    from transformers import AutoTokenizer

    from .modeling import CometForCausalLM

    return CometForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="comet-passkey", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a CometForCausalLM folder (with its tokenizer)")
    ap.add_argument("--length", type=int, default=65536, help="haystack length in tokens")
    ap.add_argument("--depth", type=float, default=None, help="needle depth in [0, 1] (default: random)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sweep", action="store_true", help="a grid of lengths x depths, heatmap + JSON")
    ap.add_argument("--samples", type=int, default=10, help="keys per sweep cell")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(SWEEP_LENGTHS))
    ap.add_argument("--out", default="passkey_results")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.model):
        sys.exit(f"comet-passkey: no model folder at {args.model!r}")
    model, tokenizer = load(args.model)
    if args.sweep:
        sweep(model, tokenizer, args.lengths, SWEEP_DEPTHS, args.samples, args.out, args.seed)
        return
    depth = args.depth if args.depth is not None else random.Random(args.seed).random()
    record = run_passkey(model, tokenizer, args.length, depth, args.seed, progress=not args.json)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"pass key {record['expected']} at depth {depth:.0%} of {args.length} tokens: found "
              f"{record['found']} ({'correct' if record['correct'] else 'wrong'}); "
              f"{record['tokens_per_s']:.0f} tokens/s, peak RSS {record['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
