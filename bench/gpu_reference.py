"""The card's own yardsticks for the GPU tables: bf16 matmul TFLOP/s and
device-to-device copy bandwidth, measured with CUDA events in this run.

    python bench/gpu_reference.py --json out.json
"""
from __future__ import annotations

import argparse
import json

import torch


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = 2 * n**3 / timed(lambda: a @ b) / 1e12
    src = torch.empty(512 * 2**20, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / timed(lambda: dst.copy_(src)) / 1e9  # read + write
    result = {"gpu": torch.cuda.get_device_name(), "bf16_matmul_tflops": mm, "d2d_copy_gbps": copy}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(result)


if __name__ == "__main__":
    main()
