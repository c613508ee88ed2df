"""Builds comet_ext._C against the torch installed in this environment.

C++ CPU kernels are always built; the CUDA kernels are added when torch has
CUDA and a CUDA toolkit (nvcc) is found. Environment variables:

  COMET_CUDA=0|1            force the CUDA sources off / on (default: auto)
  TORCH_CUDA_ARCH_LIST      GPU archs (default "8.0;9.0+PTX", plus the build machine's GPUs older than 8.0)
  COMET_CPU_ARCH=auto|native|portable|<march>
                            the CPU kernels' target (tools/cpu_flags.py; default auto:
                            AVX2 + FMA on x86-64, checked against the CPU at import)
  DEBUG=1                   -O0 -g debug build with assertions
  CUDA_HOME                 toolkit root; found by following nvcc when unset
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_env import default_cuda_archs, real_toolkit_root, source_digest, wheel_cuda_includes  # noqa: E402
import cpu_flags  # noqa: E402

try:
    import torch
except ImportError:  # pip's build isolation hides the user's torch from us
    sys.exit(
        "\n\ncomet_ext is a PyTorch extension and must be built against the torch you\n"
        "run it with, but no torch is importable in this build environment. Install\n"
        "torch first, then build without pip's isolated environment:\n\n"
        "    pip install --no-build-isolation .\n"
    )


def _want_cuda(cuda_home):
    flag = os.environ.get("COMET_CUDA", "auto")
    if flag == "0":
        return False
    ok = torch.version.cuda is not None and cuda_home is not None
    if flag == "1" and not ok:
        sys.exit("COMET_CUDA=1 but torch has no CUDA or no CUDA toolkit (nvcc) was found")
    return ok


cuda_home = real_toolkit_root()
if cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads it once.
    os.environ["CUDA_HOME"] = cuda_home
WITH_CUDA = _want_cuda(cuda_home)
if WITH_CUDA and "TORCH_CUDA_ARCH_LIST" not in os.environ:
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else ()
    os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_archs(torch.cuda.get_device_capability(i) for i in gpus)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


debug = os.environ.get("DEBUG", "0") == "1"
cpu = cpu_flags.choose()
# -fno-trapping-math: the kernels never read the floating-point exception flags, and GCC will
# not vectorise a loop whose clamps (x < lo ? lo : x) it would rather branch around than
# evaluate in every lane (cpu_utils.h exp_scalar ran 1 lane wide instead of 8). Values are unchanged.
cxx = ["-std=c++20", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-trapping-math", *cpu.compile]
cxx += ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-DNDEBUG"]
nvcc += ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = []
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += wheel_cuda_includes()
    define_macros.append(("COMET_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "comet_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=cpu.link,
        py_limited_api=True,
    )
else:
    ext = CppExtension(
        "comet_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=cpu.link, py_limited_api=True,
    )


def _write_build_info(package_dir: str, digest) -> None:
    """Records what _C is built against in package_dir/_build_info.py, so a mismatch at import is
    explained. `digest` (tools/build_env.py source_digest) is None until the build has succeeded:
    a failed build must not leave a record that passes an older _C beside it off as this tree's."""
    info = (
        '"""Written by setup.py at build time; do not edit."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_ARCH_LIST = {os.environ['TORCH_CUDA_ARCH_LIST'] if WITH_CUDA else ''!r}\n"
        f"CPU_ARCH = {cpu.arch!r}\n"
        f"CPU_FEATURES = {tuple(cpu.features)!r}  # checked against the running CPU at import\n"
        f"OPENMP = {cpu.openmp!r}\n"
        f"SOURCE_DIGEST = {digest!r}  # tools/build_env.py source_digest of the tree built; None: not built\n"
    )
    os.makedirs(package_dir, exist_ok=True)
    path = os.path.join(package_dir, "_build_info.py")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(info)
    os.replace(tmp, path)


class RecordingBuildExtension(BuildExtension):
    """build_ext that records the sources' digest once _C is built, in the tree and, for a wheel,
    in the build's copy of the package (whichever of build_py / build_ext runs last)."""

    def run(self):
        super().run()
        digest = source_digest(ROOT)
        _write_build_info(os.path.join(ROOT, "comet_ext"), digest)
        if not self.inplace:
            _write_build_info(os.path.join(self.build_lib, "comet_ext"), digest)


_write_build_info(os.path.join(ROOT, "comet_ext"), None)
print(f"comet_ext: torch {torch.__version__}, CPU kernels for {cpu.arch}, CUDA kernels {'on' if WITH_CUDA else 'off'}"
      + (f" (CUDA_HOME={cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})" if WITH_CUDA else ""))
for note in cpu.notes:
    print(f"comet_ext: note: {note}")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": RecordingBuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
