"""Fine-tune a decoder into a CoMeT model with comet_ext.training.

    python examples/finetune.py                                   # tiny built-in model, synthetic task
    python examples/finetune.py --model path/to/Qwen3-0.6B --data chats.jsonl --chunk-size 2048 \\
        --steps 2000 --lr 2e-5 --bf16 --out runs/qwen3-comet

--model: a local HF causal LM folder (Llama / Mistral / Qwen2 / Qwen3), or
"tiny" for a small random Qwen3 with the byte-level tokenizer. --data: a JSONL
file in the reference chat format (loss on assistant turns), or "synthetic"
for the built-in long-document recall task. Runs on this CPU in a few minutes
with the defaults, and unchanged on a GPU.

Across processes (layer-level pipeline x data parallel), launched by torchrun:

    torchrun --nproc-per-node 4 examples/finetune.py --pipeline 2     # 2 replicas x 2 stages
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile

import torch

from comet_ext import CometConfig, CometForCausalLM
from comet_ext.data import byte_tokenizer, read_chat_jsonl, synthetic_recall
from comet_ext.planner import ChunkPlanner
from comet_ext.training import TrainConfig, Trainer


def build_model(name: str, comet: CometConfig, dtype: torch.dtype):
    if name == "tiny":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        tok = byte_tokenizer()
        config = Qwen3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             max_position_embeddings=8192, tie_word_embeddings=True)
        return CometForCausalLM.from_base(Qwen3ForCausalLM(config).to(dtype), comet), tok
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    return CometForCausalLM.from_base(name, comet, dtype=dtype), tok


def unwritable(folder: str):
    """Why `folder` cannot be made a folder this process writes files in (creating it, as training
    would), or None if it can."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--max-tokens", type=int, default=1024, help="longest training sample (longer ones are skipped)")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--num-global", type=int, default=16)
    ap.add_argument("--temp-stride", type=int, default=8)
    ap.add_argument("--temp-budget", type=int, default=64)
    ap.add_argument("--rla-rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--memory-lr-mult", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--no-recompute", action="store_true", help="keep activations instead of recomputing")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", help="a checkpoint folder written by this script")
    ap.add_argument("--out", default="runs/finetune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pipeline", type=int, default=1, help="pipeline stages per replica (under torchrun)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on the base weights (0: full fine-tuning)")
    args = ap.parse_args()
    # every argument checked before the model is built: a mistake found after training loses it
    for name in ("steps", "batch_size", "grad_accum", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model != "tiny" and not os.path.isdir(args.model):
        ap.error(f"--model {args.model}: no such folder (a local Hugging Face model folder, or 'tiny')")
    if args.data != "synthetic" and not os.path.isfile(args.data):
        ap.error(f"--data {args.data}: no such file (a chat JSONL file, or 'synthetic')")
    if args.resume and not os.path.isfile(os.path.join(args.resume, "trainer.pt")):
        ap.error(f"--resume {args.resume}: not a checkpoint of this script (a folder holding trainer.pt, "
                 "e.g. OUT/checkpoints/step-0000100)")
    try:
        comet = CometConfig(chunk_size=args.chunk_size, num_global=args.num_global, temp_stride=args.temp_stride,
                            temp_budget=args.temp_budget, rla_rank=args.rla_rank)
        cfg = TrainConfig(total_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          lr=args.lr, memory_lr_mult=args.memory_lr_mult, warmup_steps=args.warmup,
                          bf16_autocast=args.bf16, recompute=not args.no_recompute,
                          checkpoint_every=args.checkpoint_every,
                          checkpoint_dir=os.path.join(args.out, "checkpoints"), seed=args.seed)
    except ValueError as e:
        ap.error(str(e))
    why = unwritable(args.out)
    if why is None and os.path.exists(os.path.join(args.out, "model")) and not os.path.isdir(
            os.path.join(args.out, "model")):
        why = f"{os.path.join(args.out, 'model')} is a file"
    if why is not None:
        ap.error(f"--out {args.out}: cannot write the model there ({why})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)

    model, tok = build_model(args.model, comet, torch.float32)
    if args.lora:
        from comet_ext.lora import apply_lora

        logging.info("LoRA rank %d: %d trainable parameters", args.lora, apply_lora(model, rank=args.lora))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline_group = data_group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from comet_ext.parallel import make_mesh

        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        pipeline_group, data_group = make_mesh(args.pipeline)
    elif args.pipeline > 1:
        raise SystemExit("--pipeline needs several processes: launch with torchrun --nproc-per-node N")
    model.to(device)
    if args.data == "synthetic":
        samples = synthetic_recall(256, args.max_tokens, vocab=256, seed=args.seed)
    else:
        samples, problems = read_chat_jsonl(args.data, tok, max_tokens=args.max_tokens)
        logging.info("%d samples, %d lines skipped", len(samples), len(problems))
        if not samples:
            ap.error(f"--data {args.data}: no usable sample in it ({len(problems)} lines skipped"
                     + (f"; the first: {problems[0]}" if problems else "") + ")")
    planner = ChunkPlanner(args.chunk_size, min_size=max(1, args.chunk_size // 4), seed=args.seed)
    trainer = Trainer(model, samples, cfg, planner, pad_id=tok.pad_token_id or 0,
                      pipeline_group=pipeline_group, data_group=data_group)
    if args.resume:
        trainer.load_checkpoint(args.resume)
        logging.info("resumed at step %d", trainer.step)
    history = trainer.train()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.lora:
        from comet_ext.lora import merge_lora

        merge_lora(model)
    model.save_pretrained(os.path.join(args.out, "model"))
    tok.save_pretrained(os.path.join(args.out, "model"))
    logging.info("done: loss %.3f -> %.3f, model in %s", history[0]["loss"], history[-1]["loss"],
                 os.path.join(args.out, "model"))


if __name__ == "__main__":
    main()
