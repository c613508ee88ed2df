"""The training loop: chunked BPTT through the CoMeT memories on one process.

    trainer = Trainer(model, samples, TrainConfig(total_steps=1000, lr=2e-5), planner)
    trainer.train()

AdamW with the memory modules (and the compression / readout embeddings) at
`memory_lr_mult` times the base learning rate; linear warmup then cosine decay;
gradient accumulation; optional bf16 autocast; activation recomputation per
(layer, chunk); gradient clipping; atomic checkpoints of everything needed to
resume exactly (model, optimizer, scheduler, data position, step); a tqdm bar
and a plain log line per step (loss, tokens/s, peak memory).

Data order and chunk plans are pure functions of (seed, step), so a resumed
run reproduces the uninterrupted run's losses exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import checkpoint
from .atomic import atomic_folder
from .data import Sample, collate
from .planner import ChunkPlanner

# what a checkpoint folder holds (save_checkpoint replaces such a folder, and refuses any other)
CHECKPOINT_ENTRIES = ("model", "trainer.pt", "train_config.json")

log = logging.getLogger("comet_ext.training")


@dataclasses.dataclass
class TrainConfig:
    """Settings of `Trainer`.

    total_steps: optimizer steps; batch_size samples per micro-batch, grad_accum micro-batches
    per step (per data replica). lr: the base model's learning rate; the memory modules and the
    compression / readout embeddings train at lr * memory_lr_mult (the reference's 5x). AdamW
    with weight_decay and betas; linear warmup over warmup_steps, then cosine decay to
    lr * min_lr_ratio; gradients clipped to a total norm of max_grad_norm (> 0; float("inf"):
    not clipped, the norm still logged). bf16_autocast: the forward under
    torch.autocast(bfloat16). recompute: activation recomputation per (layer, chunk).
    train_base=False trains only what `memory_parameter_names` lists: every other parameter is
    frozen, LoRA adapters included (apply_lora's adapters train only with train_base=True).
    checkpoint_every steps (0: never) into checkpoint_dir, resumable exactly (RNG included).
    log_every: steps between log lines (0: none; `Trainer.history` gets every step). seed: the
    order of the samples (the ChunkPlanner draws chunk sizes from its own seed). progress: a tqdm
    bar over the steps.
    """

    total_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    memory_lr_mult: float = 5.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    bf16_autocast: bool = False
    recompute: bool = True
    train_base: bool = True
    checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    log_every: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, low in (("total_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0),
                          ("checkpoint_every", 0), ("log_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "memory_lr_mult"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.min_lr_ratio, (int, float)) or not 0 <= self.min_lr_ratio <= 1:
            # (below 0 the cosine decay turns the learning rate negative: gradient ascent)
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not self.max_grad_norm > 0:  # clip_grad_norm_ to 0 would zero every gradient: no training at all
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0 (float('inf') for no clipping), "
                             f"got {self.max_grad_norm}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("TrainConfig: checkpoint_every needs a checkpoint_dir")


def memory_parameter_names(model) -> set[str]:
    """Parameters that are new with CoMeT: memory modules and the token embeddings."""
    return {n for n, _ in model.named_parameters()
            if n.startswith(("memory_layers.", "memory_embeddings."))}


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    mem = memory_parameter_names(model)
    memory_params = [p for n, p in model.named_parameters() if n in mem and p.requires_grad]
    base_params = [p for n, p in model.named_parameters() if n not in mem and p.requires_grad]
    if not cfg.train_base:
        for p in base_params:
            p.requires_grad_(False)
        base_params = []
    groups = [{"params": memory_params, "lr": cfg.lr * cfg.memory_lr_mult, "name": "memory"}]
    if base_params:
        groups.append({"params": base_params, "lr": cfg.lr, "name": "base"})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA peak allocated on a GPU, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def saved_for_backward_mb(forward: Callable[[], torch.Tensor]) -> float:
    """Runs forward() (returning a loss) and its backward; -> the MB autograd kept for
    backward in between, each storage counted once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(seen.values()) / 2**20


class Trainer:
    """Trains a CometForCausalLM on a list of Samples (see comet_ext.data)."""

    def __init__(self, model, samples: Sequence[Sample], cfg: TrainConfig, planner: ChunkPlanner,
                 pad_id: int = 0, on_step: Optional[Callable[[dict], None]] = None,
                 pipeline_group=None, data_group=None):
        """pipeline_group / data_group (comet_ext.parallel.make_mesh): with a pipeline
        group, each step runs the layer-level pipeline over its ranks; with a data
        group, replicas see different batches and average their gradients."""
        if not samples:
            raise ValueError("Trainer: no training samples")
        empty = [i for i, sample in enumerate(samples) if len(sample) == 0]
        if empty:  # (found here, not when a batch of them is drawn hours in)
            raise ValueError(f"Trainer: samples {empty[:10]}{' ...' if len(empty) > 10 else ''} hold no token")
        vocab = model.get_input_embeddings().num_embeddings
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab:
            raise ValueError(f"Trainer: pad_id must be a token id in [0, {vocab}) (the vocabulary), got {pad_id!r}")
        self.model, self.samples, self.cfg, self.planner = model, list(samples), cfg, planner
        self.pad_id, self.on_step = pad_id, on_step
        self.pipeline_group, self.data_group = pipeline_group, data_group
        if data_group is not None:
            import torch.distributed as dist

            self.data_rank, self.data_size = dist.get_rank(data_group), dist.get_world_size(data_group)
        else:
            self.data_rank, self.data_size = 0, 1
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ data

    def batch_indices(self, step: int, micro: int) -> list[int]:
        """Sample indices of one micro-batch: epochs of seeded permutations, a pure
        function of (seed, step, micro, data rank)."""
        first = ((step * self.cfg.grad_accum + micro) * self.data_size + self.data_rank) * self.cfg.batch_size
        out = []
        for pos in range(first, first + self.cfg.batch_size):
            epoch, i = divmod(pos, len(self.samples))
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.samples))
            out.append(int(perm[i]))
        return out

    # ------------------------------------------------------------------ loop

    def train(self, steps: Optional[int] = None) -> list[dict]:
        """Runs up to `steps` more optimizer steps (default: to total_steps)."""
        model, cfg = self.model, self.cfg
        end = cfg.total_steps if steps is None else min(cfg.total_steps, self.step + steps)
        model.train()
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, unit="step", desc="comet train")
        while self.step < end:
            t0 = time.perf_counter()
            tokens, loss_sum = 0, 0.0
            self.optimizer.zero_grad(set_to_none=True)
            batches = [collate([self.samples[i] for i in self.batch_indices(self.step, micro)], self.pad_id)
                       for micro in range(cfg.grad_accum)]
            divisor = self._step_divisor(batches)
            for micro, batch in enumerate(batches):
                T = batch["input_ids"].shape[1]
                strategy, sizes = self.planner.plan(T, self.step * cfg.grad_accum + micro,
                                                    batch["input_ids"][0].tolist())
                batch = {k: v.to(model.device) for k, v in batch.items()}
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                    loss = self._loss(batch, sizes, divisor)  # this micro-batch's share of the step's mean
                loss.backward()
                loss_sum += self._global_loss(loss)
                tokens += int(batch["attention_mask"].sum())
            loss_sum = self._mean_over_data(loss_sum)
            if not math.isfinite(loss_sum):  # (on every rank alike: they all hold the step's loss)
                raise FloatingPointError(f"step {self.step}: the loss is {loss_sum}")
            self._reduce_grads()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            seconds = time.perf_counter() - t0
            record = {"step": self.step, "loss": loss_sum, "grad_norm": float(grad_norm),
                      "lr": self.optimizer.param_groups[-1]["lr"], "tokens_per_s": tokens / seconds,
                      "peak_mem_mb": peak_memory_mb(model.device), "chunks": len(sizes), "strategy": strategy}
            self.history.append(record)
            if self.on_step is not None:
                self.on_step(record)
            if cfg.log_every and self.step % cfg.log_every == 0:
                log.info("step %d loss %.4f tokens/s %.0f peak %.0f MB", self.step, record["loss"],
                         record["tokens_per_s"], record["peak_mem_mb"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self._is_main():
                self.save_checkpoint(os.path.join(cfg.checkpoint_dir, f"step-{self.step:07d}"))
        if bar is not None:
            bar.close()
        return self.history

    def _step_divisor(self, batches: list[dict]) -> float:
        """What each micro-batch's summed loss is divided by, so that a step's gradient is the mean
        over every labelled token of it (all its micro-batches, all data-parallel replicas, whose
        gradients are then averaged) however the step is split: a micro-batch with few labelled
        tokens weighs that little (a mean per micro-batch would over-weight short answers)."""
        labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        if self.data_group is None:
            return float(max(labelled, 1))
        import torch.distributed as dist

        total = torch.tensor(float(labelled), device=self.model.device)
        dist.all_reduce(total, group=self.data_group)
        return max(float(total), 1.0) / dist.get_world_size(self.data_group)

    def _loss(self, batch: dict, sizes: list[int], divisor: float):
        if self.pipeline_group is None:
            return self.model(batch["input_ids"], labels=batch["labels"], chunk_sizes=sizes,
                              attention_mask=batch["attention_mask"], recompute=self.cfg.recompute,
                              return_logits=False, num_items_in_batch=divisor).loss
        from .parallel import pipeline_loss

        return pipeline_loss(self.model, batch["input_ids"], batch["labels"], sizes, batch["attention_mask"],
                             recompute=self.cfg.recompute, group=self.pipeline_group, num_items_in_batch=divisor)

    def _global_loss(self, loss) -> float:
        """The step's loss as one process would report it (summed over pipeline stages)."""
        if self.pipeline_group is None:
            return loss.item()
        import torch.distributed as dist

        total = loss.detach().clone()
        dist.all_reduce(total, group=self.pipeline_group)
        return total.item()

    def _mean_over_data(self, loss: float) -> float:
        """The step's loss over every data replica: each replica's is its tokens' share of the step's
        token mean (`_step_divisor`), so their mean is the step's mean."""
        if self.data_group is None:
            return loss
        import torch.distributed as dist

        total = torch.tensor([loss], dtype=torch.float64, device=self.model.device)
        dist.all_reduce(total, group=self.data_group)
        return total.item() / self.data_size

    def _reduce_grads(self) -> None:
        from .parallel import all_reduce_grads, average_over_data

        if self.pipeline_group is not None:
            all_reduce_grads(self.model, self.pipeline_group)
        average_over_data(self.model, self.data_group)

    def _is_main(self) -> bool:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: str) -> None:
        """Everything to resume exactly, written to a temporary folder and renamed into place
        (the previous checkpoint is deleted only once the new one is there). `folder` must be
        new, empty or an earlier checkpoint: one holding anything else is refused, since the
        save replaces it whole."""
        def fill(tmp: str) -> None:
            self.model.save_pretrained(os.path.join(tmp, "model"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "step": self.step, "history": self.history, "rng": _rng_state(),
                        "data_size": self.data_size, "model_save_id": checkpoint.save_id(os.path.join(tmp, "model"))},
                       os.path.join(tmp, "trainer.pt"))
            with open(os.path.join(tmp, "train_config.json"), "w") as f:
                json.dump(dataclasses.asdict(self.cfg), f, indent=1)
        atomic_folder(folder, fill, replaces=CHECKPOINT_ENTRIES)

    # TrainConfig fields a resumed run may change: how long it runs, how it logs and checkpoints
    RESUMABLE_CHANGES = ("total_steps", "checkpoint_every", "checkpoint_dir", "log_every", "progress")

    def _check_same_run(self, folder: str, saved, state: dict) -> None:
        """A ValueError unless the checkpoint's CoMeT config, TrainConfig (but for
        RESUMABLE_CHANGES) and number of data replicas are this trainer's: resuming under others
        continues another run (another memory layout, data order, schedule) while claiming to be
        this one."""
        if state.get("data_size", self.data_size) != self.data_size:  # (older checkpoints lack it)
            raise ValueError(f"load_checkpoint: {folder!r} was trained with {state['data_size']} data replicas, "
                             f"this trainer has {self.data_size}: the batches each replica reads would change "
                             f"(samples read twice or skipped); resume with the same data-parallel size")
        diff = _differences(saved.comet_config.to_dict(), self.model.comet_config.to_dict())
        if diff:
            raise ValueError(f"load_checkpoint: {folder!r} was trained with another CoMeT config; differences "
                             f"(checkpoint, this model): {diff}")
        config = os.path.join(folder, "train_config.json")
        if os.path.isfile(config):  # (older checkpoints may lack it)
            with open(config) as f:
                was = json.load(f)
            now = json.loads(json.dumps(dataclasses.asdict(self.cfg)))  # (tuples as JSON lists, as saved)
            diff = {k: v for k, v in _differences(was, now).items() if k not in self.RESUMABLE_CHANGES}
            if diff:
                raise ValueError(f"load_checkpoint: {folder!r} was trained with other TrainConfig settings; "
                                 f"differences (checkpoint, this trainer): {diff}. Only "
                                 f"{', '.join(self.RESUMABLE_CHANGES)} may change on resume")

    def load_checkpoint(self, folder: str) -> None:
        """Restores the model weights, optimizer, scheduler, data position and torch's random
        number generators (CPU and CUDA). Everything is read and checked before anything is
        restored: a checkpoint that fails to load leaves the trainer as it was."""
        from .modeling import CometForCausalLM

        path = os.path.join(folder, "trainer.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_checkpoint: {folder!r} holds no trainer.pt")
        try:  # (tensors, numbers and containers only: no code runs from a checkpoint's pickle)
            state = torch.load(path, map_location=self.model.device, weights_only=True)
        except Exception as e:
            raise ValueError(f"load_checkpoint: {path!r} cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or not {"optimizer", "scheduler", "step", "history"} <= set(state):
            raise ValueError(f"load_checkpoint: {path!r} is not a Trainer checkpoint's trainer.pt")
        model_id = checkpoint.save_id(os.path.join(folder, "model"))
        if state.get("model_save_id") is not None and model_id != state["model_save_id"]:  # (older: no id)
            raise ValueError(f"load_checkpoint: {os.path.join(folder, 'model')!r} is not the model saved with "
                             f"{path!r} (save ids {model_id} and {state['model_save_id']}): the folder mixes two "
                             f"checkpoints, and resuming would pair one step's weights with another's optimizer "
                             f"state; use a checkpoint folder as save_checkpoint wrote it")
        saved = CometForCausalLM.from_pretrained(os.path.join(folder, "model"), dtype=self.model.dtype)
        self._check_same_run(folder, saved, state)
        weights, ours = saved.state_dict(), self.model.state_dict()
        diff = sorted(k for k in set(weights) | set(ours)
                      if k not in weights or k not in ours or weights[k].shape != ours[k].shape)
        if diff:  # (load_state_dict would raise only after copying what matched)
            raise ValueError(f"load_checkpoint: {folder!r} holds a model of other weights than this trainer's "
                             f"(e.g. LoRA adapters applied to one of them only); keys that differ or are "
                             f"missing: {diff[:8]}{' ...' if len(diff) > 8 else ''}")
        self.optimizer.load_state_dict(state["optimizer"])  # (checks its groups before changing anything)
        self.model.load_state_dict(weights)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        if "rng" in state:  # what dropout (LoRA's, the model's) draws next; older checkpoints lack it
            _set_rng_state(state["rng"])


def _differences(saved: dict, now: dict) -> dict:
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _rng_state() -> dict:
    """torch's generator states: the CPU one and each CUDA device's (dropout draws from them)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][: torch.cuda.device_count()])
