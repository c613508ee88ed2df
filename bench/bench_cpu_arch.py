"""What a CPU kernel build costs or buys: the op library built once per variant into its own
copy of the source tree, then the same op cases timed in fresh processes, the variants taking
turns round after round; ratios against the first variant, from the same run.

Variants are build targets (COMET_CPU_ARCH) of this tree, against the compiler's default
target (portable):

    python bench/bench_cpu_arch.py --out bench/results/cpu_arch

or, with --commits, earlier commits against this tree (each at the default target, auto):
what a change to the kernels bought, measured in one run.

    python bench/bench_cpu_arch.py --commits 84eb04f --out bench/results/cpu_exp

Writes OUT.json and OUT.md. Needs git (the copies are the tracked + untracked files, or a
commit's tracked files).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from child import run_child
from report import commit, machine

from comet_ext.atomic import atomic_write, write_json, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process times every case for one target: medians (ms) as JSON on the last line.
TIMING = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import comet_ext
from comet_ext import ops
torch.manual_seed(0)

def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[reps // 2]

def attention_fwd_bwd(q, k, v):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = ops.prefix_attention(q, k, v, 128 ** -0.5)
    out.sum().backward()

cases = {}
for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
    q = torch.randn(1, 2816, 8, 128, dtype=dt)
    k, v = torch.randn(1, 5376, 2, 128, dtype=dt), torch.randn(1, 5376, 2, 128, dtype=dt)
    cases[f"prefix_attention fwd, 2816 queries over 5376 keys, {name}"] = (
        lambda q=q, k=k, v=v: ops.prefix_attention(q, k, v, 128 ** -0.5), 3)
    cases[f"prefix_attention fwd+bwd, same, {name}"] = (lambda q=q, k=k, v=v: attention_fwd_bwd(q, k, v), 3)
    qd, kd = torch.randn(4, 1, 16, 128, dtype=dt), torch.randn(4, 5376, 8, 128, dtype=dt)
    cases[f"prefix_attention decode, 4 x 1 query over 5376 keys, {name}"] = (
        lambda qd=qd, kd=kd: ops.prefix_attention(qd, kd, kd, 128 ** -0.5), 20)
    x, w = torch.randn(4096, 1024, dtype=dt), torch.randn(1024, dtype=dt)
    down, up = torch.randn(8, 1024, dtype=dt) * 0.03, torch.randn(1024, 8, dtype=dt) * 0.03
    cases[f"rla fwd, 4096 x 1024 rank 8, {name}"] = (lambda x=x, d=down, u=up, w=w: ops.rla(x, d, u, w, 1e-6), 20)
    r, s, g = torch.randn(8, 512, 1024, dtype=dt), torch.randn(8, 512, 1024, dtype=dt), torch.randn(1, 2048, dtype=dt)
    cases[f"gated_update fwd, 8 x 512 x 1024, {name}"] = (
        lambda r=r, s=s, w=w, g=g, d=down, u=up: ops.gated_update(r, s, w, g * 0.03, d, u, 1e-6), 20)
print(json.dumps({"build": comet_ext.build_info(), "ms": {c: median_ms(f, n) for c, (f, n) in cases.items()}}))
"""


def copy_tree(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        if rel.endswith(".so") or not os.path.isfile(os.path.join(ROOT, rel)):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def export_commit(rev: str, dest: str) -> None:
    """The tracked files of commit rev into dest."""
    os.makedirs(dest)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode != 0:
        sys.exit(f"git archive {rev} failed: {archive.stderr.decode(errors='replace')[-500:]}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)


def build(tree: str, target: str) -> None:
    env = dict(os.environ, COMET_CUDA="0", COMET_CPU_ARCH=target)
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"building for {target} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=["portable", "auto", "native"],
                    help="COMET_CPU_ARCH values; the first is the baseline")
    ap.add_argument("--commits", nargs="+", metavar="REV",
                    help="compare these commits (the first the baseline) with this tree, all at COMET_CPU_ARCH=auto, "
                         "instead of build targets")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True, help="path prefix of the .json / .md written")
    args = ap.parse_args()
    # variant name -> (commit to export, or None for this tree; COMET_CPU_ARCH)
    if args.commits:
        revs = [subprocess.run(["git", "rev-parse", "--short", r], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip() for r in args.commits]
        variants = {**{r: (r, "auto") for r in revs}, "this tree": (None, "auto")}
    else:
        variants = {t: (None, t) for t in args.targets}
    names = list(variants)
    ms: dict[str, dict[str, list[float]]] = {t: {} for t in names}
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for i, (t, (rev, target)) in enumerate(variants.items()):
            trees[t] = os.path.join(tmp, str(i))
            if rev:
                export_commit(rev, trees[t])
            else:
                copy_tree(trees[t])
            print(f"building {t} for COMET_CPU_ARCH={target} ...", flush=True)
            build(trees[t], target)
        for rnd in range(args.rounds):
            for t in names:  # turns, so that drift on a shared machine hits every variant alike
                res = run_child(TIMING, trees[t])
                if res.returncode != 0:
                    sys.exit(f"timing {t} failed:\n{res.stderr[-3000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                builds[t] = row["build"]
                for case, v in row["ms"].items():
                    ms[t].setdefault(case, []).append(v)
                print(f"round {rnd + 1}/{args.rounds} {t}: done", flush=True)
    med = {t: {c: statistics.median(v) for c, v in cases.items()} for t, cases in ms.items()}
    base = names[0]
    atomic_write(args.out + ".json", lambda p: write_json(
        p, {"variants": {t: {"commit": rev, "cpu_arch": target} for t, (rev, target) in variants.items()},
            "builds": builds, "ms": ms, "median_ms": med}))
    if args.commits:
        label = {t: f"{t} ({builds[t]['cpu_arch']})" for t in names}
        title, flag, against = ("CPU kernels: earlier commits vs this tree", f"--commits {' '.join(args.commits)} ",
                                f"than {base}")
    else:
        label = {t: f"{t} ({builds[t]['cpu_arch']})" if builds[t]["cpu_arch"] != t else t for t in names}
        title, flag, against = ("CPU kernels: build target (COMET_CPU_ARCH) vs speed", "",
                                "than the compiler's default target")
    lines = [
        f"# {title}", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine(kernels_target=False)}",  # each column is its own build
        f"- commit: {commit()}",
        f"- command: `python bench/bench_cpu_arch.py {flag}--rounds {args.rounds} "
        f"--out {os.path.relpath(args.out, ROOT)}`",
        f"- speedup = {base} median / variant median, the median of {args.rounds} rounds in which the "
        f"variants take turns (> 1: faster {against})",
        "",
        f"| case | {label[base]} (ms) | " + " | ".join(f"{label[t]}" for t in names[1:]) + " |",
        "|---|---|" + "---|" * (len(names) - 1),
    ]
    for case in med[base]:
        cells = [f"{med[base][case] / med[t][case]:.2f}x" for t in names[1:]]
        lines.append(f"| {case} | {med[base][case]:.2f} | " + " | ".join(cells) + " |")
    if not args.commits:
        lines += ["", "ISA extensions each target lets the compiler use (checked against the CPU at import):", ""]
        lines += [f"- {label[t]}: {', '.join(builds[t]['cpu_features']) or 'none beyond the default'}"
                  for t in names]
    atomic_write(args.out + ".md", lambda p: write_text(p, "\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
