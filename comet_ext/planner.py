"""Chunk planner: how a training sequence is cut into chunks, with sizes randomised per
sample as in the reference setup (README.md, "Fine-tuning"). Strategies of the reference setup:

- fixed: chunk_size each, the last one partial;
- right_aligned: the first chunk partial, the others full (the end of the
  sequence, usually the answer, sits at the end of a full chunk);
- uniform: the fewest chunks of at most chunk_size, all (nearly) equal;
- random: random cut points, every chunk between min_size and chunk_size (where the
  length allows a split so);
- semantic: cuts right after given boundary token ids (e.g. sentence or turn
  ends), chunks at most chunk_size (falls back to fixed cuts inside long spans).

A ChunkPlanner mixes them with configurable probabilities and draws from its
own seeded generator, so a plan is a pure function of (seed, step).

`cut_at_boundaries` applies the semantic rule while streaming: `read(boundary_ids=...)`.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
from typing import Optional, Sequence

import numpy as np

STRATEGIES = ("fixed", "right_aligned", "uniform", "random", "semantic")
DEFAULT_MIX = {"fixed": 0.4, "right_aligned": 0.15, "uniform": 0.15, "random": 0.2, "semantic": 0.1}


def fixed(T: int, chunk_size: int) -> list[int]:
    return [min(chunk_size, T - s) for s in range(0, T, chunk_size)]


def right_aligned(T: int, chunk_size: int) -> list[int]:
    return list(reversed(fixed(T, chunk_size)))


def uniform(T: int, chunk_size: int) -> list[int]:
    k = -(-T // chunk_size)
    base, extra = divmod(T, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def random_sizes(T: int, chunk_size: int, min_size: int, rng: np.random.Generator) -> list[int]:
    """Random chunks in [min_size, chunk_size] summing to T. Where no such split of T exists
    (T < min_size, or k * chunk_size < T < (k + 1) * min_size for some k), the chunks are full
    until the last, which is shorter."""
    lo = max(1, min(min_size, chunk_size))
    sizes, left = [], T
    while left > 0:
        # this chunk's sizes that leave a rest still splittable into chunks of lo..chunk_size
        options = [n for n in range(lo, min(chunk_size, left) + 1) if _splittable(left - n, lo, chunk_size)]
        if not options:  # T has no such split: a full chunk, and the shorter one at the end
            options = [min(chunk_size, left)]
        if options[-1] == left and (len(options) == 1 or rng.random() < 0.5):
            n = left
        else:
            n = options[int(rng.integers(len(options) - (options[-1] == left)))]
        sizes.append(n)
        left -= n
    return sizes


def _splittable(x: int, lo: int, hi: int) -> bool:
    """Whether x tokens split into chunks of lo..hi tokens (the fewest chunks, -(-x // hi), fit)."""
    return x == 0 or -(-x // hi) * lo <= x


def semantic(tokens: Sequence[int], chunk_size: int, boundary_ids: Sequence[int]) -> list[int]:
    """Greedy: each chunk ends after the last boundary token that still fits; a span
    with no boundary inside chunk_size is cut at chunk_size."""
    boundaries = set(boundary_ids)
    T, sizes, start = len(tokens), [], 0
    while start < T:
        end = min(start + chunk_size, T)
        if end < T:
            cut = next((j + 1 for j in range(end - 1, start - 1, -1) if tokens[j] in boundaries), None)
            end = cut if cut is not None and cut > start else end
        sizes.append(end - start)
        start = end
    return sizes


@dataclasses.dataclass
class ChunkPlanner:
    """Draws a chunking per sequence: a strategy by `mix`, then its sizes.

    Every size is in [1, chunk_size] and the sizes sum to the sequence length.
    `semantic` needs boundary_ids and the tokens; without them its share goes to `fixed`.
    """

    chunk_size: int
    mix: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_MIX))
    min_size: int = 64
    boundary_ids: Optional[Sequence[int]] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"ChunkPlanner.chunk_size must be >= 1, got {self.chunk_size}")
        unknown = set(self.mix) - set(STRATEGIES)
        if unknown:
            raise ValueError(f"ChunkPlanner.mix has unknown strategies {sorted(unknown)}; known: {STRATEGIES}")
        for name, p in self.mix.items():
            # a NaN passes `p < 0`: plan() would then drop it silently, or fail in numpy if it is alone
            if not isinstance(p, numbers.Real) or not math.isfinite(p) or p < 0:
                raise ValueError(f"ChunkPlanner.mix[{name!r}] must be a finite weight >= 0, got {p!r}")
        if sum(self.mix.values()) <= 0:
            raise ValueError(f"ChunkPlanner.mix must have non-negative weights with a positive sum, got {self.mix}")

    def plan(self, T: int, step: int, tokens: Optional[Sequence[int]] = None) -> tuple[str, list[int]]:
        """(strategy, sizes) for a sequence of T tokens at a given training step; `tokens`, where
        given, are its T token ids (`semantic` cuts after the boundary ids among them)."""
        if T < 1:
            raise ValueError(f"ChunkPlanner.plan: the sequence must have at least one token, got {T}")
        # `semantic` sizes its chunks from the tokens: of another length, they would not sum to T
        if tokens is not None and len(tokens) != T:
            raise ValueError(f"ChunkPlanner.plan: tokens has {len(tokens)} ids, expected the sequence's T={T}")
        rng = np.random.default_rng([self.seed, step])
        mix = dict(self.mix)
        if not self.boundary_ids or tokens is None:
            mix["fixed"] = mix.get("fixed", 0) + mix.pop("semantic", 0)
        names = [n for n in STRATEGIES if mix.get(n, 0) > 0]
        weights = np.array([mix[n] for n in names], dtype=float)
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        cs = self.chunk_size
        sizes = {
            "fixed": lambda: fixed(T, cs),
            "right_aligned": lambda: right_aligned(T, cs),
            "uniform": lambda: uniform(T, cs),
            "random": lambda: random_sizes(T, cs, self.min_size, rng),
            "semantic": lambda: semantic(tokens, cs, self.boundary_ids),
        }[name]()
        return name, sizes


def cut_at_boundaries(boundaries: list[list[int]], done: list[int], left: list[int],
                      room: list[int]) -> tuple[list[int], list[bool]]:
    """For `read(boundary_ids=...)`: the tokens each sample appends to its open chunk in this
    step, and whether the chunk is cut after them. Where more tokens are left than the chunk
    has room for, it ends after the last boundary token that fits (the rule of `semantic`).
    boundaries[b]: sorted boundary positions; done[b]: tokens read; left[b]: tokens still
    to read; room[b]: text tokens the open chunk can take. -> (take, cut)."""
    take, cut = [max(0, min(n, r)) for n, r in zip(left, room)], [False] * len(left)
    for b, (pos, d, n, r) in enumerate(zip(boundaries, done, left, room)):
        if n <= r:
            continue
        i = bisect.bisect_left(pos, d + r) - 1  # the last boundary inside the window [d, d + r)
        if i >= 0 and pos[i] >= d:
            take[b], cut[b] = pos[i] - d + 1, pos[i] - d + 1 < r
    return take, cut
