"""Runs a benchmark's measurement in a fresh Python process (peak memory is per process)."""
from __future__ import annotations

import os
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))


def run_child(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """python -c code args..., output captured as text; kwargs go to subprocess.run.

    It imports the comet_ext this process imports (its folder first on PYTHONPATH), once
    report.measured_build has checked that it is this tree's code, and runs in bench/, as the
    benchmark scripts do. Paths among args must be absolute."""
    from report import measured_build  # bench/report.py

    root = measured_build()  # the folder of the comet_ext this process imports, checked
    env = dict(kwargs.pop("env", None) or os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=BENCH,
                          env=env, **kwargs)
