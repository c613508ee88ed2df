"""Which CPU instruction-set extensions the compiled CPU kernels may use, and
whether this CPU has them.

The build (setup.py, through tools/cpu_flags.py) asks the compiler which ISA
macros its target flags turn on and records the matching Linux /proc/cpuinfo
flag names in comet_ext/_build_info.py. At import, comet_ext compares them with
this CPU's flags: a library built for AVX-512 on a login node would otherwise
kill the process with an illegal instruction on a compute node without it.

Standard library only: setup.py loads this file by path, before comet_ext is
importable.
"""
from __future__ import annotations

import platform
from typing import Iterable, Optional

# Compiler ISA macro -> the flag Linux lists for it in /proc/cpuinfo ("flags" on x86,
# "Features" on Arm). Macros not listed here are not checked: they name instructions
# the compiler does not generate from plain C++ (AMX tiles, cache-line flushes, random
# numbers...), and a name an older kernel does not print would refuse a good build.
MACRO_TO_CPUINFO = {
    # x86
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__SSE4A__": "sse4a", "__POPCNT__": "popcnt", "__LZCNT__": "abm", "__ABM__": "abm",
    "__LAHF_SAHF__": "lahf_lm", "__MOVBE__": "movbe", "__XSAVE__": "xsave",
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c",
    "__BMI__": "bmi1", "__BMI2__": "bmi2", "__ADX__": "adx", "__AES__": "aes",
    "__PCLMUL__": "pclmulqdq", "__SHA__": "sha_ni", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__AVXVNNI__": "avx_vnni",
    "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVX512VP2INTERSECT__": "avx512_vp2intersect",
    "__AVX512ER__": "avx512er", "__AVX512PF__": "avx512pf",
    # Arm
    "__ARM_FEATURE_ATOMICS": "atomics", "__ARM_FEATURE_QRDMX": "asimdrdm",
    "__ARM_FEATURE_FP16_SCALAR_ARITHMETIC": "fphp", "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp",
    "__ARM_FEATURE_FP16_FML": "asimdfhm", "__ARM_FEATURE_DOTPROD": "asimddp",
    "__ARM_FEATURE_MATMUL_INT8": "i8mm", "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16",
    "__ARM_FEATURE_SVE": "sve", "__ARM_FEATURE_SVE2": "sve2",
    "__ARM_FEATURE_SVE_MATMUL_INT8": "svei8mm", "__ARM_FEATURE_SVE_BF16": "svebf16",
}


def features_of_macros(macros: Iterable[str]) -> list[str]:
    """Sorted cpuinfo flag names of the known ISA macros among `macros`."""
    return sorted({MACRO_TO_CPUINFO[m] for m in macros if m in MACRO_TO_CPUINFO})


def _cpuinfo_key(machine: str) -> Optional[str]:
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return "flags"
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "Features"
    return None


def host_flags(cpuinfo: str = "/proc/cpuinfo", machine: Optional[str] = None) -> Optional[frozenset[str]]:
    """This CPU's ISA flags from /proc/cpuinfo, or None where they cannot be known: no such
    file (not Linux), an architecture this file does not map, or no flags listed under this
    architecture's key (an x86 process under an Arm kernel's emulation sees Arm's)."""
    key = _cpuinfo_key(machine or platform.machine())
    if key is None:
        return None
    common: Optional[frozenset[str]] = None
    try:
        with open(cpuinfo, errors="ignore") as f:
            for line in f:  # one entry per CPU: keep what all of them have
                name, _, value = line.partition(":")
                if name.strip() == key:
                    flags = frozenset(value.split())
                    common = flags if common is None else common & flags
    except OSError:
        return None
    return common or None


def missing(required: Iterable[str], host: Optional[frozenset[str]]) -> list[str]:
    """The required flags this CPU lacks (none when the CPU's flags are unknown)."""
    if host is None:
        return []
    return sorted(set(required) - host)
