"""Turns one pytest-benchmark JSON run (+ optional peak-memory JSON) into the
markdown table of ratios committed under bench/results/.

    python bench/report.py ops.json --memory mem.json --command "..." --out bench/results/cpu_ops.md

Speedup = baseline median / comet median, both from the same run (> 1: comet is faster).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict

import torch

# Modes of the memory-bound ops whose bandwidth is reported (forward passes only); on a GPU,
# bench/conftest.py also measures their device time.
BANDWIDTH_MODES = ("fwd", "cold", "plain", "rope")


def machine(kernels_target: bool = True) -> str:
    """CPU, cores, torch and threads, the CPU kernels' build target (kernels_target) and the GPU."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{_kernels_target() if kernels_target else ''}{gpu}")


def _kernels_target() -> str:
    """The CPU kernels' build target (COMET_CPU_ARCH), which their timings depend on."""
    try:
        import comet_ext
        arch = comet_ext.build_info().get("cpu_arch")
    except (ImportError, AttributeError):
        return ""
    return f", CPU kernels for {arch}" if arch else ""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StaleBuild(SystemExit):
    """The comet_ext a benchmark imports was not built from this tree."""


_CHECKED: list[str] = []


def measured_build() -> str:
    """The folder holding the comet_ext package this process imports, checked to be this tree's
    code: its _C built from this tree's sources (the digest setup.py records), and, when it is
    an installed copy, the same Python files. Benchmark children import the same package
    (bench/child.py). A stale build would otherwise be timed and recorded under this tree's
    commit (a `pip install .` left from an earlier commit shadows the tree from bench/).
    Raises StaleBuild (a SystemExit saying how to rebuild) when it is not."""
    if _CHECKED:
        return _CHECKED[0]
    import filecmp
    import sys

    import comet_ext

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from build_env import source_digest
    finally:
        sys.path.pop(0)
    package = os.path.dirname(os.path.abspath(comet_ext.__file__))
    built, tree = comet_ext.build_info().get("source_digest"), source_digest(ROOT)
    if built != tree:
        why = f"its _C was built from other sources (digest {built or 'not recorded'}, this tree's {tree})"
    elif os.path.realpath(package) == os.path.realpath(os.path.join(ROOT, "comet_ext")):
        why = None
    else:
        ours = os.path.join(ROOT, "comet_ext")
        names = sorted(n for n in os.listdir(ours) if n.endswith(".py") and n != "_build_info.py")
        differ = [n for n in names if not os.path.exists(os.path.join(package, n))
                  or not filecmp.cmp(os.path.join(ours, n), os.path.join(package, n), shallow=False)]
        why = f"its Python files differ from this tree's: {', '.join(differ)}" if differ else None
    if why:
        raise StaleBuild(
            f"bench: the comet_ext imported here ({package}) is not this tree's code: {why}. Its timings "
            f"would be recorded under this tree's commit. Build the tree in place and put it first "
            f"(`python setup.py build_ext --inplace`, then PYTHONPATH={ROOT}), or install it again "
            f"(`pip install --no-build-isolation .`).")
    _CHECKED.append(os.path.dirname(package))
    return _CHECKED[0]


def commit(check_build: bool = True) -> str:
    """The commit measured: $COMET_COMMIT when the caller names it (the device tool's copy of the
    tree carries a stale .git), else git's HEAD, marked when the tracked code (not results, not
    markdown) differs from it.
    Checks first that the comet_ext measured is this tree's (measured_build), unless check_build is
    False: the tree's commit before anything is built (device_check.sh's header)."""
    if check_build:
        measured_build()
    if os.environ.get("COMET_COMMIT"):
        return os.environ["COMET_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results",
                                ":!*.md"],  # prose changes nothing measured
                               capture_output=True, text=True)
    except OSError:  # no git at all
        return "unknown"
    if head.returncode != 0 or dirty.returncode != 0:  # not a repository (a copy of the tree)
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def ratio_tables(benchmarks: list[dict], gpu: dict | None = None) -> list[str]:
    """One table per op: a row per (case, mode), a column per baseline."""
    by_op = defaultdict(lambda: defaultdict(dict))
    for b in benchmarks:
        info = b["extra_info"]
        by_op[info["op"]][(info["case"], info["mode"])][info["provider"]] = b
    lines = []
    for op, cases in by_op.items():
        baselines = sorted({p for c in cases.values() for p in c} - {"comet"})
        lines += [f"### {op}", ""]
        extra = any("flops" in c["comet"]["extra_info"] for c in cases.values() if "comet" in c)
        unit = "TFLOP/s" if gpu else "GFLOP/s"
        head = (["case", "mode", "comet median (ms)"] + [f"speedup vs {p}" for p in baselines]
                + ([f"comet {unit}"] if extra else []))
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for (case, mode), provs in cases.items():
            if "comet" not in provs:
                continue
            ours = provs["comet"]["stats"]["median"]
            cells = []
            for p in baselines:
                cells.append(f"{provs[p]['stats']['median'] / ours:.2f}x" if p in provs else "n/a")
            row = f"| {case} | {mode} | {ours * 1e3:.2f} | " + " | ".join(cells) + " |"
            if extra:
                fl = provs["comet"]["extra_info"].get("flops")
                mult = 1 if mode == "fwd" else 3.5  # bwd ~ 2.5x the forward's matmuls
                rate = fl * mult / ours / (1e12 if gpu else 1e9) if fl else None
                row += (f" {rate:.1f} |" if gpu else f" {rate:.0f} |") if rate else " |"
            lines.append(row)
        lines.append("")
        if gpu and extra:
            lines += [f"(the card's bf16 matmul rate in this run: {gpu['bf16_matmul_tflops']:.0f} TFLOP/s)", ""]
    return lines


def bandwidth_lines(benchmarks: list[dict], gpu: dict) -> list[str]:
    """Memory-bound ops: achieved bytes / time as a share of the card's copy bandwidth."""
    lines = []
    for b in benchmarks:
        info = b["extra_info"]
        if info.get("provider") == "comet" and "bytes" in info and info["mode"] in BANDWIDTH_MODES:
            seconds = b["stats"]["median"]
            timing = "wall time per call, launch included"
            if "device_ms" in info:  # the kernel alone (bench/conftest.py device_ms)
                seconds, timing = info["device_ms"] / 1e3, "device time: " + info["device_timing"]
            gbps = info["bytes"] / seconds / 1e9
            lines.append(f"- {info['op']} {info['case']} {info['mode']}: {gbps:.0f} GB/s = "
                         f"{100 * gbps / gpu['d2d_copy_gbps']:.0f}% of the copy bandwidth ({timing})")
    return (["### Bandwidth of the memory-bound ops", ""] + lines + [""]) if lines else []


def capacity_lines(benchmarks: list[dict]) -> list[str]:
    push = {(b["extra_info"]["case"], b["extra_info"]["mode"]): b["stats"]["median"]
            for b in benchmarks
            if b["extra_info"]["op"] == "fifo_push" and b["extra_info"]["provider"] == "comet"}
    lines = []
    for cache in ("cold", "warm"):
        if ("C256", cache) in push and ("C4096", cache) in push:
            r = push[("C4096", cache)] / push[("C256", cache)]
            lines.append(f"- fifo_push time, capacity 4096 / capacity 256 ({cache} cache): **{r:.2f}x**")
    return lines


def memory_lines(rows: list[dict]) -> list[str]:
    lines = ["### prefix_attention peak extra memory (forward, fp32, 8/2 heads, head dim 128)", "",
             "| N | P | comet (MB) | torch SDPA (MB) | output alone (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['P']} | {r['comet_peak_extra_mb']:.1f} | "
                     f"{r['sdpa_peak_extra_mb']:.1f} | {r['output_mb']:.1f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmark_json")
    ap.add_argument("--memory", help="JSON from bench/peak_memory.py")
    ap.add_argument("--gpu-reference", help="JSON from bench/gpu_reference.py (matmul rate, copy bandwidth)")
    ap.add_argument("--command", required=True, help="the command that produced the numbers")
    ap.add_argument("--title", default="comet_ext op benchmarks")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.benchmark_json) as f:
        benchmarks = json.load(f)["benchmarks"]
    lines = [
        f"# {args.title}", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- commit: {commit()}",
        f"- command: `{args.command}`",
        "- speedup = baseline median / comet median, measured in the same run (> 1: comet faster)",
        "",
    ]
    gpu = None
    if args.gpu_reference and os.path.exists(args.gpu_reference):
        with open(args.gpu_reference) as f:
            gpu = json.load(f)
        lines += [f"- card yardsticks (same run): bf16 matmul {gpu['bf16_matmul_tflops']:.0f} TFLOP/s, "
                  f"device-to-device copy {gpu['d2d_copy_gbps']:.0f} GB/s", ""]
    lines += ratio_tables(benchmarks, gpu)
    if gpu:
        lines += bandwidth_lines(benchmarks, gpu)
    cap = capacity_lines(benchmarks)
    if cap:
        lines += ["### fifo_push against capacity", ""] + cap + [""]
    if args.memory:
        with open(args.memory) as f:
            lines += memory_lines(json.load(f))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
