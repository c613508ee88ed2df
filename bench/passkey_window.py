"""Whether a passkey miss far into a long haystack is the length's or the needle's layout.

    python bench/passkey_window.py --length 1048576 --depth 0.6 --seeds 4 --out bench/results/passkey/window_1m.md

For each seed's key, the haystack `comet-passkey` builds at --length and --depth is cut down
to a window of whole chunks around the needle: --windows B:A keeps the B chunks before the
needle's first chunk, that chunk and the chunks after it up to A chunks from its start. The
window is read from an empty memory and the answer teacher-forced after the question, as
`passkey_drift.py` does. Being the long haystack's own chunks, the window keeps the needle's
offset in its chunk and the filler around it: a key that is lost in a window of a length the
model was trained on was never written well, however long the haystack.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys

import torch

from comet_ext.atomic import atomic_write, write_text
from comet_ext.passkey import DEFAULT_MODEL, build_haystack, load, make_key, needle_start

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from passkey_drift import digit_probs  # noqa: E402


def parse_windows(text: str) -> list[tuple[int, int]]:
    """'0:8,4:28' -> [(0, 8), (4, 28)]: (chunks before the needle's chunk, chunks from it on)."""
    try:
        windows = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        windows = []
    if not windows or any(len(w) != 2 or w[0] < 0 or w[1] < 1 for w in windows):
        raise ValueError(f"--windows must be comma-separated B:A pairs with B >= 0 and A >= 1, got {text!r}")
    return windows


def window(hay: list[int], needle_at: int, chunk_size: int, before: int, after: int) -> list[int]:
    """The haystack's chunks from `before` chunks ahead of the one holding token `needle_at`
    to `after` chunks from that one's start: (before + after) * chunk_size tokens."""
    first = needle_at // chunk_size
    if before > first or (first + after) * chunk_size > len(hay):
        raise ValueError(f"--windows: {before}:{after} runs past the haystack's {len(hay) // chunk_size} chunks "
                         f"(the needle is in chunk {first})")
    return hay[(first - before) * chunk_size:(first + after) * chunk_size]


@torch.no_grad()
def probe(model, tok, key: str, length: int, depth: float, windows: list[tuple[int, int]]) -> list[tuple]:
    """Per window: (its first chunk, its last chunk, p(right digit) per digit, argmax answer)."""
    cs = model.comet_config.chunk_size
    hay, question = build_haystack(tok, length, depth, key)
    at = needle_start(tok, length, depth, key)
    rows = []
    for before, after in windows:
        memory = model.read(torch.tensor([window(hay, at, cs, before, after)]), progress=False)
        probs, found = digit_probs(model, tok, question, memory, key)
        rows.append((at // cs - before, at // cs + after - 1, probs, found))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--length", type=int, required=True, help="haystack tokens, as comet-passkey --length")
    ap.add_argument("--depth", type=float, required=True, help="the needle's depth, as comet-passkey --depth")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; each draws its key as comet-passkey does")
    ap.add_argument("--windows", default="0:8,1:8,4:28", help="B:A pairs: B chunks before the needle's, A from it on")
    ap.add_argument("--out", required=True, help="markdown file to write")
    args = ap.parse_args()
    try:
        windows = parse_windows(args.windows)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok = load(args.model)
    from report import commit, machine

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        key = make_key(random.Random(seed))
        at = needle_start(tok, args.length, args.depth, key)
        rows += [[key, str(at % model.comet_config.chunk_size), f"{first}..{last} ({last - first + 1})",
                  " ".join(f"{p:.3f}" for p in probs), found, "yes" if found == key else "no"]
                 for first, last, probs, found in probe(model, tok, key, args.length, args.depth, windows)]
    lines = ["# A passkey miss: the length's or the layout's", "", f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {machine()}", f"- commit: {commit()}", f"- model: {os.path.relpath(args.model)}",
             f"- command: `python bench/passkey_window.py {' '.join(sys.argv[1:])}`",
             f"- windows of whole chunks cut from the {args.length}-token haystack with the needle at depth "
             f"{args.depth}, each read from an empty memory; the answer teacher-forced, per digit the "
             "probability of the right one", "",
             "| key | needle's offset in its chunk | window (chunks) | p(right digit) | argmax answer | right |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    atomic_write(args.out, lambda tmp: write_text(tmp, "\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
