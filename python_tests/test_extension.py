"""Loading the compiled library: registered ops, and clear errors when it cannot load."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import torch

import comet_ext

OPS = [
    "prefix_attention", "prefix_attention_backward", "rla", "rla_backward", "gated_update",
    "gated_update_backward", "fifo_push", "fifo_push_functional", "fifo_push_backward",
    "fifo_view", "fifo_view_backward",
]


def test_every_op_has_a_cpu_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"comet::{op}", "CPU"), op


def test_build_info_matches_running_torch():
    info = comet_ext.build_info()
    assert info["torch"] == torch.__version__


def _run(code: str) -> subprocess.CompletedProcess:
    # Run outside the source tree so the subprocess imports the installed package.
    where = os.path.dirname(os.path.dirname(comet_ext.__file__))
    env = dict(os.environ, PYTHONPATH=where)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env,
    )


def test_mismatched_torch_raises_clear_import_error():
    res = _run(
        """
        import sys, types
        sys.modules["comet_ext._build_info"] = types.SimpleNamespace(TORCH_VERSION="1.0.0", WITH_CUDA=False, CUDA_ARCH_LIST="")
        try:
            import comet_ext
        except ImportError as e:
            print("IMPORT_ERROR:", e)
        """
    )
    assert "IMPORT_ERROR: comet_ext._C was built for torch 1.0.0" in res.stdout, res.stdout + res.stderr
    assert "--no-build-isolation" in res.stdout


def test_missing_library_raises_clear_import_error():
    res = _run(
        """
        import sys
        sys.modules["comet_ext._C"] = None   # makes `import comet_ext._C` fail as if absent
        try:
            import comet_ext
        except ImportError as e:
            print("IMPORT_ERROR:", e)
        """
    )
    assert "IMPORT_ERROR: comet_ext._C could not be loaded" in res.stdout, res.stdout + res.stderr
    assert "pip install --no-build-isolation" in res.stdout
