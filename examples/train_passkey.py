"""Train a passkey model from scratch with comet_ext (the shipped model's command: its TRAINING.md).

    python examples/train_passkey.py --minutes 45 --out runs/passkey
    python examples/train_passkey.py --minutes 45 --out runs/passkey --resume   # continue that run exactly
    python examples/train_passkey.py --init runs/passkey --start-stage 4 --out runs/passkey-more   # a new run from it

A small byte-level Qwen3-style decoder (4 layers, hidden 256, 4 heads) with the
CoMeT memory learns to recall a 5-digit key hidden at a random depth of a filler
haystack, with a curriculum over the number of chunks (1 -> 2 -> 4 -> 8 -> ...;
a stage advances once the answer digits are >= 95% right over its last 20 steps,
and a quarter of the steps replay a passed stage). Loss: the answer digits plus
0.5 x the LM loss on everything else. The question lands anywhere in the last
chunk — often at its very start, as in a haystack of a power-of-two length, where
only the memory holds the key. Writes the model + tokenizer (save_pretrained),
train_log.jsonl (a line per step), train_info.json (command, seed, time,
stage) and trainer_state.pt (what --resume continues from: the optimizer, the
schedule, the random states, the curriculum) into --out, every --save-every
minutes and each time a stage is passed.

What we learnt on a 2-core CPU: start the curriculum at 1 chunk (from 2 the
answer loss sits at chance) and at a chunk size of 128 (at 256, and with hidden
128, stage 1 was still at chance after 400-1000 steps; a 256 run warm-started
from a 128 checkpoint learns); a question always at the end of a full chunk
teaches a model that fails when the question starts a chunk; with the question at a
chunk's start half the time (--question-at-start 0.5), a warm start that had sat at 92%
at stage 8 passed it within 20 steps, and stage 16 then climbed from 54% to ~80% of the
digits in 670 steps (~6.5 s a step on 2 threads). The step is compute-bound (matmuls run at
~120 GFLOP/s a core, 72% of the time); recomputing activations cost 1.44x (3.4 vs 2.4 s a
step at 4 chunks on one thread), so it is off unless asked for (--recompute). With --bf16
(autocast: matmuls and attention in bf16, the memory modules and the weights in fp32) a
step at 4 chunks took 1.7-2.0 s against 5.8-6.8 s in fp32 on one thread of this CPU
(AVX512-BF16), the other core busy: 3.3x. Needles 32-512 chunks back in a prefix read without
gradient (--far-needle 0.5, 80 minutes from run 11, shipped until run 33) did not lengthen its
reach: the key is written, and the gates leak, inside the no-gradient prefix, so only the reading learns
(bench/results/passkey_runs/, runs 14 and 15). Sentence-cut chunks (--semantic-chunks 0.9, two
hours) and random chunks (--random-chunks 0.5, 70 minutes) from run 11 did not make its
reading independent of the layout (bench/passkey_layouts.py; runs 22-25 there). Haystacks with the
filler at every phase (--filler-phase 1, 105 minutes) did: 5-7 keys of 10 at each phase, but at that
level, the sweep's phase-0 layouts losing what run 11 had (run 26). From scratch, the
same haystacks with 32 slots (--filler-phase 1 --num-global 32 --question-at-start 0.5 --review 0.5
--bf16, run 30) passed the curriculum to 32 chunks in 55 minutes and read a first-chunk key at every
layout better than run 11; copying a trained model's 16 slots into 32 made it worse.
The same with a tenth of the needles in the haystack's last chunk (--late-needle 0.1, run 33,
stopped after 57 minutes at a constant learning rate), then 80 minutes more from it at 32 chunks
with the learning rate annealed (--min-lr-ratio 0.05 over 600 steps, run 34), then 62 minutes more
annealed again from --lr 3e-4 (400 steps, run 37) was the model shipped before run 40
(comet_ext/models/passkey/TRAINING.md). The annealing, not the extra steps, made the difference: the
answer digits at 32 chunks rose from 0.95 to 0.996, and the keys read back exactly from 81% to 98.5%
(run 34) and 100% (run 37) over the 128 offsets of the needle in its chunk (bench/passkey_layouts.py
--offsets), where run 34's first 20 minutes at the full rate had changed nothing (84%, 79%).
Run 37 still lost two keys of ten beyond 16k: layer 2's global memory re-encoded them at every
update through partly open gates and wandered (bench/passkey_drift.py). 65 minutes more with the
gates' entropy in the loss (--gate-entropy 0.1, run 40, the shipped model) made every gate keep or
replace its slot: the sweep finds 879 of 880 keys up to 1M tokens, 10 of 10 at a random depth of 1M
(the one miss is a key cut by a chunk boundary, lost in 4k tokens too: bench/passkey_window.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from comet_ext import CometConfig, CometForCausalLM
from comet_ext.data import byte_tokenizer
from comet_ext.atomic import atomic_write, write_json
from comet_ext.passkey import FILLER, NEEDLE, QUESTION, build_haystack, make_key, phased_haystack
from comet_ext.planner import fixed, random_sizes, semantic
from comet_ext.training import TrainConfig, build_optimizer, lr_factor


def make_batch(tok, batch: int, chunks: int, chunk_size: int, rng: random.Random, at_start: float = 0.25,
               late: float = 0.0, far: int = 0, split: float = 0.0, cut_after: Optional[list[int]] = None,
               random_min: int = 0, phase: float = 0.0):
    """Haystack + question + answer per sample, all of one length, ending a last chunk
    that is full or partial. -> ids (batch, T), weights (1 on the answer digits, 0.5 on
    every other next-token target), the answer's first positions, the chunk sizes.

    The question lands anywhere in the last chunk, and with probability `at_start` at its
    very start: that is where it lands when a haystack fills whole chunks (any power-of-two
    length), with nothing of the haystack in its own chunk. The needle's depth is uniform,
    except that with probability `late` it lies within the haystack's last chunk_size tokens
    (uniform depth puts it there rarely: ~2% of samples at 16 chunks), and with probability
    `split` it straddles a chunk boundary (a uniform choice among the filler-passage slots that
    do; the harder case: bench/passkey_misses.py).

    far > 0: `far` more chunks come first (read without gradient, as a prefix), and the
    needle lies at a uniform place within them; the sizes then list all far + chunks.

    cut_after (token ids, e.g. of "."): the chunks are cut as `CometForCausalLM.read(hay,
    boundary_ids=cut_after)` cuts the haystack (planner.semantic), the question and answer
    then continuing its open chunk as `generate` does (`comet-passkey --cut-after`); every
    sample of the batch has its needle in the same place (within the last chunk_size tokens
    with probability `late`), so that one set of cuts fits them all. There are then a few
    more chunks than `chunks`. (Closing the haystack's last chunk instead, so that the
    question starts one, trained far worse: its chunk can be a few tokens long, and a closed
    chunk of a few tokens rewrites the memory.)

    random_min > 0: the same samples, cut into random chunks of random_min..chunk_size tokens
    (planner.random_sizes, one set of cuts for the batch), so that no chunk length or place of a
    cut relative to the filler is special: a model trained on fixed chunks only finds a key in a
    first chunk of 104, 116 or 122 tokens 0-1 times in 10, in one of 128 or 100 every time
    (bench/passkey_layouts.py).

    phase > 0: with this probability a sample's filler starts at a random token of its passage
    and its needle goes in at the token nearest its depth, not only between two passages
    (`phased_haystack`), so that chunk boundaries fall at every phase of the filler and the
    needle at every place in its chunk; the sweep's haystacks and the other samples always
    start the passage at the haystack's first token and again after the needle."""
    question = list(tok(QUESTION, add_special_tokens=False)["input_ids"])
    qa = len(question) + len(tok(" 00000.", add_special_tokens=False)["input_ids"])  # + the answer " NNNNN."
    filler, needle = (len(tok(text, add_special_tokens=False)["input_ids"])
                      for text in (FILLER, NEEDLE.format(key="00000")))
    lowest = qa if chunks > 1 or far else qa + needle
    last = lowest if (chunks > 1 or far) and rng.random() < at_start else rng.randint(lowest, chunk_size)
    sizes = [chunk_size] * (far + chunks - 1) + [last]
    ids, weights, answer_pos = [], [], []
    hay_len = sum(sizes) - qa
    shared_depth = None
    if cut_after:
        late_one = late > 0 and rng.random() < late
        shared_depth = late_depth(rng, chunk_size, hay_len) if late_one else rng.random()
    for _ in range(batch):
        key = make_key(rng)
        answer = list(tok(f" {key}.", add_special_tokens=False)["input_ids"])
        if shared_depth is not None:
            depth = shared_depth
        elif far:  # the needle ends in the prefix, whatever the rounding to a passage boundary
            depth = rng.random() * (far * chunk_size - needle - filler) / (hay_len - needle)
        elif late > 0 and rng.random() < late:  # (late = 0 draws exactly what earlier versions drew)
            depth = late_depth(rng, chunk_size, hay_len)
        elif split > 0 and rng.random() < split and (slots := split_slots(hay_len, needle, filler, sizes)):
            depth = rng.choice(slots) * filler / (hay_len - needle)  # build_haystack rounds it back to the slot
        else:
            depth = rng.random()
        if phase > 0 and rng.random() < phase:
            hay = phased_haystack(tok, hay_len, depth, key, rng.randrange(filler))
        else:
            hay, _ = build_haystack(tok, hay_len, depth, key)
        seq = hay + question + answer
        w = [0.5] * len(seq)
        first_digit = len(hay) + len(question) + 1  # after the space
        for p in range(first_digit, first_digit + 5):
            w[p] = 1.0
        ids.append(seq)
        weights.append(w)
        answer_pos.append(first_digit)
    if cut_after:  # the haystack's tail stays open: the question continues its chunk
        pieces = semantic(ids[0][:hay_len], chunk_size, cut_after)
        sizes = pieces[:-1] + fixed(pieces[-1] + qa, chunk_size)
    elif random_min:
        sizes = random_sizes(sum(sizes), chunk_size, random_min, np.random.default_rng(rng.getrandbits(64)))
    return torch.tensor(ids), torch.tensor(weights), answer_pos, sizes


class GateEntropy:
    """Collects the binary entropy of every global-memory gate a training forward computes
    (g = sigmoid(W_g [RMSNorm_g(R) ; S]), one per slot and gated update, recomputed here
    in Python from the update's inputs so that it carries a gradient) while `collecting`.

    A gate near 0 or 1 either replaces its slot or keeps it; gates in between let a slot
    drift a little at every update, which is how a key kept in layer 2's slots is lost
    after 64-256 updates (bench/passkey_drift.py). Off during backward, where --recompute
    runs the checkpointed steps again."""

    def __init__(self, model):
        self.collecting, self.values = False, []
        for layer in model.memory_layers:
            net = layer.global_memory_net
            net.forward = self._wrap(net, net.forward)

    def _wrap(self, net, forward):
        def gated(readout, state, gate_snap=1.0):
            # computed whenever a gradient is (the recomputation of a checkpointed step must
            # save the same tensors as its forward), kept only while collecting
            if torch.is_grad_enabled() and state is not None:
                logit = net.gate_logit(readout, state).float()  # (B, G)
                g = torch.sigmoid(logit)
                # -(g log g + (1 - g) log(1 - g)), from the logit so that it stays finite
                h = (F.softplus(-logit) * g + F.softplus(logit) * (1 - g)).mean()
                if self.collecting:
                    self.values.append(h)
            return forward(readout, state, gate_snap)
        return gated

    def take(self) -> Optional[torch.Tensor]:
        """The mean entropy over the gated updates collected since the last take (None if none:
        a one-chunk step has no gated update)."""
        values, self.values = self.values, []
        return torch.stack(values).mean() if values else None


def late_depth(rng: random.Random, chunk_size: int, hay_len: int) -> float:
    """A depth whose needle ends within the haystack's last chunk_size tokens."""
    return 1 - rng.random() * min(1.0, chunk_size / hay_len)


def split_slots(hay_len: int, needle: int, filler: int, sizes: list[int]) -> list[int]:
    """Filler-passage slots k (the needle starts at k * filler, as build_haystack places it)
    where a needle of `needle` tokens straddles a boundary between the chunks of `sizes`."""
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    return [k for k in range((hay_len - needle) // filler + 1)
            if any(k * filler < b < k * filler + needle for b in bounds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/passkey")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget")
    ap.add_argument("--steps", type=int, default=None,
                    help="at most this many steps (default: no limit but --minutes; needed by --min-lr-ratio)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="stop after this many steps, the schedule still spanning --steps (to repeat a run that "
                         "--minutes stopped early)")
    ap.add_argument("--max-chunks", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--memory-lr-mult", type=float, default=2.0)
    ap.add_argument("--min-lr-ratio", type=float, default=1.0,
                    help="after the 50 warmup steps the learning rate follows a cosine from --lr down to this "
                         "fraction of it at --steps (1: constant, for open-ended runs stopped by --minutes)")
    ap.add_argument("--advance-at", type=float, default=0.95)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4, help="attention heads of head dim 64")
    ap.add_argument("--num-global", type=int, default=16,
                    help="global-memory slots; with --init of another number, resize_global_memory "
                         "(new slots: copies of the old ones plus noise of 0.1 x their spread)")
    ap.add_argument("--review", type=float, default=0.25,
                    help="probability that a step replays a shorter, already passed stage")
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint (e.g. one trained at a smaller --chunk-size) instead of scratch")
    ap.add_argument("--start-stage", type=int, default=1,
                    help="chunks of the first curriculum stage (with --init: skip the stages it has passed)")
    ap.add_argument("--question-at-start", type=float, default=0.25,
                    help="probability that the question starts the last chunk (as in comet-passkey's haystacks)")
    ap.add_argument("--late-needle", type=float, default=0.0,
                    help="probability that the needle lies in the haystack's last chunk")
    ap.add_argument("--split-needle", type=float, default=0.0,
                    help="probability that the needle straddles a chunk boundary (else its depth is uniform)")
    ap.add_argument("--cut-after", default=None, metavar="TEXT",
                    help="with --semantic-chunks: the boundary characters, e.g. '.'")
    ap.add_argument("--semantic-chunks", type=float, default=0.0,
                    help="probability that a step's chunks end after the last --cut-after token that fits, as "
                         "`comet-passkey --cut-after` reads them (CometForCausalLM.read(boundary_ids=...))")
    ap.add_argument("--random-chunks", type=float, default=0.0,
                    help="probability that a step's chunks have random lengths in --min-chunk..--chunk-size "
                         "(planner.random_sizes) instead of fixed ones")
    ap.add_argument("--min-chunk", type=int, default=96, help="the shortest chunk of a --random-chunks step")
    ap.add_argument("--filler-phase", type=float, default=0.0, metavar="P",
                    help="fraction of the samples whose filler starts at a random token of its passage, "
                         "the needle at any token (make_batch's phase)")
    ap.add_argument("--far-needle", type=float, default=0.0,
                    help="probability that a step's needle lies far back: --far-chunks chunks read without "
                         "gradient (truncated BPTT), then --far-tail chunks trained, the question in the last")
    ap.add_argument("--far-chunks", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"),
                    help="chunks read without gradient in a far-needle step (log-uniform between MIN and MAX)")
    ap.add_argument("--far-tail", type=int, default=4, help="chunks trained after the far prefix")
    ap.add_argument("--far-batch-size", type=int, default=8,
                    help="samples of a far-needle step (reading the prefix dominates its time)")
    ap.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=False,
                    help="activation recomputation per (layer, chunk): less memory, 1.44x the time a step takes "
                         "(off, the passkey model at batch 16 peaks at 13-17 GB of RSS at 32 chunks and passed 24 GB "
                         "at 64; on, about 6 GB at 64 chunks)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                    help="bf16 autocast: matmuls and attention in bf16, the memory modules and the weights in "
                         "fp32 (3.3x faster steps on a CPU with AVX512-BF16)")
    ap.add_argument("--save-every", type=float, default=10.0, help="also save every this many minutes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--gate-snap", type=float, default=None, metavar="TAU",
                    help="CometConfig.gate_snap: gates above TAU keep their slot exactly (1: never; "
                         "default: --init's own setting, else 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gate-entropy", type=float, default=0.0, metavar="LAMBDA",
                    help="add LAMBDA x the mean binary entropy of the global-memory gates to the loss: "
                         "pushes every gate towards keeping its slot (1) or replacing it (0)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run saved in --out (weights, optimizer, schedule, random state, curriculum, "
                         "log) where its last save left it: give the run's command again with --resume (the model's "
                         "shape and the learning rates cannot change); --steps counts all steps, --minutes this "
                         "process's. Without it, an --out holding a saved run is refused")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = byte_tokenizer()
    for name in ("review", "question_at_start", "late_needle", "split_needle", "semantic_chunks", "random_chunks",
                 "filler_phase", "far_needle"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} is a probability in [0, 1], got {getattr(args, name)}")
    if args.gate_entropy < 0:
        ap.error(f"--gate-entropy is a loss weight >= 0, got {args.gate_entropy}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        ap.error(f"--min-lr-ratio is a fraction of --lr in [0, 1], got {args.min_lr_ratio}")
    if args.min_lr_ratio < 1.0 and args.steps is None:  # else the cosine would span an arbitrary step count
        ap.error("--min-lr-ratio anneals the learning rate over --steps: give --steps")
    if args.stop_after is not None and args.stop_after < 1:
        ap.error(f"--stop-after is a step count >= 1, got {args.stop_after}")
    for name in ("start_stage", "batch_size", "far_batch_size", "far_tail"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.far_chunks[0] <= args.far_chunks[1]:
        ap.error("--far-chunks MIN MAX are chunk counts with 1 <= MIN <= MAX, got "
                 f"{args.far_chunks[0]} {args.far_chunks[1]}")
    if args.steps is None:
        args.steps = 100000  # the limit before --min-lr-ratio existed: saved runs resume with the same value
    if not 1 <= args.min_chunk <= args.chunk_size:
        ap.error(f"--min-chunk must lie in 1..--chunk-size ({args.chunk_size}), got {args.min_chunk}")
    if args.semantic_chunks > 0 and not args.cut_after:
        ap.error("--semantic-chunks needs --cut-after (the boundary characters)")
    if not args.resume and os.path.exists(os.path.join(args.out, TRAINER_STATE)):  # before anything is written
        ap.error(f"--out {args.out} holds a saved run ({TRAINER_STATE}): pass --resume to continue it, or another "
                 "--out for a new run")
    resumed = load_trainer_state(args.out) if args.resume else None
    if resumed:
        check_resumed_args(ap, args, resumed["args"])
    cut_ids = sorted({i for ch in args.cut_after or "" for i in tok(ch, add_special_tokens=False)["input_ids"]}) or None
    config = Qwen3Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 5 // 2,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    init_from = args.out if resumed else args.init  # a resumed run's model is its own checkpoint
    init = CometForCausalLM.from_pretrained(init_from).train() if init_from else None
    snap = args.gate_snap if args.gate_snap is not None else init.comet_config.gate_snap if init else 1.0
    comet = CometConfig(chunk_size=args.chunk_size, num_global=args.num_global, temp_stride=8, temp_budget=32,
                        rla_rank=8, gate_snap=snap)
    if init is not None:  # the chunk size and the snap set no parameter's shape; the slots are resized
        model = init
        model.comet_config = dataclasses.replace(model.comet_config, chunk_size=args.chunk_size, gate_snap=snap)
        if resumed and model.comet_config.num_global != args.num_global:  # (a run resumed by an older version)
            ap.error(f"--resume: the model saved in {args.out} has {model.comet_config.num_global} global slots, "
                     f"not --num-global {args.num_global}")
        if model.comet_config.num_global != args.num_global:
            model.resize_global_memory(args.num_global, noise=0.1,
                                       generator=torch.Generator().manual_seed(args.seed))
        if model.comet_config != comet:
            raise ValueError(f"--init {init_from}: its CoMeT config {model.comet_config} differs from {comet} "
                             "in more than the chunk size, the gate snap and the number of slots")
        if resumed:  # the weights that go with the optimizer state (model.safetensors is written apart)
            model.load_state_dict(resumed["model"])
    else:
        model = CometForCausalLM.from_base(Qwen3ForCausalLM(config), comet).train()
    cfg = TrainConfig(total_steps=args.steps, lr=args.lr, memory_lr_mult=args.memory_lr_mult, warmup_steps=50,
                      min_lr_ratio=args.min_lr_ratio, max_grad_norm=1.0)
    entropy = GateEntropy(model) if args.gate_entropy > 0 else None
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "train_log.jsonl")
    start, chunks, recent, recent_far = time.time(), args.start_stage, [], []
    last_save, passed, done = start, 0, 0  # passed: the longest stage this run has passed; done: steps run
    before = 0.0  # minutes run before a --resume
    if resumed:
        changed = [f"--{k.replace('_', '-')} {v!r} -> {getattr(args, k)!r}" for k, v in resumed["args"].items()
                   if k not in ("resume", "minutes") and getattr(args, k, v) != v]
        if changed:
            print(f"resuming with changed options: {'; '.join(changed)}", flush=True)
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        rng.setstate(resumed["rng"])
        torch.set_rng_state(resumed["torch_rng"])
        done, chunks, passed = resumed["step"], resumed["stage"], resumed["passed"]
        recent, recent_far, before = resumed["recent"], resumed["recent_far"], resumed["minutes"]
        keep_log_until(log_path, done)  # steps logged after the last save are run again
        print(f"resuming {args.out} at step {done}, stage {chunks} ({before:.1f} min so far)", flush=True)
    log = open(log_path, "a" if resumed else "w")
    command = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "from_step": done}
    state = TrainerState(model, opt, sched, rng, args, start, before,
                         (earlier_commands(args.out, resumed) if resumed else []) + [command])
    for step in range(done, min(args.steps, args.stop_after or args.steps)):
        if time.time() - start > args.minutes * 60:
            break
        far = 0
        if args.far_needle > 0 and rng.random() < args.far_needle:
            lo, hi = args.far_chunks
            far, n = round(math.exp(rng.uniform(math.log(lo), math.log(hi)))), args.far_tail
            ids, weights, answer_pos, sizes = make_batch(tok, args.far_batch_size, n, args.chunk_size, rng,
                                                         args.question_at_start, far=far)
        else:  # replaying a passed stage now and then keeps the short-range skills (in-chunk copying)
            n = chunks if chunks == 1 or rng.random() >= args.review else 2 ** rng.randrange(chunks.bit_length() - 1)
            cut_at = cut_ids if n > 1 and rng.random() < args.semantic_chunks else None
            randomly = not cut_at and args.random_chunks > 0 and n > 1 and rng.random() < args.random_chunks
            ids, weights, answer_pos, sizes = make_batch(tok, args.batch_size, n, args.chunk_size, rng,
                                                         args.question_at_start, args.late_needle,
                                                         split=args.split_needle, cut_after=cut_at,
                                                         random_min=args.min_chunk if randomly else 0,
                                                         phase=args.filler_phase)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            memory = None
            if far:  # truncated BPTT: the prefix holding the needle is read without gradient
                cut = far * args.chunk_size
                with torch.no_grad():
                    memory = model.read(ids[:, :cut], progress=False)
                ids, weights, sizes = ids[:, cut:], weights[:, cut:], sizes[far:]
                answer_pos = [p - cut for p in answer_pos]
            if entropy is not None:
                entropy.collecting = True
            logits = model(ids, chunk_sizes=sizes, recompute=args.recompute, memory=memory).logits
            if entropy is not None:
                entropy.collecting = False
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                             reduction="none").view(ids.shape[0], -1)
        w = weights[:, 1:]
        loss = (ce * w).sum() / w.sum()
        gate_h = entropy.take() if entropy is not None else None
        if gate_h is not None:
            loss = loss + args.gate_entropy * gate_h
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        with torch.no_grad():
            pred = logits.argmax(-1)
            digits = [(pred[b, p - 1:p + 4] == ids[b, p:p + 5]).float().mean().item() for b, p in enumerate(answer_pos)]
        acc = sum(digits) / len(digits)
        if far:
            recent_far = (recent_far + [acc])[-20:]
        elif n == chunks:
            recent = (recent + [acc])[-20:]
        done = step + 1
        record = {"step": done, "chunks": n, "stage": chunks, "loss": loss.item(), "digit_acc": acc,
                  "minutes": before + (time.time() - start) / 60}
        if gate_h is not None:
            record["gate_entropy"] = gate_h.item()
        if far:
            record["far_chunks"] = far
        elif cut_at:
            record["cut_chunks"] = len(sizes)
        elif randomly:
            record["random_chunks"] = len(sizes)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if done % 10 == 0 and recent:
            far_digits = f" far-needle digits {sum(recent_far) / len(recent_far):.2f}" if recent_far else ""
            print(f"step {done} stage {chunks} loss {loss.item():.3f} digits {sum(recent) / len(recent):.2f}"
                  f"{far_digits} ({record['minutes']:.1f} min)", flush=True)
        if len(recent) == 20 and sum(recent) / 20 >= args.advance_at and chunks < args.max_chunks:
            passed, chunks, recent = chunks, chunks * 2, []
            state.save(tok, done, chunks, passed, recent, recent_far)  # a cut-off run keeps what it learnt
            last_save = time.time()
        elif time.time() - last_save > args.save_every * 60:
            state.save(tok, done, chunks, passed, recent, recent_far)
            last_save = time.time()
    log.close()
    state.save(tok, done, chunks, passed, recent, recent_far)
    print(f"saved to {args.out} after {before + (time.time() - start) / 60:.1f} min at {chunks} chunks")


TRAINER_STATE = "trainer_state.pt"
# Options a --resume cannot apply. The saved weights have their shapes (--init's model had them on a
# fresh run), the restored schedule the learning rates: a change is refused.
FIXED_ON_RESUME = ("hidden", "layers", "heads", "num_global", "lr", "memory_lr_mult")
# The saved random states, curriculum and weights replace what these set up: the run's own values are kept.
KEPT_ON_RESUME = ("seed", "start_stage", "init")


def check_resumed_args(ap: argparse.ArgumentParser, args: argparse.Namespace, saved: dict) -> None:
    """Before a --resume builds anything: an argparse error for a changed option of FIXED_ON_RESUME
    (it would be ignored, then recorded as if applied), and the saved values of KEPT_ON_RESUME put
    back into `args` (noted), so that the trainer state records only options the run has applied.
    Options a saved run's args lack (older versions) are not compared."""
    def flag(k):
        return "--" + k.replace("_", "-")
    fixed = [f"{flag(k)} {saved[k]} (now {getattr(args, k)})" for k in FIXED_ON_RESUME
             if k in saved and saved[k] != getattr(args, k)]
    if fixed:
        ap.error(f"--resume: the run was trained with {', '.join(fixed)}, which a resumed run cannot change "
                 "(its saved weights and schedule have them): resume with the run's own values, or start a new "
                 f"run from it with --init {args.out} --out NEW")
    kept = [k for k in KEPT_ON_RESUME if k in saved and saved[k] != getattr(args, k)]
    if kept:
        print("--resume keeps the run's own " + "; ".join(f"{flag(k)} {saved[k]!r} (ignoring {getattr(args, k)!r})"
                                                         for k in kept), flush=True)
        for k in kept:
            setattr(args, k, saved[k])


@dataclasses.dataclass
class TrainerState:
    """What --resume needs besides the command: saved with the model at every save."""
    model: CometForCausalLM
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rng: random.Random
    args: argparse.Namespace
    start: float  # this process's start (time.time())
    before: float  # minutes run before this process (--resume)
    commands: list  # every command of the run, the first one and each --resume, with the step it began at

    def save(self, tok, steps: int, stage: int, passed: int, recent: list, recent_far: list) -> None:
        """The model + tokenizer (save_pretrained), train_info.json, and trainer_state.pt: the
        weights again, with the optimizer, the schedule, both random states and the curriculum's
        counters, in one atomically written file, so that a resumed run continues exactly."""
        out, minutes = self.args.out, self.before + (time.time() - self.start) / 60
        self.model.eval()
        self.model.save_pretrained(out)
        self.model.train()
        tok.save_pretrained(out)
        trainer = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                   "scheduler": self.sched.state_dict(), "rng": self.rng.getstate(),
                   "torch_rng": torch.get_rng_state(), "step": steps, "stage": stage, "passed": passed,
                   "recent": list(recent), "recent_far": list(recent_far), "minutes": minutes,
                   "args": vars(self.args), "commands": self.commands}
        atomic_write(os.path.join(out, TRAINER_STATE), lambda p: torch.save(trainer, p))
        info = {"command": self.commands[-1]["command"], "commands": self.commands, "seed": self.args.seed,
                "minutes": minutes, "steps": steps, "stage": stage, "passed_stage": passed}
        atomic_write(os.path.join(out, "train_info.json"), lambda p: write_json(p, info))


def load_trainer_state(out: str) -> dict:
    path = os.path.join(out, TRAINER_STATE)
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no {TRAINER_STATE} in --out {out!r} (a run saves one at every save; "
                         "runs of older versions of this script cannot be resumed)")
    return torch.load(path, weights_only=True)  # tensors and plain containers only


def earlier_commands(out: str, resumed: dict) -> list:
    """The commands of a run so far (a trainer state saved before they were kept in it: the
    one command its train_info.json names)."""
    if "commands" in resumed:
        return resumed["commands"]
    with open(os.path.join(out, "train_info.json")) as f:
        return [{"command": json.load(f)["command"], "from_step": 0}]


def keep_log_until(path: str, step: int) -> None:
    """Drops the log lines of steps after `step` (run again after a --resume), atomically, with a
    last line that does not parse (torn by a kill while it was written: after the last save)."""
    lines = open(path).readlines() if os.path.isfile(path) else []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    kept = []
    for i, line in enumerate(lines[:last + 1]):
        if not line.strip():
            continue
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if i == last:
                break
            raise SystemExit(f"--resume: line {i + 1} of {path} is not a step's record: {line.strip()[:80]!r}")
        if logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")

    def write(p):
        with open(p, "w") as f:
            f.writelines(kept)
    atomic_write(path, write)


if __name__ == "__main__":
    main()
