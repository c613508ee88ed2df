"""How a passkey sweep's wrong answers miss: per haystack length, how many answers are
right, one digit off, the right digits in another order, sharing at least three of the
key's digits, or none of that; and how often the key is found by where the needle lies
against the model's chunks — from the sweep's JSON and the model's config, no model run.

    python bench/passkey_misses.py bench/results/passkey/passkey_sweep.json [--model PATH] [--offsets MD]

With --offsets (a `bench/passkey_layouts.py --offsets` table of the same model), each sweep
cell's exact match is set beside the probe's at the same offset of the needle in its chunk:
where they agree, the cell's length did not matter, only where in a chunk the key was written.

A memory that held nothing would answer at random: about 20% of random 5-digit answers
share three or more digits with the key and about 80% fall under "other". Answers that
keep most of the key's digits say the memory carries the key, but not precisely.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

from comet_ext.passkey import DEFAULT_MODEL, NEEDLE, needle_start

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


PLACES = ("within one chunk", "split across two chunks", "in the chunk before the question")


def place(tokenizer, chunk_size: int, run: dict) -> str:
    """Where the run's needle lies against the chunks the model read its haystack in."""
    start = needle_start(tokenizer, run["length"], run["depth"], run["expected"])
    end = start + len(tokenizer(NEEDLE.format(key=run["expected"]), add_special_tokens=False)["input_ids"]) - 1
    if end // chunk_size == (run["length"] - 1) // chunk_size:
        return PLACES[2]
    return PLACES[0] if start // chunk_size == end // chunk_size else PLACES[1]


def place_table(sweep: dict, tokenizer, chunk_size: int) -> list[str]:
    """Exact match per length by where the needle lies (right / all runs in each place)."""
    counts: dict[int, dict[str, list[int]]] = collections.defaultdict(lambda: {p: [0, 0] for p in PLACES})
    for cell in sweep["cells"]:
        for run in cell["runs"]:
            tally = counts[cell["length"]][place(tokenizer, chunk_size, run)]
            tally[0] += run["correct"]
            tally[1] += 1
    lines = ["| haystack tokens | " + " | ".join(PLACES) + " |", "|---|" + "---|" * len(PLACES)]
    for length in sorted(counts):
        lines.append(f"| {length} | " + " | ".join(
            f"{100 * r / n:.0f}% of {n}" if n else "—" for r, n in counts[length].values()) + " |")
    return lines


def read_offsets(path: str) -> dict[int, tuple[int, int]]:
    """offset -> (exact, keys) of a passkey_layouts --offsets markdown table."""
    rows = {}
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[0].isdigit() and "/" in cells[1]:
                exact, keys = cells[1].split("/")
                rows[int(cells[0])] = (int(exact), int(keys))
    return rows


def offset_table(sweep: dict, tokenizer, chunk_size: int, probe: dict[int, tuple[int, int]]) -> list[str]:
    """Per sweep cell: its exact match beside the probe's at the offset of the needle in its chunk
    (the probe's offsets missing from the table are skipped); then the mean gap between the two."""
    lines = ["| haystack tokens | depth | needle offset | sweep | probe |", "|---|---|---|---|---|"]
    diffs = []
    for cell in sorted(sweep["cells"], key=lambda c: (c["length"], c["depth"])):
        run = cell["runs"][0]
        offset = needle_start(tokenizer, run["length"], run["depth"], run["expected"]) % chunk_size
        if offset not in probe:
            continue
        right, n = sum(r["correct"] for r in cell["runs"]), len(cell["runs"])
        diffs.append(abs(right / n - probe[offset][0] / probe[offset][1]))
        lines.append(f"| {cell['length']} | {cell['depth']} | {offset} | {right}/{n} | {probe[offset][0]}/{probe[offset][1]} |")
    if diffs:
        lines += ["", f"{len(diffs)} cells; mean |sweep - probe| {sum(diffs) / len(diffs):.3f}, "
                      f"at most {max(diffs):.2f}."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="passkey_sweep.json of comet-passkey --sweep")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="the swept model's folder: its tokenizer and chunk size place the needles")
    ap.add_argument("--offsets", help="a bench/passkey_layouts.py --offsets table of the same model")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    with open(args.sweep) as f:
        sweep = json.load(f)
    with open(os.path.join(args.model, "config.json")) as f:
        chunk_size = json.load(f)["comet"]["chunk_size"]
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    print("\n".join(table(sweep)))
    print()
    print(f"Exact match by where the needle lies against the {chunk_size}-token chunks:")
    print()
    print("\n".join(place_table(sweep, tokenizer, chunk_size)))
    if args.offsets:
        print()
        print("Exact match of each sweep cell and of the offset probe at the needle's offset in its chunk:")
        print()
        print("\n".join(offset_table(sweep, tokenizer, chunk_size, read_offsets(args.offsets))))


if __name__ == "__main__":
    main()
