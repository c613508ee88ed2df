"""The compiler flags of the CPU kernels: the instruction set they target and how
they get OpenMP, chosen by asking the compiler that will build them.

COMET_CPU_ARCH picks the target:

  auto      (default) on x86-64, AVX2 + FMA (x86-64-v3: Intel since Haswell, AMD
            since Excavator / Zen, not some Atom-class parts) when the compiler and
            this machine have them, else the compiler's default; on other CPUs the
            compiler's default. The library runs on every CPU of that level, not
            only on the build machine.
  native    everything the build machine has (-march=native, or -mcpu=native):
            the library runs only on CPUs with the same extensions.
  portable  the compiler's default target (for most compilers, any CPU of the
            architecture; some distributions' compilers default to x86-64-v2 or v3).
  <name>    passed on as -march=<name> (on Arm, else as -mcpu=<name>).

OpenMP: -fopenmp where the compiler has it (the kernels' threads come from
ATen's OpenMP parallel_for); otherwise -fopenmp-simd (vectorisation pragmas only,
the kernels then run on one thread) and a note that says so.

The ISA extensions the chosen flags let the compiler use are recorded with the
build (comet_ext/_build_info.py) and checked against the running CPU at import
(comet_ext/_cpu_isa.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import re
import shlex
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("comet_cpu_isa", os.path.join(ROOT, "comet_ext", "_cpu_isa.py"))
cpu_isa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_isa)

# AVX2 + FMA for compilers that predate -march=x86-64-v3 (GCC < 11, clang < 12).
_X86_V3_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt", "-mmovbe"]
_MAIN = "int main() { return 0; }\n"
_OPENMP_MAIN = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


@dataclasses.dataclass
class CpuFlags:
    compile: list[str]  # flags for every C++ source
    link: list[str]  # flags for the link
    arch: str  # the target: "x86-64-v3", "native", "portable", ...
    features: list[str]  # /proc/cpuinfo flags of every ISA extension the compiler may use
    openmp: bool  # False: the CPU kernels run on one thread
    notes: list[str]  # what the build should tell the user


def compiler() -> list[str]:
    """The C++ compiler torch's extension build runs: $CXX, else c++."""
    return shlex.split(os.environ.get("CXX", "c++"))


def accepts(cxx: list[str], flags: list[str], source: str = _MAIN, link: bool = False) -> bool:
    """Whether `cxx flags` compiles (and with link=True, links) a small program."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = [*cxx, *flags, src, "-o", os.path.join(d, "probe" if link else "probe.o")]
        if not link:
            cmd.insert(len(cxx), "-c")
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def predefined_macros(cxx: list[str], flags: list[str]) -> set[str]:
    """The macros `cxx flags` predefines (ISA macros among them)."""
    res = subprocess.run([*cxx, *flags, "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True,
                         text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cxx)} {shlex.join(flags)} -dM -E failed: {res.stderr.strip()}")
    return set(re.findall(r"^#define (\w+)", res.stdout, flags=re.M))


def target_features(cxx: list[str], flags: list[str]) -> list[str]:
    """cpuinfo names of the ISA extensions `cxx flags` lets the compiler use: all of them,
    those of the compiler's default target included (some distributions' compilers default
    to x86-64-v2 or v3)."""
    return cpu_isa.features_of_macros(predefined_macros(cxx, flags))


def _arch_candidates(setting: str, machine: str) -> list[tuple[str, list[str]]]:
    if setting == "portable":
        return [("portable", [])]
    if setting == "native":
        return [("native", ["-march=native"]), ("native", ["-mcpu=native"])]
    if setting == "auto":
        if machine in ("x86_64", "amd64"):
            return [("x86-64-v3", ["-march=x86-64-v3"]), ("x86-64-v3", _X86_V3_FLAGS)]
        return []
    if machine in ("x86_64", "amd64"):
        return [(setting, [f"-march={setting}"])]
    return [(setting, [f"-march={setting}"]), (setting, [f"-mcpu={setting}"])]  # Arm takes CPU names as -mcpu


def choose(setting: str | None = None, cxx: list[str] | None = None, machine: str | None = None,
           host=cpu_isa.host_flags) -> CpuFlags:
    """The CPU kernels' flags for COMET_CPU_ARCH=setting (default: the environment, else auto).
    Raises SystemExit for an explicit target the compiler cannot build."""
    setting = (setting if setting is not None else os.environ.get("COMET_CPU_ARCH", "auto")).strip() or "auto"
    cxx = cxx if cxx is not None else compiler()
    machine = (machine or platform.machine()).lower()
    have = host()  # this machine's cpuinfo flags (None: unknown)
    notes: list[str] = []
    arch, flags, features = "portable", [], None
    for name, cand in _arch_candidates(setting, machine):
        try:
            feats = target_features(cxx, cand) if accepts(cxx, cand) else None
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            feats = None  # a compiler that builds but will not list its macros: not this target
        if feats is None:
            continue
        if setting == "auto":  # a library this machine cannot load is no default
            lacking = cpu_isa.missing(feats, have)
            if have is None or lacking:
                why = "does not list its CPU features" if have is None else f"lacks {', '.join(lacking)}"
                notes.append(f"this machine {why}: the CPU kernels target the compiler's default "
                             f"(slower; COMET_CPU_ARCH=native tunes them for this CPU)")
                break
        arch, flags, features = name, cand, feats
        break
    else:
        if setting not in ("auto", "portable"):
            raise SystemExit(f"COMET_CPU_ARCH={setting}: the compiler {shlex.join(cxx)} accepts none of "
                             f"{[c for _, c in _arch_candidates(setting, machine)]}")
        if setting == "auto" and _arch_candidates(setting, machine):
            notes.append(f"{shlex.join(cxx)} cannot target x86-64-v3 (AVX2 + FMA): the CPU kernels target "
                         f"the compiler's default (slower)")
    if features is None:  # the compiler's default target
        try:
            features = target_features(cxx, [])
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            features = []
            notes.append(f"{shlex.join(cxx)} does not list the instructions it targets ({e}): "
                         f"import cannot check them against the CPU")
    lacking = cpu_isa.missing(features, have)
    if lacking and setting == "native":  # the compiler saw more than the OS lists: import would refuse it
        raise SystemExit(f"COMET_CPU_ARCH=native: {shlex.join(cxx)} targets {', '.join(lacking)}, which this "
                         f"machine's /proc/cpuinfo does not list; build with COMET_CPU_ARCH=auto")
    if lacking:  # a target for other machines, or a compiler whose default is above this CPU
        notes.append(f"the CPU kernels target {', '.join(lacking)}, which this machine lacks: the library "
                     f"will not load here (COMET_CPU_ARCH={setting})")

    if accepts(cxx, ["-fopenmp"], _OPENMP_MAIN, link=True):
        omp_compile, omp_link, openmp = ["-fopenmp"], ["-fopenmp"], True
    else:
        omp_compile = ["-fopenmp-simd"] if accepts(cxx, ["-fopenmp-simd"]) else []
        omp_link, openmp = [], False
        notes.append(f"{shlex.join(cxx)} has no OpenMP (-fopenmp): the CPU kernels will run on one thread. "
                     f"Build with a compiler that has it (CXX=...) for threaded kernels")
    return CpuFlags(flags + omp_compile, omp_link, arch, features, openmp, notes)
