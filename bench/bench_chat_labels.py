"""Labelling chat data: one rendering of the whole conversation (what `chat_sample` does with a
fast tokenizer) against rendering it again for every turn (the turn-by-turn fallback), on
conversations of growing length, with the offline byte tokenizer and ChatML.

    python bench/bench_chat_labels.py --out bench/results/chat_labels_cpu.md

Both paths must give the same sample (checked on every conversation timed); the table gives the
seconds of each and their ratio. Turn by turn grows with turns x tokens, one rendering with tokens.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time

from comet_ext.data import _turn_by_turn_sample, _whole_chat_sample, byte_tokenizer


def conversation(turns: int, chars: int, seed: int = 0) -> list[dict]:
    """`turns` alternating user / assistant messages of `chars` random characters each."""
    g = random.Random(seed)
    return [{"role": ("user", "assistant")[i % 2], "content": "".join(g.choice("abcdefgh ") for _ in range(chars))}
            for i in range(turns)]


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["10x2000", "40x2000", "100x1000", "200x1000"],
                    help="TURNSxCHARS per conversation")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path; the best is kept")
    ap.add_argument("--out", required=True, help="markdown file to write")
    args = ap.parse_args()
    tok = byte_tokenizer()
    _whole_chat_sample(conversation(2, 10), tok)  # compiles the template once, outside the timings
    rows = []
    for shape in args.shapes:
        turns, chars = map(int, shape.split("x"))
        chat = conversation(turns, chars)
        t_turns, by_turn = best_of(lambda: _turn_by_turn_sample(chat, tok), args.repeats)
        t_whole, whole = best_of(lambda: _whole_chat_sample(chat, tok), args.repeats)
        if whole != by_turn:
            raise SystemExit(f"bench_chat_labels: the two paths disagree on {shape}")
        rows.append((turns, chars, len(whole), t_turns, t_whole))
        print(rows[-1], flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    lines = ["# Labelling chat data: one rendering vs turn by turn (byte tokenizer, ChatML)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()}", f"- commit: {commit()}",
             f"- command: `python bench/bench_chat_labels.py --shapes {' '.join(args.shapes)} "
             f"--repeats {args.repeats} --out {args.out}`", "",
             "| turns | characters per turn | tokens | turn by turn (s) | one rendering (s) | speed-up |",
             "|---|---|---|---|---|---|"]
    for turns, chars, n, a, b in rows:
        lines.append(f"| {turns} | {chars} | {n} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")
    lines += ["", "Same sample from both paths on every conversation (checked). Best of "
              f"{args.repeats} runs each."]
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
