"""bench/bench_e2e.py, the end-to-end benchmark the GPU check runs, works as a script on the
tiny CPU shape: its points, its table and its --profile tables (a lent GPU has minutes,
none to spare on a broken script)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_E2E = os.path.join(ROOT, "bench", "bench_e2e.py")


def test_bench_e2e_profile_writes_tables_and_summary(tmp_path):
    out = str(tmp_path / "e2e")
    # from the repository root, as the README runs it (comet_ext: the installed one, or PYTHONPATH's)
    res = subprocess.run([sys.executable, BENCH_E2E, "--device", "cpu", "--model-shape", "tiny",
                          "--lengths", "4096", "--full-max", "0", "--naive-max", "0", "--new-tokens", "2",
                          "--timeout", "600", "--profile", "--out", out],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    (point,) = [r for r in json.load(open(out + ".json")) if r["method"] == "comet"]
    assert point["status"] == "ok", point
    assert "profile_error" not in point, point["profile_error"]
    for step in ("read", "decode"):
        wall, host, device = (point[f"profile_{step}_{k}_ms"] for k in ("wall", "host", "device"))
        assert wall > 0 and device == 0  # no device on a CPU run
        # self times of the ops the profiled thread ran: within the wall time, and most of it
        assert 0.3 * wall < host <= 1.05 * wall, (step, wall, host)
    table = open(out + "_profile_comet.txt").read()
    assert "## read one chunk" in table and "## decode 16 tokens" in table
    assert table.count("comet::prefix_attention") == 2  # in the top ops of both tables
    md = open(out + ".md").read()
    assert "profiled (comet, after 4096 tokens" in md
    assert ("--lengths 4096 --full-max 0 --naive-max 0 --new-tokens 2 --timeout 600 --profile" in md), md[:600]
