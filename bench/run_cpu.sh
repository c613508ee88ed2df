#!/usr/bin/env bash
# Runs the CPU op benchmarks and writes bench/results/cpu_ops.md (+ the raw JSON).
#   bash bench/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
cmd="bash bench/run_cpu.sh"
python -m pytest bench/bench_prefix_attention.py bench/bench_rla.py bench/bench_gated_update.py \
  bench/bench_fifo.py -q -p no:cacheprovider --benchmark-only --benchmark-json="$out/cpu_ops.json" \
  --benchmark-columns=median,iqr,rounds
python bench/peak_memory.py --json "$out/cpu_memory.json"
python bench/report.py "$out/cpu_ops.json" --memory "$out/cpu_memory.json" \
  --command "$cmd" --title "comet_ext CPU op benchmarks" --out "$out/cpu_ops.md"
