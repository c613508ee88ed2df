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

from typing import Iterable, Optional

# Compiler ISA macro -> the flag Linux lists for it in /proc/cpuinfo ("flags" on x86,
# "Features" on Arm). Macros not listed here are not checked: they name instructions
# the kernels' code generation does not reach for (cache-line flushes, random numbers...).
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
    "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16", "__AMX_INT8__": "amx_int8",
    # Arm
    "__ARM_FEATURE_SVE": "sve", "__ARM_FEATURE_SVE2": "sve2",
    "__ARM_FEATURE_DOTPROD": "asimddp", "__ARM_FEATURE_MATMUL_INT8": "i8mm",
    "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp", "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16",
}


def features_of_macros(macros: Iterable[str]) -> list[str]:
    """Sorted cpuinfo flag names of the known ISA macros among `macros`."""
    return sorted({MACRO_TO_CPUINFO[m] for m in macros if m in MACRO_TO_CPUINFO})


def host_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[frozenset[str]]:
    """This CPU's ISA flags from /proc/cpuinfo, or None where there is no such file
    (not Linux) or it lists none: then nothing can be checked."""
    common: Optional[frozenset[str]] = None
    try:
        with open(cpuinfo, errors="ignore") as f:
            for line in f:  # one entry per CPU: keep what all of them have
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags = frozenset(value.split())
                    common = flags if common is None else common & flags
    except OSError:
        return None
    return common


def missing(required: Iterable[str], host: Optional[frozenset[str]]) -> list[str]:
    """The required flags this CPU lacks (none when the CPU's flags are unknown)."""
    if host is None:
        return []
    return sorted(set(required) - host)
