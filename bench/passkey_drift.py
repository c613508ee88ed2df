"""Which layer's global memory loses a key that a passkey model kept for many chunks.

    python bench/passkey_drift.py --seeds 7 --length 16384 --out bench/results/passkey/drift_16k.md

For each seed's key, a haystack of --length tokens with the needle in its first chunk
is read twice over: up to --early chunks (a length the model was trained on) and on
to the end. The answer is then teacher-forced from the late memory — as it is, and with
one layer's global memory (its state S and its rows' keys / values) put back to what
it was after --early chunks, everything else (the other layers, every FIFO) late.
A layer whose early memory alone brings the key back is the one whose slots drifted.
Beside it, per layer, how far S has moved from its early self: the mean over slots of
|S_t - S_early| / |S_early| at a few chunks t.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys

import torch

from comet_ext.atomic import atomic_write, write_text
from comet_ext.passkey import DEFAULT_MODEL, _encode, build_haystack, load, make_key


@torch.no_grad()
def digit_probs(model, tok, question: list[int], memory, key: str) -> tuple[list[float], str]:
    """(probability of each right digit, the argmax answer), the key teacher-forced after
    the question, which starts a chunk of its own after `memory`."""
    ids = torch.tensor([question + _encode(tok, " " + key)])
    logp = model(ids, memory=memory).logits[0].float().log_softmax(-1)
    first = len(question) + 1  # the key's first digit, after the answer's space
    digits = _encode(tok, key)
    probs = [float(logp[first - 1 + i, d].exp()) for i, d in enumerate(digits)]
    return probs, tok.decode(logp[first - 1:first - 1 + len(digits)].argmax(-1).tolist())


def with_layer_from(late, early, layer: int, num_global: int):
    """A copy of `late` whose layer `layer` has the global memory of `early` (state and the
    global rows' keys / values, which kv_k / kv_v hold at rows 0..num_global-1)."""
    mixed = late.clone()
    mixed.state[layer] = early.state[layer]
    mixed.kv_k[layer, :, :num_global] = early.kv_k[layer, :, :num_global]
    mixed.kv_v[layer, :, :num_global] = early.kv_v[layer, :, :num_global]
    return mixed


@torch.no_grad()
def probe(model, tok, key: str, length: int, early: int, marks: list[int]) -> tuple[list[list[str]], list[str]]:
    """(answer-table rows, drift-table rows) for one key."""
    cc = model.comet_config
    if length % cc.chunk_size or not 0 < early < length // cc.chunk_size:
        raise ValueError(f"--length must be a whole number of chunks ({cc.chunk_size} tokens) longer than --early "
                         f"({early}) chunks, got {length}")
    hay, question = build_haystack(tok, length, 0.0, key)
    ids = torch.tensor([hay])
    memory, drift = None, {}
    for t in range(length // cc.chunk_size):
        memory = model.read(ids[:, t * cc.chunk_size:(t + 1) * cc.chunk_size], memory=memory, progress=False)
        if t + 1 == early:
            early_memory = memory.clone()
        if t + 1 in marks:
            s, s0 = memory.state[:, 0].float(), early_memory.state[:, 0].float()  # (L, G, d)
            drift[t + 1] = ((s - s0).norm(dim=-1) / s0.norm(dim=-1).clamp_min(1e-12)).mean(-1)
    answers = []

    def row(what: str, mem) -> None:
        probs, found = digit_probs(model, tok, question, mem, key)
        answers.append([key, what, " ".join(f"{p:.2f}" for p in probs), found, "yes" if found == key else "no"])

    row(f"memory after {early} chunks", early_memory)
    row(f"memory after {length // cc.chunk_size} chunks", memory)
    for layer in range(model.config.num_hidden_layers):
        row(f"after {length // cc.chunk_size}, layer {layer}'s global memory from chunk {early}",
            with_layer_from(memory, early_memory, layer, cc.num_global))
    drifts = [f"| {key} | {layer} | " + " | ".join(f"{float(drift[m][layer]):.3f}" for m in sorted(drift)) + " |"
              for layer in range(model.config.num_hidden_layers)]
    return answers, drifts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seeds", default="7", help="comma-separated seeds; each draws its key as comet-passkey does")
    ap.add_argument("--length", type=int, default=16384, help="haystack tokens (a whole number of chunks)")
    ap.add_argument("--early", type=int, default=32, help="chunks read when the early memory is kept")
    ap.add_argument("--out", required=True, help="markdown file to write")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok = load(args.model)
    chunks = args.length // model.comet_config.chunk_size
    marks = sorted({m for m in (args.early + 8, 2 * args.early, 4 * args.early, 8 * args.early, chunks)
                    if args.early < m <= chunks})

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    answers, drifts = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        a, d = probe(model, tok, make_key(random.Random(seed)), args.length, args.early, marks)
        answers += a
        drifts += d
    lines = ["# Which layer's global memory loses a far key", "", f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {machine()}", f"- commit: {commit()}", f"- model: {os.path.relpath(args.model)}",
             f"- command: `python bench/passkey_drift.py {' '.join(sys.argv[1:])}`",
             f"- haystack: {args.length} tokens ({chunks} chunks), the needle in the first chunk; the answer "
             "teacher-forced, per digit the probability of the right one", "",
             "| key | memory | p(right digit) | argmax answer | right |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in answers]
    lines += ["", f"Drift of the global state: mean over slots of |S_t - S_{args.early}| / |S_{args.early}|", "",
              "| key | layer | " + " | ".join(f"t = {m}" for m in marks) + " |",
              "|---|---|" + "---|" * len(marks)] + drifts + [""]
    atomic_write(args.out, lambda tmp: write_text(tmp, "\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
