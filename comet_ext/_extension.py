"""Loads comet_ext._C (the compiled op library) or explains why it cannot."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

from . import _cpu_isa

_REBUILD = (
    "Rebuild it against the torch you run, from the comet_ext source folder:\n"
    "    pip install --no-build-isolation --no-deps --force-reinstall .\n"
    "(the --no-build-isolation flag makes the build use this torch)."
)


def _build_record() -> Optional[ModuleType]:
    try:
        return importlib.import_module("comet_ext._build_info")
    except ImportError:
        return None


def load() -> None:
    """Imports comet_ext._C, which registers the `comet` ops with the dispatcher.

    Raises ImportError naming the torch the library was built for when it is
    missing, fails to load, or was built against a different torch; and naming
    the instruction-set extensions it was built for when this CPU lacks them
    (loading it would end the process with an illegal instruction).
    """
    record = _build_record()
    built = record.TORCH_VERSION if record is not None else None
    if built is not None and built != torch.__version__:
        raise ImportError(
            f"comet_ext._C was built for torch {built}, but this is torch {torch.__version__}; "
            f"its kernels would not load or would misbehave. {_REBUILD}"
        )
    lacking = _cpu_isa.missing(getattr(record, "CPU_FEATURES", ()), _cpu_isa.host_flags())
    if lacking:
        raise ImportError(
            f"comet_ext._C was built for CPUs with {', '.join(lacking)} (COMET_CPU_ARCH="
            f"{getattr(record, 'CPU_ARCH', '?')} on the build machine), and this CPU lacks them: its "
            f"kernels would stop the process with an illegal instruction. Rebuild it on this machine, "
            f"from the comet_ext source folder:\n    pip install --no-build-isolation --no-deps --force-reinstall .\n"
            f"or, for the compiler's default target (with most compilers every CPU of this architecture), "
            f"prefix that with COMET_CPU_ARCH=portable."
        )
    try:
        importlib.import_module("comet_ext._C")
    except ImportError as e:
        what = f"built for torch {built}" if built else "no build record: the extension was never built"
        raise ImportError(
            f"comet_ext._C could not be loaded ({e}); {what}, running torch {torch.__version__}. "
            f"{_REBUILD}"
        ) from e


def build_info() -> dict:
    """What the installed extension was built with: torch version, CUDA kernels and their archs,
    the CPU kernels' target, the ISA extensions it needs, whether they are threaded (OpenMP), and
    the digest of the sources it was built from (tools/build_env.py source_digest)."""
    info = importlib.import_module("comet_ext._build_info")
    return {"torch": info.TORCH_VERSION, "cuda": info.WITH_CUDA, "cuda_arch_list": info.CUDA_ARCH_LIST,
            "cpu_arch": getattr(info, "CPU_ARCH", None), "cpu_features": getattr(info, "CPU_FEATURES", None),
            "openmp": getattr(info, "OPENMP", None), "source_digest": getattr(info, "SOURCE_DIGEST", None)}
