"""Do exactly closed gates keep the first-chunk key longer? A diagnostic.

    python bench/passkey_closed_gates.py --gate-snap 0.999 --length 262144 --keys 10

Reads haystacks with the needle at --depth (default 0: the first chunk; keys of
seeds 0..keys-1, as in `comet-passkey --sweep`, read as one batch) with the model's
CometConfig.gate_snap set to --gate-snap: every global-memory gate g > gate_snap is
used as exactly 1, so slots that are nearly closed leak nothing. If the misses of the
plain model (`--gate-snap 1`: no gate snapped) turn into hits, the small leaks of closed
slots are what loses the key; if not, they are not. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from comet_ext.passkey import DEFAULT_MODEL, load, run_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--gate-snap", type=float, default=0.999, help="gates above this are used as exactly 1")
    ap.add_argument("--length", type=int, default=262144)
    ap.add_argument("--depth", type=float, default=0.0)
    ap.add_argument("--keys", type=int, default=10)
    args = ap.parse_args()
    model, tok = load(args.model)
    model.comet_config = dataclasses.replace(model.comet_config, gate_snap=args.gate_snap)
    start = time.time()
    runs = run_batch(model, tok, args.length, args.depth, list(range(args.keys)))
    print(json.dumps({"gate_snap": args.gate_snap, "length": args.length, "depth": args.depth,
                      "correct": sum(r["correct"] for r in runs), "keys": args.keys,
                      "expected": [r["expected"] for r in runs], "found": [r["found"] for r in runs],
                      "minutes": (time.time() - start) / 60}))


if __name__ == "__main__":
    main()
