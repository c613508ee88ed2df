"""Does a passkey model's answer depend on the haystack's layout? Chunk grid and filler phase.

    python bench/passkey_layouts.py --model RUN --chunks 8 --out OUT.md              # first chunk's length
    python bench/passkey_layouts.py --model RUN --chunks 8 --phases 0 4 8 --out OUT.md  # filler phase
    python bench/passkey_layouts.py --model RUN --chunks 8 --offsets $(seq 0 127) --out OUT.md  # needle's offset

Haystacks of `--chunks` chunks, the needle at `--depth` (default: at the start of the
first chunk), one per key (seeds 0..samples-1), the question starting a chunk of its own so
that the key can come only from the memory. A row varies one thing:
- `--firsts L...`: the first chunk holds L tokens, the others chunk_size each;
- `--phases P...`: every chunk holds chunk_size tokens, the needle at the start and the
  filler after it starting P tokens into its passage (comet-passkey's haystacks, and the
  training batches, always restart the passage after the needle: phase 0);
- `--offsets O...`: every chunk holds chunk_size tokens, the needle starts O tokens into chunk
  `--needle-chunk` between two filler passages, as in comet-passkey's haystacks (whose
  cells differ mostly by this offset: a sweep's depths and lengths sample a few of them).
For each row, the exact match and the share of right digits of the answer predicted with the
true digits before it (teacher forcing: the training forward with these chunk sizes, which
the tests hold equal to streaming). A model whose reading does not depend on the layout
scores the same in every row; the shipped model does not (bench/results/passkey_runs/README.md,
"Runs 22-25").
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
from comet_ext.atomic import atomic_write, write_text
from comet_ext.passkey import DEFAULT_MODEL, FILLER, NEEDLE, QUESTION, _encode, build_haystack, make_key, phased_haystack
from comet_ext.planner import fixed


def layout_batch(tok, chunk_size: int, chunks: int, depth: float, samples: int, first: int = 0,
                 phase: int = 0, needle_at: int = -1) -> tuple[torch.Tensor, list[int], list[int]]:
    """Haystack + question + answer per key (seeds 0..samples-1): a first chunk of `first` tokens
    (0: chunk_size) and `chunks - 1` full ones, or the filler after a needle at the start beginning
    `phase` tokens into its passage, or (needle_at >= 0) the needle's first token at haystack index
    `needle_at` with whole passages before it. -> ids (samples, T), each answer's first digit,
    chunk sizes (the question starts a chunk of its own)."""
    first = first or chunk_size
    question = _encode(tok, QUESTION)
    ids, answer_pos = [], []
    for seed in range(samples):
        key = make_key(random.Random(seed))
        length = first + chunk_size * (chunks - 1)
        if needle_at >= 0:
            hay = needle_at_haystack(tok, length, needle_at, key)
        elif phase:
            hay = phased_haystack(tok, length, 0.0, key, phase)
        else:
            hay, _ = build_haystack(tok, length, depth, key)
        ids.append(hay + question + _encode(tok, f" {key}."))
        answer_pos.append(len(hay) + len(question) + 1)  # after the answer's space
    ids = torch.tensor(ids)
    return ids, answer_pos, [first] + fixed(ids.shape[1] - first, chunk_size)


def needle_at_haystack(tok, length: int, at: int, key: str) -> list[int]:
    """`length` tokens: filler whose passages end at token `at`, where the needle starts, and
    resume after it."""
    filler, needle = _encode(tok, FILLER), _encode(tok, NEEDLE.format(key=key))
    if not 0 <= at <= length - len(needle):
        raise ValueError(f"needle_at_haystack: at must lie in 0..{length - len(needle)}, got {at}")
    passages = -(-at // len(filler))  # enough whole passages to end exactly at `at`
    before = (filler * passages)[passages * len(filler) - at:]
    rest = length - at - len(needle)
    after = (filler * -(-rest // len(filler)))[:rest]
    return before + needle + after


@torch.no_grad()
def predict(model, ids: torch.Tensor, answer_pos: list[int], sizes: list[int]) -> torch.Tensor:
    """The answer's 5 digits as predicted teacher-forced (samples, 5): the training forward with
    these chunk sizes, which the tests hold equal to streaming."""
    logits = model(ids, chunk_sizes=sizes).logits
    return torch.stack([logits[b, p - 1:p + 4].argmax(-1) for b, p in enumerate(answer_pos)])


def score(model, tok, chunks: int, depth: float, samples: int, first: int = 0, phase: int = 0,
          needle_at: int = -1) -> tuple[int, float]:
    """(keys answered exactly, mean share of right digits) of layout_batch(...)."""
    ids, answer_pos, sizes = layout_batch(tok, model.comet_config.chunk_size, chunks, depth, samples, first, phase,
                                          needle_at)
    right = predict(model, ids, answer_pos, sizes) == torch.stack([ids[b, p:p + 5] for b, p in enumerate(answer_pos)])
    return int(right.all(-1).sum()), right.float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--chunks", type=int, default=8, help="chunks of the haystack (the question starts one more)")
    ap.add_argument("--depth", type=float, default=0.0, help="the needle's depth (0: in the first chunk)")
    rows = ap.add_mutually_exclusive_group()
    rows.add_argument("--firsts", type=int, nargs="+", help="lengths of the first chunk to try (each in 1..chunk_size; "
                      "default 128 127 126 124 120 112 100)")
    rows.add_argument("--phases", type=int, nargs="+", help="filler phases after a needle at the start (tokens into "
                      "the passage, each in 0..its length - 1)")
    rows.add_argument("--offsets", type=int, nargs="+", help="the needle's first token this many tokens into chunk "
                      "--needle-chunk (each in 0..chunk_size - 1, the needle within the haystack)")
    ap.add_argument("--needle-chunk", type=int, default=1, help="with --offsets: the needle's chunk (0: the first)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="markdown table (written atomically)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = CometForCausalLM.from_pretrained(args.model).eval()
    cs = model.comet_config.chunk_size
    tok = byte_tokenizer()
    period = len(_encode(tok, FILLER))
    if args.phases:
        what, values, allowed = "phase", args.phases, range(period)
    elif args.offsets:
        if not 0 <= args.needle_chunk < args.chunks:
            ap.error(f"--needle-chunk must lie in 0..--chunks - 1 ({args.chunks - 1}), got {args.needle_chunk}")
        what, values, allowed = "offset", args.offsets, range(cs)
        room = args.chunks * cs - len(_encode(tok, NEEDLE.format(key="00000"))) - args.needle_chunk * cs
        if max(values) > room:
            ap.error(f"--offsets: a needle starting {max(values)} tokens into chunk {args.needle_chunk} runs past "
                     f"the {args.chunks}-chunk haystack (at most {room}); give more --chunks")
    else:
        what, values, allowed = "first", args.firsts or [128, 127, 126, 124, 120, 112, 100], range(1, cs + 1)
    bad = [v for v in values if v not in allowed]
    if bad:
        ap.error(f"--{what}s: every value must lie in {allowed.start}..{allowed.stop - 1}, got {bad}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    title = {"phase": "the filler phase after the needle", "first": "the first chunk's length",
             "offset": f"the needle's offset in chunk {args.needle_chunk}"}[what]
    where = f"in chunk {args.needle_chunk}" if what == "offset" else f"at depth {0.0 if args.phases else args.depth}"
    what_row = {"phase": "filler phase", "first": "first chunk", "offset": "needle offset"}[what]
    lines = [f"# Passkey answers by {title}", "", f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {machine()}", f"- commit: {commit()}",
             f"- model: {os.path.relpath(args.model)}", f"- command: `python bench/passkey_layouts.py {' '.join(sys.argv[1:])}`",
             f"- haystack: {args.chunks} chunks, the needle {where}, the question "
             f"starting a chunk; {args.samples} keys a row; the answer predicted teacher-forced", "",
             f"| {what_row} | exact | digits right |", "|---|---|---|"]
    total = 0
    for value in values:
        kwargs = {"needle_at": args.needle_chunk * cs + value} if what == "offset" else {what: value}
        exact, digits = score(model, tok, args.chunks, args.depth, args.samples, **kwargs)
        lines.append(f"| {value} | {exact}/{args.samples} | {digits:.2f} |")
        print(lines[-1], flush=True)
        total += exact
    lines += ["", f"All rows: {total}/{args.samples * len(values)} keys exact ({total / (args.samples * len(values)):.1%})."]
    print(lines[-1], flush=True)
    atomic_write(args.out, lambda path: write_text(path, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
