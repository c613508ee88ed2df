"""End to end: CoMeT streaming vs the same base model with HF full attention
(sdpa, KV cache) vs the naive reference-structure CoMeT oracle — prefill time and
peak memory against input length, and decode speed after it.

    python bench/bench_e2e.py --device cpu --model-shape tiny --out bench/results/e2e_cpu
    python bench/bench_e2e.py --device cuda --model-shape qwen3-0.6b --out $OUT/e2e_gpu   # on a GPU
    pytest bench/bench_e2e.py --benchmark-only    # the same points under pytest-benchmark

Under pytest, COMET_BENCH_DEVICE (default cpu), COMET_E2E_SHAPE (default tiny)
and COMET_E2E_LENGTHS (default "4096 16384") choose the points; each point's
measurements (prefill_s, decode_tok_s, extra_mb, ...) go into the benchmark's
extra_info, and its timed round is the whole point (its process and model
build included), so read the ratios from extra_info, not from the timing column.

CoMeT's read also marks the end of each of its steps (a chunk each), so that the table can
compare a chunk's cost at 64k, 256k and 1M tokens within one read, one process: the
ratio of two points also holds whatever the shared machine's speed did between them.

Every (method, length) point runs in a fresh process (peak memory is per
process: CUDA peak allocated on GPU, peak RSS on CPU). Models have random
weights built from configs (no download): "tiny" (hidden 256, 2 layers, 4/2
heads of dim 64, fp32) and "qwen3-0.6b" (Qwen3-0.6B's published shape, bf16).
CoMeT runs at the reference defaults (chunk 2048, 512 global slots, FIFO 2048,
stride 8). Full attention runs up to --full-max tokens (longer points are
marked, not extrapolated here); the naive oracle up to --naive-max. With
--cuda-graphs (GPU) CoMeT also runs with its steps recorded as CUDA graphs
(CometForCausalLM.use_cuda_graphs), as a method of its own, "comet-graphs". With
--profile, each CoMeT method's process at the longest length then reads one more chunk
and decodes 16 tokens under torch.profiler: PREFIX_profile_METHOD.txt holds the top ops,
and the table's notes compare the wall time with the device's busy time (host- or
device-bound).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import pytest

from child import run_child  # bench/child.py

CHILD = r"""
import json, os, sys, time, torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from comet_ext import CometConfig, CometForCausalLM
method, T, device, shape, n_new = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
profile_to = sys.argv[6] if len(sys.argv) > 6 else ""
torch.manual_seed(0)
if shape == "tiny":
    cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1 << 21)
    dtype = torch.float32
else:  # Qwen3-0.6B's published shape
    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 21,
                      tie_word_embeddings=True, rope_theta=1000000.0)
    dtype = torch.bfloat16
cfg._attn_implementation = "sdpa"
with torch.device(device):  # random init on the device itself: seconds, not a CPU init of 0.6B weights
    base = Qwen3ForCausalLM(cfg)
base = base.to(dtype).eval()
ids = torch.randint(0, cfg.vocab_size, (1, T), device=device)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
def peak_mb():
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mb("VmHWM:")
def reset_peak():
    # Peak growth over the process's footprint once the model is built (weights, libraries).
    if device.startswith("cuda"):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    open("/proc/self/clear_refs", "w").write("5")
    return status_mb("VmRSS:")
def profile_step(model, memory, chunk, prompt, path):
    # One more full chunk read into the (by now full) memory, then 16 decoded tokens, under
    # torch.profiler: is a step bound by the host (launching) or by the device, and by which ops?
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    out, text = {}, []
    read = lambda: model.read(chunk, memory=memory, progress=False)
    decode = lambda: model.generate(prompt, memory=memory, max_new_tokens=16, do_sample=False)
    for name, fn, per in (("read one chunk", read, 1), ("decode 16 tokens", decode, 16)):
        sync()
        with profile(activities=acts) as prof:
            start = time.perf_counter(); fn(); sync(); wall = time.perf_counter() - start
        events = prof.key_averages()
        # self times count each op's own work once: host time in ops, and device time in the
        # kernel and copy rows (summed as the table's footer does; op rows would count it again)
        host = sum(e.self_cpu_time_total for e in events) / 1e3
        dev = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e3
        key = "read" if per == 1 else "decode"
        out.update({f"profile_{key}_wall_ms": wall * 1e3 / per, f"profile_{key}_host_ms": host / per,
                    f"profile_{key}_device_ms": dev / per})
        text += [f"## {name} ({method}, {T} tokens read, {device}, {shape})", "",
                 f"wall {wall * 1e3:.1f} ms; self time in ops: host {host:.1f} ms, device {dev:.1f} ms "
                 f"(device busy {dev / (wall * 1e3):.0%} of the wall time)", "",
                 events.table(sort_by=sort, row_limit=25), ""]
    with open(path, "w") as f:
        f.write("\n".join(text))
    return out
result = {"method": method, "tokens": T, "mma_kernels": os.environ.get("COMET_MMA_KERNELS") or "v1"}
with torch.no_grad():
    if method in ("comet", "comet-graphs"):
        model = CometForCausalLM.from_base(base, CometConfig()).eval()
        model.use_cuda_graphs(method == "comet-graphs")
        model.read(ids[:, :256], progress=False)
        base_mb = reset_peak()
        # The input's last chunks are timed on their own: the cost of a token at that length,
        # which is what "linear time" keeps flat (the average also holds the FIFO's fill-up).
        cs = model.comet_config.chunk_size
        tail = min(T // 2, 4 * cs) // cs * cs or T
        # Every streaming step's end is marked (a CUDA event on a GPU: no wait), so that a chunk's
        # cost at different depths of one read compares within one process, free of the drift
        # between processes that the points' own times carry.
        def mark():
            if not device.startswith("cuda"):
                return time.perf_counter()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        marks, step = [(0, mark())], model._stream_step
        def marked_step(memory, tokens, take, *args, **kwargs):
            out = step(memory, tokens, take, *args, **kwargs)
            marks.append((marks[-1][0] + take[0], mark()))
            return out
        model._stream_step = marked_step
        sync(); start = time.perf_counter()
        memory = model.read(ids[:, :T - tail], progress=False) if T > tail else None
        sync(); mid = time.perf_counter()
        memory = model.read(ids[:, T - tail:], memory=memory, progress=False)
        sync(); end = time.perf_counter()
        del model._stream_step
        ms = [(b[0], (b[1] - a[1]) * 1e3 if isinstance(b[1], float) else a[1].elapsed_time(b[1]))
              for a, b in zip(marks, marks[1:])]
        def chunk_ms_before(depth):  # the median of the 24 steps (whole chunks) ending at or before depth
            window = sorted(t for end_, t in ms if depth - 24 * cs < end_ <= depth)
            return window[len(window) // 2]
        result["chunk_ms_at"] = {str(d): chunk_ms_before(d) for d in (65536, 262144, 1048576) if d <= T}
        result["prefill_s"] = end - start
        result["tail_tokens"] = tail
        result["tail_us_per_token"] = (end - mid) / tail * 1e6
        prompt = ids[:, :1]
        sync(); start = time.perf_counter()
        model.generate(prompt, memory=memory, max_new_tokens=n_new, do_sample=False)
        sync(); result["decode_tok_s"] = n_new / (time.perf_counter() - start)
    elif method == "full":
        base(ids[:, :256])
        base_mb = reset_peak()
        sync(); start = time.perf_counter()
        out = base(ids, use_cache=True, logits_to_keep=1)
        sync(); result["prefill_s"] = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(); start = time.perf_counter()
        for _ in range(n_new):
            out = base(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(); result["decode_tok_s"] = n_new / (time.perf_counter() - start)
    else:  # naive reference-structure oracle, prefill only
        from comet_ext.reference import naive_comet_forward
        model = CometForCausalLM.from_base(base, CometConfig()).eval()
        sizes = model._chunk_sizes(None, T)
        base_mb = reset_peak()
        sync(); start = time.perf_counter()
        naive_comet_forward(model, ids, sizes)
        sync(); result["prefill_s"] = time.perf_counter() - start
result["peak_mb"] = peak_mb()
result["extra_mb"] = result["peak_mb"] - base_mb
result["us_per_token"] = result["prefill_s"] / T * 1e6
print(json.dumps(result), flush=True)  # the point, before any profiling: a timeout there keeps it
if profile_to and method.startswith("comet"):  # after the measurements (the profiler's memory included)
    try:
        with torch.no_grad():
            result.update(profile_step(model, memory, ids[:, max(T - cs, 0):], prompt, profile_to))
    except Exception as e:  # a profiler failure must not cost the point
        result["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(result), flush=True)
"""


def run_point(method: str, length: int, device: str, shape: str, n_new: int, timeout: int,
              profile_to: str = "") -> dict:
    """One (method, length) point in a fresh process; with profile_to (CoMeT only), also a
    torch.profiler table of one more chunk read and of 16 decoded tokens, written to that path."""
    try:
        res = run_child(CHILD, method, str(length), device, shape, str(n_new),
                        os.path.abspath(profile_to) if profile_to else "", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        points = [line for line in out.splitlines() if line.startswith("{")]
        if points:  # measured, then cut while profiling
            return {**json.loads(points[-1]), "status": "ok",
                    "profile_error": f"cut by the {timeout} s limit while profiling"}
        return {"method": method, "tokens": length, "status": f"over the {timeout} s limit"}
    if res.returncode != 0:
        oom = "out of memory" in res.stderr.lower() or res.returncode in (-9, 137)
        return {"method": method, "tokens": length, "status": "OOM" if oom else f"failed: {res.stderr[-300:]}"}
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "status": "ok"}


E2E_LIMITS = {"comet": None, "full": 65536, "naive": 16384}  # longest length each method runs by default


def _pytest_points() -> list[tuple[str, int]]:
    lengths = [int(n) for n in os.environ.get("COMET_E2E_LENGTHS", "4096 16384").split()]
    return [(m, n) for n in lengths for m, limit in E2E_LIMITS.items() if limit is None or n <= limit]


@pytest.mark.parametrize("method,length", _pytest_points())
def test_e2e(benchmark, method, length):
    device = os.environ.get("COMET_BENCH_DEVICE", "cpu")
    shape = os.environ.get("COMET_E2E_SHAPE", "tiny")
    benchmark.group = f"e2e {shape} {length}"
    point = {}
    benchmark.pedantic(lambda: point.update(run_point(method, length, device, shape, 128, 3600)),
                       rounds=1, iterations=1)
    assert point["status"] == "ok", f"{method} at {length} tokens: {point['status']}"
    benchmark.extra_info.update(point, device=device, shape=shape)


def short_status(point: dict) -> str:
    """A point's status on one line: a failure's traceback becomes its last line."""
    status = point.get("status", "")
    if status.startswith("failed"):
        last = [line.strip() for line in status.splitlines() if line.strip()][-1]
        status = "failed: " + last[:90].replace("|", "/")
    return status


def fit_power_law(points: list[dict]) -> dict | None:
    """Least-squares fit of log(value) against log(tokens) over the measured points from 32k
    tokens on: for each of prefill_s and extra_mb a function tokens -> extrapolated value;
    None with fewer than two such points."""
    import math

    # Short inputs cost mostly fixed overhead and the linear layers: a fit over them would
    # extrapolate a far too small exponent. Even from 32k on the quadratic term is not yet
    # dominant, so the extrapolated time (and CoMeT's ratio against it) stays an underestimate.
    pts = sorted((p for p in points if p["tokens"] >= 32768), key=lambda p: p["tokens"])
    if len(pts) < 2:
        return None
    fit, notes = {}, []
    for key in ("prefill_s", "extra_mb"):
        xs = [math.log(p["tokens"]) for p in pts]
        ys = [math.log(max(p[key], 1e-9)) for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        last = pts[-1]
        fit[key] = lambda n, k=key, a=slope, ref=last: ref[k] * (n / ref["tokens"]) ** a
        notes.append(f"{key} ~ tokens^{slope:.2f}")
    fit["note"] = (f"power law fitted to {len(pts)} measured points "
                   f"({pts[0]['tokens']}..{pts[-1]['tokens']} tokens): " + ", ".join(notes))
    return fit


def plot(rows: list[dict], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, label in (("prefill_s", "prefill time (s)"), ("extra_mb", "peak memory over the model's footprint (MB)")):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        labels = {"comet": "CoMeT (comet_ext)", "comet-graphs": "CoMeT, CUDA graphs",
                  "full": "full attention (HF sdpa)", "naive": "CoMeT, naive oracle"}
        for method, style in (("comet", "o-"), ("comet-graphs", "D-"), ("full", "s--"), ("naive", "^:")):
            pts = [(r["tokens"], r[key]) for r in rows if r["method"] == method and r.get("status") == "ok"]
            if pts:
                ax.plot(*zip(*pts), style, label=labels[method])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = f"{out}_{key.split('_')[0]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-shape", default="tiny", choices=["tiny", "qwen3-0.6b"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    ap.add_argument("--full-max", type=int, default=E2E_LIMITS["full"])
    ap.add_argument("--naive-max", type=int, default=E2E_LIMITS["naive"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per point")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also run CoMeT with its steps recorded as CUDA graphs (method comet-graphs)")
    ap.add_argument("--profile", action="store_true",
                    help="at the longest length, also profile one chunk read and 16 decoded tokens of each CoMeT "
                    "method (torch.profiler tables in PREFIX_profile_METHOD.txt; host vs device time in the table)")
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.md, .json and _prefill/_peak .png")
    ap.add_argument("--from-log", help="render the tables and plots from the point lines a cut-short run "
                    "printed (with --machine and --commit naming where and what it measured)")
    ap.add_argument("--machine", help="with --from-log: the machine the points were measured on")
    ap.add_argument("--commit", help="with --from-log: the commit measured")
    args = ap.parse_args()
    if args.from_log:
        if not (args.machine and args.commit):
            ap.error("--from-log needs --machine and --commit (this machine did not measure the points)")
        import ast

        with open(args.from_log) as f:
            rows = [ast.literal_eval(line) for line in f if line.startswith("{'method'")]
        logged = {(r["method"], r["tokens"]): r for r in rows}
        rows = []
    else:
        logged = None
        rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # the points' profiles go there
    # Per length, when time is short the numbers that matter most come first: CoMeT with CUDA
    # graphs, then full attention (the baseline, and the points its extrapolation needs).
    limits = ((("comet-graphs", None),) if args.cuda_graphs else ()) + (
        ("full", args.full_max), ("comet", None), ("naive", args.naive_max))
    for length in args.lengths:
        for method, limit in limits:
            if limit is not None and length > limit:
                rows.append({"method": method, "tokens": length, "status": f"not run (over --{method}-max)"})
            elif logged is not None:
                rows.append(logged.get((method, length), {"method": method, "tokens": length,
                                                          "status": "not reached (the run was cut short)"}))
            else:
                profile_to = (f"{args.out}_profile_{method}.txt" if args.profile and method.startswith("comet")
                              and length == max(args.lengths) else "")
                rows.append(run_point(method, length, args.device, args.model_shape, args.new_tokens,
                                      args.timeout, profile_to))
                print(rows[-1], flush=True)
    # Points run in the order given (put the one that matters most first when time is short);
    # tables and plots read them by length.
    lengths = sorted(args.lengths)
    rows.sort(key=lambda r: r["tokens"])
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    pngs = plot(rows, args.out)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import commit, machine

    def get(method, length):
        return next((r for r in rows if r["method"] == method and r["tokens"] == length), {})

    # every argument that chooses or bounds a point, so the command reproduces the table
    command = (f"`python bench/bench_e2e.py --device {args.device} --model-shape {args.model_shape} "
               f"--lengths {' '.join(map(str, args.lengths))} --full-max {args.full_max} --naive-max {args.naive_max} "
               f"--new-tokens {args.new_tokens} --timeout {args.timeout} "
               f"{'--cuda-graphs ' if args.cuda_graphs else ''}{'--profile ' if args.profile else ''}"
               f"--out {args.out}`")
    source = (f"- points measured by {command} and rendered from the lines it printed "
              f"(`--from-log {os.path.basename(args.from_log)}`: a run cut short, or tables re-rendered)"
              if args.from_log else f"- command: {command}")
    lines = [f"# End to end: CoMeT vs full attention ({args.device}, {args.model_shape})", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {args.machine or machine()}",
             f"- commit: {args.commit or commit()}", source,
             "- tensor-core attention kernels (COMET_MMA_KERNELS): "
             + (", ".join(sorted({r["mma_kernels"] for r in rows if "mma_kernels" in r})) or "not recorded"), "",
             "Memory: the peak over the process's footprint once the model is built (CUDA peak allocated on "
             "GPU, peak RSS on CPU).", "",
             "us/token: the prefill's average; last chunks: the input's last (up to 4) chunks timed on "
             "their own, the cost of a token at that length (the FIFO full once the input is longer than the "
             "FIFO's reach, budget x stride tokens).", "",
             "| tokens | CoMeT prefill (s) | us/token | us/token, last chunks | memory (MB) | decode tok/s "
             "| full attn prefill (s) | memory (MB) | decode tok/s | naive CoMeT prefill (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for length in lengths:
        c, f_, n = get("comet", length), get("full", length), get("naive", length)

        def cell(r, k, fmt):
            if r.get("status") == "ok" and k in r:
                return fmt.format(r[k])
            return short_status(r)

        lines.append(f"| {length} | {cell(c, 'prefill_s', '{:.1f}')} | {cell(c, 'us_per_token', '{:.0f}')} | "
                     f"{cell(c, 'tail_us_per_token', '{:.0f}')} | {cell(c, 'extra_mb', '{:.0f}')} | "
                     f"{cell(c, 'decode_tok_s', '{:.1f}')} | "
                     f"{cell(f_, 'prefill_s', '{:.1f}')} | {cell(f_, 'extra_mb', '{:.0f}')} | "
                     f"{cell(f_, 'decode_tok_s', '{:.1f}')} | {cell(n, 'prefill_s', '{:.1f}')} |")
    ok = [r for r in rows if r["method"] == "comet" and r.get("status") == "ok"]
    summary = []
    if len(ok) >= 2:
        ref16 = next((r for r in ok if r["tokens"] == 16384), ok[0])
        last = ok[-1]
        tail = (f", last chunks {last['tail_us_per_token'] / ref16['tail_us_per_token']:.2f}x"
                if "tail_us_per_token" in last and "tail_us_per_token" in ref16 else "")
        summary.append(f"- CoMeT time per token {ref16['tokens']} -> {last['tokens']}: average "
                       f"{last['us_per_token'] / ref16['us_per_token']:.2f}x{tail}; peak memory (process) "
                       f"{last['peak_mb'] / ref16['peak_mb']:.3f}x")
        # The FIFO fills during the first temp_budget x temp_stride tokens: until then a chunk
        # reads a shorter prefix, so the steady state starts where the timed chunks all follow it.
        from comet_ext import CometConfig

        defaults = CometConfig()
        fill = defaults.temp_budget * defaults.temp_stride
        full = next((r for r in ok if "tail_tokens" in r and r["tokens"] - r["tail_tokens"] >= fill), None)
        if full is not None and full is not last:
            summary.append(f"- CoMeT time per token once the FIFO is full (it fills in the first {fill} tokens), "
                           f"last chunks {full['tokens']} -> {last['tokens']}: "
                           f"{last['tail_us_per_token'] / full['tail_us_per_token']:.2f}x")
        # Within one read, one process: a chunk at each depth against the first chunks after the
        # FIFO has filled (16k-64k tokens at the defaults); the ratio of two points above also
        # holds the drift of a shared machine between their processes.
        at = last.get("chunk_ms_at", {})
        if "65536" in at and len(at) > 1:
            summary.append(f"- CoMeT time per chunk within the {last['tokens']}-token read (one process; the median of "
                           "the 24 chunks up to each depth, against those up to 65536, after the FIFO has filled): "
                           + ", ".join(f"{d} {at[d] / at['65536']:.2f}x" for d in at if d != "65536"))
    full_fit = fit_power_law([r for r in rows if r["method"] == "full" and r.get("status") == "ok"])
    for length in lengths:
        c, f_ = get("comet", length), get("full", length)
        if c.get("status") != "ok" or length < 65536:
            continue
        if f_.get("status") == "ok":
            summary.append(f"- at {length} tokens: CoMeT prefill {f_['prefill_s'] / c['prefill_s']:.2f}x faster than "
                           f"full attention, memory over the model {f_['extra_mb'] / max(c['extra_mb'], 1e-9):.2f}x smaller, decode "
                           f"{c['decode_tok_s'] / f_['decode_tok_s']:.2f}x the tokens/s (both measured)")
        elif full_fit is not None:
            est = {k: full_fit[k](length) for k in ("prefill_s", "extra_mb")}
            summary.append(f"- at {length} tokens: CoMeT prefill {est['prefill_s'] / c['prefill_s']:.2f}x faster than "
                           f"full attention, memory over the model {est['extra_mb'] / max(c['extra_mb'], 1e-9):.2f}x "
                           f"smaller — full attention **extrapolated**, not measured: {full_fit['note']} "
                           "(an underestimate of full attention's quadratic cost)")
        else:
            summary.append(f"- at {length} tokens: no full-attention number — measured at fewer than two "
                           "lengths from 32k on, too few to extrapolate")
    for length in lengths:
        c, n = get("comet", length), get("naive", length)
        if c.get("status") == "ok" and n.get("status") == "ok":
            summary.append(f"- at {length} tokens: fast formulation {n['prefill_s'] / c['prefill_s']:.2f}x faster "
                           "than the naive oracle (prefill)")
    for length in lengths:
        c, cg, f_ = get("comet", length), get("comet-graphs", length), get("full", length)
        if cg.get("status") == "ok" and c.get("status") == "ok":
            vs_full = (f"; {f_['prefill_s'] / cg['prefill_s']:.2f}x faster than full attention (measured)"
                       if f_.get("status") == "ok" else "")
            summary.append(f"- at {length} tokens with CUDA graphs: CoMeT prefill {cg['prefill_s']:.1f} s, "
                           f"{c['prefill_s'] / cg['prefill_s']:.2f}x faster than without{vs_full}; decode "
                           f"{cg['decode_tok_s']:.1f} tok/s")
        elif cg:
            summary.append(f"- at {length} tokens with CUDA graphs: {short_status(cg)}")
    for r in rows:
        if "profile_error" in r:
            summary.append(f"- profiling {r['method']} at {r['tokens']} tokens failed: {r['profile_error']}")
        if "profile_read_wall_ms" in r:
            summary.append(
                f"- profiled ({r['method']}, after {r['tokens']} tokens; tables in "
                f"{os.path.basename(args.out)}_profile_{r['method']}.txt): one chunk read {r['profile_read_wall_ms']:.1f} ms "
                f"wall, {r['profile_read_device_ms']:.1f} ms device busy, {r['profile_read_host_ms']:.1f} ms host in ops; "
                f"a decoded token {r['profile_decode_wall_ms']:.1f} ms wall, {r['profile_decode_device_ms']:.2f} ms device, "
                f"{r['profile_decode_host_ms']:.1f} ms host")
    lines += [""] + summary + [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
