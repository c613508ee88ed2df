"""Runs a benchmark's measurement in a fresh Python process (peak memory is per process)."""
from __future__ import annotations

import os
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))


def run_child(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """python -c code args..., output captured as text; kwargs go to subprocess.run.

    It runs in bench/, as the benchmark scripts do: from the repository root, `-c` would
    import the source tree's comet_ext (no compiled _C after a `pip install .`) before the
    installed one. Paths among args must be absolute."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=BENCH, **kwargs)
