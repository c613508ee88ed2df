"""How a passkey sweep's wrong answers miss: per haystack length, how many answers are
right, one digit off, the right digits in another order, sharing at least three of the
key's digits, or none of that — from the sweep's JSON, no model run.

    python bench/passkey_misses.py bench/results/passkey/passkey_sweep.json

A memory that held nothing would answer at random: about 20% of random 5-digit answers
share three or more digits with the key and about 80% fall under "other". Answers that
keep most of the key's digits say the memory carries the key, but not precisely.
"""
from __future__ import annotations

import argparse
import collections
import json

KINDS = ("right", "one digit off", "same digits, other order", "shares 3+ digits", "other")


def kind(expected: str, found: str) -> str:
    if found == expected:
        return "right"
    if len(found) != len(expected):
        return "other"
    if sum(a == b for a, b in zip(expected, found)) == len(expected) - 1:
        return "one digit off"
    if sorted(found) == sorted(expected):
        return "same digits, other order"
    if sum((collections.Counter(found) & collections.Counter(expected)).values()) >= 3:
        return "shares 3+ digits"
    return "other"


def table(sweep: dict) -> list[str]:
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for cell in sweep["cells"]:
        for run in cell["runs"]:
            counts[cell["length"]][kind(run["expected"], run["found"])] += 1
    lines = ["| haystack tokens | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for length in sorted(counts):
        total = sum(counts[length].values())
        lines.append(f"| {length} | " + " | ".join(f"{100 * counts[length][k] / total:.0f}%" for k in KINDS) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="passkey_sweep.json of comet-passkey --sweep")
    args = ap.parse_args()
    with open(args.sweep) as f:
        print("\n".join(table(json.load(f))))


if __name__ == "__main__":
    main()
