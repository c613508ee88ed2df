"""Loading the compiled library: registered ops, and clear errors when it cannot load."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import torch

import comet_ext
from comet_ext import _cpu_isa

OPS = [
    "prefix_attention", "prefix_attention_backward", "rla", "rla_backward", "gated_update",
    "gated_update_backward", "fifo_push", "fifo_push_functional", "fifo_push_backward",
    "fifo_view", "fifo_view_backward",
]


def test_every_op_has_a_cpu_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"comet::{op}", "CPU"), op


def test_build_info_matches_running_torch_and_cpu():
    info = comet_ext.build_info()
    assert info["torch"] == torch.__version__
    assert _cpu_isa.missing(info["cpu_features"], _cpu_isa.host_flags()) == []


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


def test_library_built_for_an_absent_cpu_extension_raises_clear_import_error():
    # A library built with -march=native on an AVX-512 login node, loaded on a node without it,
    # would otherwise die with SIGILL in its first kernel.
    res = _run(
        """
        import sys, types, torch
        sys.modules["comet_ext._build_info"] = types.SimpleNamespace(
            TORCH_VERSION=torch.__version__, WITH_CUDA=False, CUDA_ARCH_LIST="", CPU_ARCH="native",
            CPU_FEATURES=("no_such_isa",), OPENMP=True)
        try:
            import comet_ext
        except ImportError as e:
            print("IMPORT_ERROR:", e)
        """
    )
    if _cpu_isa.host_flags() is None:
        assert "IMPORT_ERROR" not in res.stdout, res.stdout + res.stderr  # nothing to check against
        return
    assert "IMPORT_ERROR: comet_ext._C was built for CPUs with no_such_isa (COMET_CPU_ARCH=native" in res.stdout, \
        res.stdout + res.stderr
    assert "COMET_CPU_ARCH=portable" in res.stdout and "--no-build-isolation" in res.stdout


def test_default_cuda_archs_add_the_build_machines_older_gpus():
    """Unset, TORCH_CUDA_ARCH_LIST builds sm_80 code (every 8.x GPU runs it) and sm_90 with PTX
    (newer GPUs compile it at load); a build machine's GPU that none of those run on (a T4, 7.5)
    is added, so building on it gives a library that runs there."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from build_env import default_cuda_archs

    assert default_cuda_archs([]) == "8.0;9.0+PTX"  # no GPU on the build machine (a login node)
    assert default_cuda_archs([(8, 6), (9, 0), (12, 0)]) == "8.0;9.0+PTX"  # covered: 8.0 code, 9.0 PTX
    assert default_cuda_archs([(7, 5), (7, 5), (8, 0)]) == "7.5;8.0;9.0+PTX"
