"""Facts about the local torch / CUDA toolkit that the build needs, shared by
setup.py and CMakeLists.txt.

`nvcc` on PATH may be a wrapper script, so torch's own guess of CUDA_HOME (the
wrapper's parent folder) can be wrong; and a bare toolkit may lack the cuBLAS /
cuSPARSE headers and nvrtc library that ATen's CUDA headers and TorchConfig
expect, which the pip wheels (site-packages/nvidia/*/) provide.

    python tools/build_env.py cmake   # prints -D arguments for a CMake configure
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys


def default_cuda_archs(capabilities) -> str:
    """TORCH_CUDA_ARCH_LIST when the user sets none: sm_80 code (it runs on every 8.x GPU), sm_90
    code and its PTX (which newer GPUs compile when the library loads), and the build machine's
    own GPUs that none of these run on (a T4's 7.5). capabilities: (major, minor) per visible GPU;
    a build machine without one (a cluster's login node) gets the first two only."""
    older = sorted({f"{major}.{minor}" for major, minor in capabilities if major < 8})
    return ";".join([*older, "8.0", "9.0+PTX"])


def real_toolkit_root() -> str | None:
    """Toolkit root holding bin/nvcc and include/cuda_runtime.h, or None.

    CUDA_HOME wins when set; otherwise follow `nvcc` through symlinks and
    wrapper scripts of the form `exec /path/to/bin/nvcc "$@"`.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    for _ in range(4):
        if nvcc is None:
            return None
        nvcc = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(nvcc))
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
        try:
            with open(nvcc, errors="ignore") as f:
                head = f.read(4096)
        except OSError:
            return None
        m = re.search(r"(/\S+/bin/nvcc)\b", head)
        nvcc = m.group(1) if m else None
    return None


def _wheel_dirs(sub: str) -> list[str]:
    found = set()
    for entry in sys.path:
        found.update(glob.glob(os.path.join(entry, "nvidia", "*", sub)))
    return sorted(found)


def wheel_cuda_includes() -> list[str]:
    """site-packages/nvidia/*/include folders that hold cuBLAS or cuSPARSE headers."""
    return [
        d for d in _wheel_dirs("include")
        if os.path.exists(os.path.join(d, "cublas_v2.h")) or os.path.exists(os.path.join(d, "cusparse.h"))
    ]


def wheel_library(name: str) -> str | None:
    """Path of lib<name>.so* shipped by a CUDA pip wheel, if any."""
    for d in _wheel_dirs("lib"):
        hits = sorted(glob.glob(os.path.join(d, f"lib{name}.so*")))
        if hits:
            return hits[0]
    return None


# What the compiled extension is made from: its sources and the build scripts that pick
# its flags. Two trees with the same digest build the same _C (for one torch and compiler).
_BUILD_INPUTS = ("csrc", "setup.py", "tools/build_env.py", "tools/cpu_flags.py")


def source_digest(root: str) -> str:
    """sha256 (first 16 hex digits) over the paths and contents of _BUILD_INPUTS under root.
    setup.py records it in comet_ext/_build_info.py; the benchmarks compare it with the tree's
    to refuse to time a stale build under the tree's commit."""
    import hashlib

    files = []
    for entry in _BUILD_INPUTS:
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                files += [os.path.join(folder, n) for n in sorted(names)]
        elif os.path.exists(path):
            files.append(path)
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, root).replace(os.sep, "/").encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read() + b"\0")
    return h.hexdigest()[:16]


def cmake_args() -> list[str]:
    import torch

    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    root = real_toolkit_root()
    if torch.version.cuda and root:
        args += [
            f"-DCUDA_TOOLKIT_ROOT_DIR={root}",
            f"-DCUDAToolkit_ROOT={root}",
            f"-DCMAKE_CUDA_COMPILER={os.path.join(root, 'bin', 'nvcc')}",
        ]
        nvrtc = wheel_library("nvrtc")
        if nvrtc and not glob.glob(os.path.join(root, "lib*", "libnvrtc.so*")):
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
        includes = wheel_cuda_includes()
        if includes:
            args.append(f"-DCOMET_EXTRA_INCLUDES={';'.join(includes)}")
    return args


if __name__ == "__main__":
    if sys.argv[1:] != ["cmake"]:
        sys.exit("usage: python tools/build_env.py cmake")
    print(" ".join(f'"{a}"' if " " in a else a for a in cmake_args()))
