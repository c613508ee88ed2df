"""Passkey retrieval over long haystacks: the main job.

A 5-digit pass key is hidden at a given depth of a haystack of filler text; the
model reads the haystack chunk by chunk into its memory (constant memory, any
length), then answers "What is the pass key?" from the memory alone.

    python -m comet_ext.passkey --model PATH --length 1048576 --depth 0.3
    python -m comet_ext.passkey --model PATH --sweep --out results/   # heatmap PNG + JSON
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import numbers
import os
import random
import re
import sys
import time
from typing import Optional, Sequence

import torch

from .atomic import atomic_write, write_json
from .training import peak_memory_mb

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
SWEEP_LENGTHS = (4096, 16384, 65536, 262144, 1048576)
SWEEP_DEPTHS = tuple(i / 10 for i in range(11))
# The shipped model (examples/train_passkey.py; its log, command and seed lie beside it).
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "passkey")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_key(rng: random.Random) -> str:
    return f"{rng.randint(10000, 99999)}"


def build_haystack(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(haystack ids of exactly `length` tokens with the needle at `depth` in [0, 1],
    question ids). The needle starts on a filler-passage boundary, at `needle_start`."""
    filler, needle, at = _layout(tokenizer, length, depth, key)
    n_filler = length - len(needle)
    hay = (filler * -(-n_filler // len(filler)))[:n_filler]
    return hay[:at] + needle + hay[at:], _encode(tokenizer, QUESTION)


def phased_haystack(tokenizer, length: int, depth: float, key: str, offset: int) -> list[int]:
    """A haystack of `length` tokens whose filler starts `offset` tokens into its passage and
    runs on unbroken around the needle, which starts at token round(depth * filler tokens) —
    not only between two passages as in `build_haystack` (training on every layout, and the
    layout probe bench/passkey_layouts.py)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"phased_haystack: depth must lie in [0, 1], got {depth}")
    filler, needle = _encode(tokenizer, FILLER), _encode(tokenizer, NEEDLE.format(key=key))
    if not 0 <= offset < len(filler):
        raise ValueError(f"phased_haystack: offset must lie in 0..{len(filler) - 1} (the passage's tokens), got {offset}")
    if length < len(needle):
        raise ValueError(f"phased_haystack: length {length} is shorter than the needle ({len(needle)} tokens)")
    n = length - len(needle)
    stream = (filler * -(-(n + offset) // len(filler)))[offset:offset + n]
    at = round(depth * n)
    return stream[:at] + needle + stream[at:]


def needle_start(tokenizer, length: int, depth: float, key: str) -> int:
    """Index of the needle's first token in `build_haystack(tokenizer, length, depth, key)`:
    the filler-passage boundary nearest `depth`."""
    return _layout(tokenizer, length, depth, key)[2]


def _layout(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int], int]:
    """(filler ids, needle ids, the needle's first index) of a haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"build_haystack: depth must lie in [0, 1], got {depth}")
    filler, needle = _encode(tokenizer, FILLER), _encode(tokenizer, NEEDLE.format(key=key))
    if length < len(needle):
        raise ValueError(f"build_haystack: length {length} is shorter than the needle ({len(needle)} tokens)")
    units = (length - len(needle)) // len(filler)  # whole filler passages: the needle goes between two
    return filler, needle, min(round(depth * (length - len(needle)) / len(filler)), units) * len(filler)


@torch.no_grad()
def answer_number(answer: str) -> str:
    """The key an answer gives: its first number, whole ("604941" is not the key 60494), or
    the answer itself when it holds none."""
    match = re.search(r"-?\d+", answer)  # ("-60494" is not the key 60494 either)
    return match.group(0) if match else answer.strip()


def run_batch(model, tokenizer, length: int, depth: float, seeds: Sequence[int], progress: bool = False,
              global_memory: bool = True, boundary_ids: Optional[Sequence[int]] = None) -> list[dict]:
    """Reads one haystack per seed (its key drawn from the seed) as one batch and asks
    each for its key. -> a JSON record per seed; `seconds` and `tokens_per_s` are the
    batch's (a haystack of a given length and depth has the same token count for every key).
    global_memory=False runs the "temporary memory only" ablation; boundary_ids cuts the
    haystack's chunks after boundary tokens (`CometForCausalLM.read`). The question continues the
    haystack's open chunk where it and its answer fit in it, else starts a chunk of its own."""
    seeds = list(seeds)  # (an iterator would be spent on the keys)
    if not seeds:
        raise ValueError("run_batch: give at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in seeds):
        raise ValueError(f"run_batch: seeds must be ints >= 0 (random.Random(-s) draws what Random(s) does), "
                         f"got {seeds}")
    seeds = [int(s) for s in seeds]  # (numpy ints too, as JSON records them)
    keys = [make_key(random.Random(seed)) for seed in seeds]
    rows = [build_haystack(tokenizer, length, depth, key) for key in keys]
    question = rows[0][1]
    ids = torch.tensor([hay for hay, _ in rows], device=model.device)
    start = time.perf_counter()
    memory = model.read(ids, progress=progress, global_memory=global_memory, boundary_ids=boundary_ids)
    qa = len(question) + len(_encode(tokenizer, " 00000."))  # the question and its answer " NNNNN."
    if max(memory.host_counts().open_text) + qa > model.comet_config.chunk_size:
        # As training lays them out: the question and its answer in one chunk, never across a boundary
        # (a model trained on fixed chunks then answered 1 in 8: haystacks of 88-127 tokens past a whole
        # number of chunks of 128). Where the haystack's open chunk has no room left, it is closed first.
        memory = model.read(ids[:, :0], memory, global_memory=global_memory, end_chunk=True)
    read_s = time.perf_counter() - start
    prompt = torch.tensor([question] * len(keys), device=model.device)
    out = model.generate(prompt, memory=memory, max_new_tokens=8, do_sample=False,
                         global_memory=global_memory)  # greedy whatever the model's generation_config says
    seconds = time.perf_counter() - start
    records = []
    for seed, key, row in zip(seeds, keys, out[:, len(question):].tolist()):
        answer = tokenizer.decode(row)
        found = answer_number(answer)
        records.append({"length": length, "depth": depth, "seed": seed, "expected": key, "found": found,
                        # where the needle is: the filler-passage boundary nearest `depth` (at a few
                        # hundred tokens, depths that differ share one)
                        "needle_start": needle_start(tokenizer, length, depth, key),
                        "correct": found == key, "seconds": seconds, "tokens_per_s": len(keys) * length / read_s,
                        "batch": len(keys), "global_memory": global_memory,
                        "gate_snap": model.comet_config.gate_snap,
                        **({"boundary_ids": list(boundary_ids)} if boundary_ids else {}),
                        "peak_rss_mb": peak_memory_mb(torch.device("cpu"))})
    return records


def run_passkey(model, tokenizer, length: int, depth: float, seed: int = 0, progress: bool = False,
                global_memory: bool = True, boundary_ids: Optional[Sequence[int]] = None) -> dict:
    """Reads one haystack and asks for its key. -> the JSON record of the run."""
    return run_batch(model, tokenizer, length, depth, [seed], progress, global_memory, boundary_ids)[0]


def sweep(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int, out: str,
          seed: int = 0, global_memory: bool = True, boundary_ids: Optional[Sequence[int]] = None) -> dict:
    """Accuracy over a grid of lengths x depths (`samples` keys per cell, read as one
    batch); writes passkey_sweep.json and passkey_heatmap.png into `out`.

    Resumable: the JSON is rewritten (atomically) after every cell, and a cell already
    in `out`'s JSON with the same seeds and memory setting is kept, not rerun. So a long
    sweep can be built up in pieces, e.g. the 1M-token column with fewer samples first.
    The JSON records the model's fingerprint (`model_fingerprint`); a sweep of another
    model (or one without a fingerprint), or read with other boundary_ids, in `out` is an
    error, never mixed in.
    """
    lengths, depths = list(dict.fromkeys(lengths)), list(dict.fromkeys(depths))  # a repeated value is one cell
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "passkey_sweep.json")
    seeds = list(range(seed, seed + samples))
    fingerprint = model_fingerprint(model)
    boundaries = sorted(boundary_ids) if boundary_ids else None
    done = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"sweep: {path} is not a sweep's JSON ({e}); use another --out, or delete it to "
                             "start over") from None
        if not isinstance(previous, dict) or not isinstance(previous.get("cells"), list):
            raise ValueError(f"sweep: {path} is not a sweep's JSON (no 'cells' list); use another --out, or "
                             "delete it to start over")
        if previous.get("model_sha256") != fingerprint:
            raise ValueError(f"sweep: {path} holds a sweep of another model (fingerprint "
                             f"{previous.get('model_sha256', 'not recorded')}, this one {fingerprint}); "
                             "use another --out, or delete it to start over")
        if previous.get("global_memory", True) != global_memory:
            raise ValueError(f"sweep: {path} holds a sweep with global_memory={previous.get('global_memory')}; "
                             "use another --out for the ablation")
        if previous.get("boundary_ids") != boundaries:
            raise ValueError(f"sweep: {path} holds a sweep read with boundary_ids={previous.get('boundary_ids')}, "
                             f"not {boundaries}; use another --out")
        done = {(c["length"], c["depth"]): c for c in previous["cells"]}
    cells = []
    for length in lengths:
        for depth in depths:
            cell = done.pop((length, depth), None)
            if cell is None or [r["seed"] for r in cell["runs"]] != seeds:
                runs = run_batch(model, tokenizer, length, depth, seeds, global_memory=global_memory,
                                 boundary_ids=boundaries)
                cell = {"length": length, "depth": depth, "samples": samples,
                        "accuracy": sum(r["correct"] for r in runs) / samples, "runs": runs}
                print(f"length {length:>8} depth {depth:g}: {cell['accuracy']:.0%} "
                      f"({runs[0]['seconds']:.0f} s)", flush=True)
            cells.append(cell)
            result = _grid(cells + list(done.values()), global_memory, fingerprint, boundaries)
            atomic_write(path, lambda p: write_json(p, result))
    heatmap(result, os.path.join(out, "passkey_heatmap.png"))
    return result


def _grid(cells: list[dict], global_memory: bool, fingerprint: str, boundaries: Optional[list[int]]) -> dict:
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    cells = sorted(cells, key=lambda c: (c["length"], c["depth"]))
    return {"lengths": lengths, "depths": depths, "global_memory": global_memory, "model_sha256": fingerprint,
            **({"boundary_ids": boundaries} if boundaries else {}), "cells": cells}


def model_fingerprint(model) -> str:
    """sha256 over the model's CoMeT settings and every named parameter and buffer (name,
    dtype, shape, bytes): two models share it only if their settings and weights are identical."""
    # An unsnapped model keeps the fingerprint it had before gate_snap existed.
    settings = {k: v for k, v in model.comet_config.to_dict().items() if not (k == "gate_snap" and v == 1.0)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def heatmap(result: dict, path: str) -> None:
    """The accuracy grid as a PNG (depth x length, like the paper's Figure 1); a cell
    with fewer samples than the most sampled one says how many it has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = result["lengths"], result["depths"]
    grid = np.full((len(depths), len(lengths)), np.nan)
    counts = {}
    for c in result["cells"]:
        i, j = depths.index(c["depth"]), lengths.index(c["length"])
        grid[i, j], counts[i, j] = c["accuracy"], len(c["runs"])
    most = max(counts.values(), default=0)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.45 * len(depths) + 1.5))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("haystack length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), n in counts.items():
        label = f"{grid[i, j]:.0%}" + (f"\nn={n}" if n < most else "")
        ax.text(j, i, label, ha="center", va="center", fontsize=7)
    title = "passkey exact match" + ("" if result.get("global_memory", True) else ", temporary memory only")
    snaps = {r.get("gate_snap", 1.0) for c in result["cells"] for r in c["runs"]}
    title += "".join(f", gate snap {s:g}" for s in sorted(snaps) if s < 1)
    title += ", chunks cut at boundary tokens" if result.get("boundary_ids") else ""
    ax.set_title(title + f" ({most} keys per cell)", fontsize=9)
    fig.colorbar(im, ax=ax, label="exact match")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _tokens(n: int) -> str:
    """1048576 -> 1M, 4096 -> 4k, 512 -> 512."""
    for shift, unit in ((20, "M"), (10, "k")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def load(path: str):
    """A CometForCausalLM checkpoint folder with its tokenizer."""
    from transformers import AutoTokenizer

    from .modeling import CometForCausalLM

    return CometForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="comet-passkey", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="a CometForCausalLM folder with its tokenizer (default: the shipped passkey model)")
    ap.add_argument("--length", type=int, default=65536, help="haystack length in tokens")
    ap.add_argument("--depth", type=float, default=None, help="needle depth in [0, 1] (default: random)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sweep", action="store_true", help="a grid of lengths x depths, heatmap + JSON")
    ap.add_argument("--samples", type=int, default=10, help="keys per sweep cell")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(SWEEP_LENGTHS))
    ap.add_argument("--depths", type=float, nargs="+", default=list(SWEEP_DEPTHS))
    ap.add_argument("--no-global-memory", action="store_true",
                    help="ablation: the temporary memory (FIFO) only")
    ap.add_argument("--gate-snap", type=float, default=None, metavar="TAU",
                    help="override the model's gate_snap: gates above TAU keep their slot exactly "
                         "(1 = never snap; default: the model's own setting)")
    ap.add_argument("--cut-after", default=None, metavar="TEXT",
                    help="cut the haystack's chunks after the last of these characters that fits, e.g. '.' "
                         "(CometForCausalLM.read(boundary_ids=...); default: fixed chunks)")
    ap.add_argument("--out", default="passkey_results")
    args = ap.parse_args(argv)
    lengths = args.lengths if args.sweep else [args.length]
    depths = args.depths if args.sweep else [args.depth] if args.depth is not None else []
    if min(lengths) < 1:
        ap.error(f"--length{'s' if args.sweep else ''}: a haystack needs at least one token, got {min(lengths)}")
    if any(not 0 <= d <= 1 for d in depths):
        ap.error(f"--depth{'s' if args.sweep else ''} must lie in [0, 1], got {[d for d in depths if not 0 <= d <= 1]}")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0 (a negative seed draws the keys of its positive twin), got {args.seed}")
    if args.sweep and args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    if args.sweep:
        try:  # before the model loads: an --out that cannot be written fails now, not after a cell
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            ap.error(f"--out: cannot create {args.out!r}: {e.strerror}")
    if not os.path.isdir(args.model):
        sys.exit(f"comet-passkey: no model folder at {args.model!r}")
    try:
        model, tokenizer = load(args.model)
    except (OSError, ValueError) as e:
        sys.exit(f"comet-passkey: {args.model!r} holds no CoMeT model with its tokenizer: {e}")
    try:  # the shortest haystack must hold the needle
        build_haystack(tokenizer, min(lengths), 0.0, "00000")
    except ValueError as e:
        ap.error(f"--length{'s' if args.sweep else ''}: {e}")
    if args.gate_snap is not None:
        try:
            model.comet_config = dataclasses.replace(model.comet_config, gate_snap=args.gate_snap)
        except ValueError as e:
            ap.error(f"--gate-snap: {e}")
    if args.cut_after == "":
        ap.error("--cut-after: give at least one character")
    # one id set per character: a subword tokenizer may merge a string of them into other tokens
    boundary_ids = sorted({i for ch in args.cut_after for i in _encode(tokenizer, ch)}) if args.cut_after else None
    if args.sweep:
        try:
            sweep(model, tokenizer, args.lengths, args.depths, args.samples, args.out, args.seed,
                  global_memory=not args.no_global_memory, boundary_ids=boundary_ids)
        except ValueError as e:  # an --out holding another sweep: said, not a traceback
            sys.exit(f"comet-passkey: {e}")
        return
    depth = args.depth if args.depth is not None else random.Random(args.seed).random()
    record = run_passkey(model, tokenizer, args.length, depth, args.seed, progress=not args.json,
                         global_memory=not args.no_global_memory, boundary_ids=boundary_ids)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"pass key {record['expected']} at depth {depth:.0%} of {args.length} tokens: found "
              f"{record['found']} ({'correct' if record['correct'] else 'wrong'}); "
              f"{record['tokens_per_s']:.0f} tokens/s, peak RSS {record['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
