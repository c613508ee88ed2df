"""Where the passkey question goes when the haystack does not end on a chunk boundary.

    python bench/passkey_question_chunk.py --bases 1024 4096 --tails 0 40 80 88 104 120 127 --seeds 8 \
        --out bench/results/passkey/question_chunk.md

A haystack of `base + tail` tokens leaves `tail` tokens in its open chunk. The question and the
answer ("What is the pass key? The pass key is" + " NNNNN.", about 44 tokens here) then either
continue that chunk (`open`: what `comet-passkey` did before), which puts them across a chunk
boundary once the tail passes chunk_size minus their length, or start a chunk of their own
after the haystack's chunk is closed (`closed`). `run_batch` now closes exactly where they
would not fit (`comet_ext.passkey.run_batch`); this measures both layouts at every tail, for
keys at depth --depth, read as one batch per cell.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import subprocess

import torch

from comet_ext.atomic import atomic_write, write_text
from comet_ext.passkey import DEFAULT_MODEL, answer_number, build_haystack, load, make_key


@torch.no_grad()
def found(model, tok, length: int, depth: float, seeds: list[int], close: bool) -> int:
    """Keys found among `seeds`' haystacks, the question continuing the haystack's open chunk
    (close=False) or starting its own after it is closed."""
    keys = [make_key(random.Random(seed)) for seed in seeds]
    rows = [build_haystack(tok, length, depth, key) for key in keys]
    question = rows[0][1]
    memory = model.read(torch.tensor([hay for hay, _ in rows]), progress=False)
    if close:
        memory = model.read(torch.zeros(len(keys), 0, dtype=torch.long), memory, end_chunk=True)
    out = model.generate(torch.tensor([question] * len(keys)), memory=memory, max_new_tokens=8, do_sample=False)
    return sum(answer_number(tok.decode(row)) == key for row, key in zip(out[:, len(question):].tolist(), keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--bases", type=int, nargs="+", default=[1024, 4096], help="whole-chunk haystack lengths")
    ap.add_argument("--tails", type=int, nargs="+", default=[0, 40, 80, 88, 104, 120, 127])
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", default="question_chunk.md")
    args = ap.parse_args()
    model, tok = load(args.model)
    cs = model.comet_config.chunk_size
    if any(b % cs for b in args.bases) or any(not 0 <= t < cs for t in args.tails):
        ap.error(f"--bases must be multiples of the chunk size {cs}, --tails in [0, {cs})")
    seeds = list(range(args.seeds))
    qa = len(build_haystack(tok, args.bases[0], 0.0, "00000")[1]) + len(tok(" 00000.", add_special_tokens=False)["input_ids"])
    lines = ["# The passkey question in the haystack's open chunk, or in one of its own\n",
             f"`python bench/passkey_question_chunk.py --bases {' '.join(map(str, args.bases))} --tails "
             f"{' '.join(map(str, args.tails))} --depth {args.depth} --seeds {args.seeds}` "
             f"({subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}, "
             f"{datetime.date.today()}, {platform.machine()} CPU x {os.cpu_count()}, torch {torch.__version__}). Model: `{os.path.relpath(args.model)}` (chunks of {cs}); question + answer: {qa} tokens, "
             f"so they cross a boundary in the open chunk once the tail passes {cs - qa}. Keys found of {args.seeds}, "
             f"depth {args.depth}.\n",
             "| length | tail | across a boundary | open chunk | own chunk |", "|---|---|---|---|---|"]
    for base in args.bases:
        for tail in args.tails:
            n = base + tail
            a, b = (found(model, tok, n, args.depth, seeds, close) for close in (False, True))
            lines.append(f"| {n} | {tail} | {'yes' if tail + qa > cs else 'no'} | {a} | {b} |")
            print(lines[-1], flush=True)
    atomic_write(args.out, lambda p: write_text(p, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
