"""Loads comet_ext._C (the compiled op library) or explains why it cannot."""
from __future__ import annotations

import importlib

import torch

_REBUILD = (
    "Rebuild it against the torch you run, from the comet_ext source folder:\n"
    "    pip install --no-build-isolation --no-deps --force-reinstall .\n"
    "(the --no-build-isolation flag makes the build use this torch)."
)


def _built_for() -> str | None:
    try:
        info = importlib.import_module("comet_ext._build_info")
    except ImportError:
        return None
    return info.TORCH_VERSION


def load() -> None:
    """Imports comet_ext._C, which registers the `comet` ops with the dispatcher.

    Raises ImportError naming the torch the library was built for when it is
    missing, fails to load, or was built against a different torch.
    """
    built = _built_for()
    if built is not None and built != torch.__version__:
        raise ImportError(
            f"comet_ext._C was built for torch {built}, but this is torch {torch.__version__}; "
            f"its kernels would not load or would misbehave. {_REBUILD}"
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
    """What the installed extension was built with (torch version, CUDA kernels, archs)."""
    info = importlib.import_module("comet_ext._build_info")
    return {"torch": info.TORCH_VERSION, "cuda": info.WITH_CUDA, "cuda_arch_list": info.CUDA_ARCH_LIST}
