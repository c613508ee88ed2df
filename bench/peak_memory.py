"""Peak extra memory (RSS) of prefix_attention forward vs torch SDPA, per size.

Each measurement runs in a fresh process: inputs are built, the peak-RSS
counter is reset (/proc/self/clear_refs), the op runs once, and the growth of
VmHWM over the pre-call RSS is the op's peak extra memory. The score matrix
grows with N * (P + N); comet's extra memory must not.

    python bench/peak_memory.py --json out.json
"""
from __future__ import annotations

import argparse
import json

from child import run_child  # bench/child.py

SIZES = [(704, 640), (1408, 1280), (2816, 2560), (5632, 5120)]  # (N, P)

CHILD = r"""
import sys, torch, comet_ext
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
provider, N, P = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_grad_enabled(False)
q = torch.randn(1, N, 8, 128); k = torch.randn(1, P + N, 2, 128); v = torch.randn(1, P + N, 2, 128)
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
if provider == "comet":
    comet_ext.ops.prefix_attention(q[:, :8], k[:, :16], v[:, :16])  # warm the thread pool
    run = lambda: comet_ext.ops.prefix_attention(q, k, v)
else:
    F.scaled_dot_product_attention(q[:, :8].transpose(1, 2), k[:, :16].transpose(1, 2), v[:, :16].transpose(1, 2), enable_gqa=True)
    mask = causal_lower_right(N, P + N)
    run = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS:")
out = run()
print((kb("VmHWM:") - before) / 1024)
"""


def measure(provider: str, n: int, p: int) -> float:
    res = run_child(CHILD, provider, str(n), str(p), check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = []
    for n, p in SIZES:
        row = {"N": n, "P": p, "heads": "8/2", "head_dim": 128}
        for provider in ("comet", "sdpa"):
            row[f"{provider}_peak_extra_mb"] = measure(provider, n, p)
        row["output_mb"] = n * 8 * 128 * 4 / 2**20
        rows.append(row)
        print(row, flush=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
