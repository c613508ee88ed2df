"""The main job at growing lengths: the shipped passkey model reads haystacks of 16k
to 1M tokens through the user's own command (`python -m comet_ext.passkey --json`),
one fresh process per length; read time per token and peak RSS against length, and
whether the key came back.

    python bench/bench_passkey_long.py --out bench/results/passkey_long

Issue target (this CPU): at 1M tokens peak RSS within 1.05x of the 16k run and time
per token within 1.15x. The needle sits in the first chunk by default (--depth 0), the
hardest place: at 1M tokens it must survive one gated update per chunk (8192 of them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

from comet_ext.atomic import atomic_write, write_json, write_text


def passkey_run(length: int, depth: float, seed: int, model: str | None) -> dict:
    cmd = [sys.executable, "-m", "comet_ext.passkey", "--length", str(length), "--depth", str(depth),
           "--seed", str(seed), "--json"] + (["--model", model] if model else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    ap.add_argument("--depth", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: the shipped model)")
    ap.add_argument("--out", required=True, help="folder: writes README.md and runs.json")
    args = ap.parse_args()
    rows = []
    for length in args.lengths:
        rows.append(passkey_run(length, args.depth, args.seed, args.model))
        print(rows[-1], flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    first = rows[0]
    us = [1e6 / r["tokens_per_s"] for r in rows]
    lines = ["# Passkey at growing lengths: the shipped model through `comet-passkey --json`", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()}", f"- commit: {commit()}",
             f"- command: `python bench/bench_passkey_long.py --lengths {' '.join(map(str, args.lengths))} "
             f"--depth {args.depth} --seed {args.seed}{' --model ' + args.model if args.model else ''} "
             f"--out {args.out}`",
             "- one process per length; time per token is the read's (the haystack streamed into the memory), "
             "peak RSS the whole process's (model, haystack, libraries)", "",
             "| tokens | expected | found | read (s) | us / token | x of first | peak RSS (MB) | x of first |",
             "|---|---|---|---|---|---|---|---|"]
    for r, u in zip(rows, us):
        lines.append(f"| {r['length']} | {r['expected']} | {r['found']} | {r['length'] / r['tokens_per_s']:.1f} | "
                     f"{u:.1f} | {u / us[0]:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / first['peak_rss_mb']:.3f} |")
    last = rows[-1]
    lines += ["", f"- {first['length']} -> {last['length']} tokens: time per token {us[-1] / us[0]:.2f}x "
              f"(target <= 1.15x), peak RSS {last['peak_rss_mb'] / first['peak_rss_mb']:.3f}x (target <= 1.05x)", ""]
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "runs.json"), lambda p: write_json(p, rows))
    atomic_write(os.path.join(args.out, "README.md"), lambda p: write_text(p, "\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
