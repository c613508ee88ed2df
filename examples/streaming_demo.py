"""Stream a long synthetic document through a tiny CoMeT model, then generate from its memory.

    python examples/streaming_demo.py --length 131072

The model is a small random Qwen3 with CoMeT at the reference defaults (chunk
2048, 512 global slots, FIFO of 2048, stride 8), built offline from a config:
it demonstrates the mechanics — linear time, constant memory, generation from
the memory, memory saved and reloaded — not answers (the trained passkey model
arrives with its own issue). The memory's size does not depend on --length.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from comet_ext import CometConfig, CometForCausalLM, CometMemory


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=65536, help="document length in tokens")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.length < 1:
        ap.error(f"--length must be >= 1, got {args.length}")
    if args.new_tokens < 0:
        ap.error(f"--new-tokens must be >= 0, got {args.new_tokens}")

    torch.manual_seed(args.seed)
    config = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    model = CometForCausalLM.from_base(Qwen3ForCausalLM(config), CometConfig()).eval()
    document = torch.randint(0, 256, (1, args.length))
    question = torch.randint(0, 256, (1, 16))
    print(f"model: tiny Qwen3 (hidden 256, 2 layers) + {model.comet_config}")

    start = time.perf_counter()
    memory = model.read(document, progress=True)
    seconds = time.perf_counter() - start
    print(f"read {args.length} tokens in {seconds:.1f} s ({args.length / seconds:.0f} tokens/s); "
          f"memory {memory.nbytes() / 2**20:.1f} MB, whatever the length; peak RSS {peak_rss_mb():.0f} MB")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.safetensors")
        memory.save(path)
        reloaded = CometMemory.load(path, model)
        print(f"memory saved and reloaded ({os.path.getsize(path) / 2**20:.1f} MB file)")

    start = time.perf_counter()
    out = model.generate(question, memory=reloaded, max_new_tokens=args.new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    again = model.generate(question, memory=memory, max_new_tokens=args.new_tokens, do_sample=False)
    print(f"generated {args.new_tokens} tokens from the memory in {seconds:.2f} s: {out[0, 16:].tolist()}")
    print(f"same tokens from the in-process memory: {torch.equal(out, again)}")
    assert torch.equal(out, again)


if __name__ == "__main__":
    main()
