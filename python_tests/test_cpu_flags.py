"""The CPU kernels' build flags (tools/cpu_flags.py) and the ISA record checked at import
(comet_ext/_cpu_isa.py), with the real compiler and with stand-ins that lack a feature."""
from __future__ import annotations

import os
import platform
import stat
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cpu_flags  # noqa: E402

from comet_ext import _cpu_isa  # noqa: E402

CXX = cpu_flags.compiler()
HOST = _cpu_isa.host_flags()
X86_LINUX = platform.machine().lower() in ("x86_64", "amd64") and HOST is not None
V3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2"}
linux = pytest.mark.skipif(HOST is None, reason="needs /proc/cpuinfo flags (Linux)")
x86_linux = pytest.mark.skipif(not X86_LINUX, reason="needs Linux on x86-64 (/proc/cpuinfo flags)")
x86_v3 = pytest.mark.skipif(not (X86_LINUX and V3 <= HOST), reason="needs Linux on an x86-64 CPU with AVX2 + FMA")
OPENMP = cpu_flags.accepts(CXX, ["-fopenmp"], cpu_flags._OPENMP_MAIN, link=True)


def _compiler_without(tmp_path, *refused: str) -> list[str]:
    """A compiler that fails whenever one of `refused` is among its arguments, else runs the real one."""
    script = tmp_path / "cxx"
    tests = " || ".join(f'[ "$a" = "{r}" ]' for r in refused)
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do if {tests}; then exit 1; fi; done\n'
                      f'exec {" ".join(CXX)} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)]


def test_accepts_tells_a_known_flag_from_an_unknown_one():
    assert cpu_flags.accepts(CXX, ["-O2"])
    assert not cpu_flags.accepts(CXX, ["-fno-such-option-comet"])
    assert not cpu_flags.accepts(CXX, [], source="int main() { return undeclared; }\n")


@x86_linux
def test_target_features_are_what_the_flags_let_the_compiler_use():
    assert _cpu_isa.missing(cpu_flags.target_features(CXX, []), HOST) == []  # the default runs here
    assert V3 <= set(cpu_flags.target_features(CXX, ["-march=x86-64-v3"]))
    assert "avx512f" not in cpu_flags.target_features(CXX, ["-march=x86-64-v3"])
    assert {"avx512f", "avx512bw"} <= set(cpu_flags.target_features(CXX, ["-march=skylake-avx512"]))


@linux
def test_native_features_are_named_as_this_cpu_lists_them():
    # -march=native takes everything this CPU has: every name the table maps a macro to
    # must then be among /proc/cpuinfo's flags, else the import check would refuse a good build.
    native = cpu_flags.choose("native")
    assert native.arch == "native" and native.features
    assert _cpu_isa.missing(native.features, HOST) == []
    if X86_LINUX and V3 <= HOST:
        assert V3 <= set(native.features)


@x86_v3
def test_native_refuses_a_target_this_machine_does_not_list():
    with pytest.raises(SystemExit, match="COMET_CPU_ARCH=native: .* targets avx2"):
        cpu_flags.choose("native", host=lambda: HOST - {"avx2"})


@x86_v3
def test_auto_targets_avx2_and_fma_on_a_machine_that_has_them():
    flags = cpu_flags.choose("auto")
    assert flags.arch == "x86-64-v3" and "-march=x86-64-v3" in flags.compile
    assert V3 <= set(flags.features) and not [n for n in flags.notes if "OpenMP" not in n]
    if OPENMP:
        assert flags.openmp and "-fopenmp" in flags.compile and "-fopenmp" in flags.link


@x86_v3
def test_auto_falls_back_to_the_default_target_where_this_machine_cannot_run_v3():
    without_avx2 = cpu_flags.choose("auto", host=lambda: HOST - {"avx2"})
    assert without_avx2.arch == "portable" and "avx2" not in without_avx2.features
    assert not any(f.startswith("-march") for f in without_avx2.compile)
    assert "lacks avx2" in without_avx2.notes[0]
    unknown = cpu_flags.choose("auto", host=lambda: None)
    assert unknown.arch == "portable" and "does not list its CPU features" in unknown.notes[0]


@x86_v3
def test_auto_uses_feature_flags_where_the_compiler_predates_x86_64_v3(tmp_path):
    flags = cpu_flags.choose("auto", cxx=_compiler_without(tmp_path, "-march=x86-64-v3"))
    assert flags.arch == "x86-64-v3" and "-mavx2" in flags.compile and "-march=x86-64-v3" not in flags.compile
    assert V3 <= set(flags.features)


def test_auto_leaves_other_architectures_at_the_compilers_default():
    flags = cpu_flags.choose("auto", machine="aarch64")
    assert flags.arch == "portable" and "-march" not in " ".join(flags.compile)
    assert flags.features == cpu_flags.target_features(CXX, [])


@x86_linux
def test_auto_says_so_when_the_compiler_cannot_target_v3(tmp_path):
    flags = cpu_flags.choose("auto", cxx=_compiler_without(tmp_path, "-march=x86-64-v3", "-mavx2"))
    assert flags.arch == "portable" and "cannot target x86-64-v3" in flags.notes[0]


def test_an_explicit_target_the_compiler_rejects_stops_the_build():
    with pytest.raises(SystemExit, match="COMET_CPU_ARCH=no-such-cpu"):
        cpu_flags.choose("no-such-cpu")


@x86_linux
def test_an_explicit_target_beyond_this_machine_builds_with_a_note():
    flags = cpu_flags.choose("skylake-avx512", host=lambda: frozenset({"avx", "avx2", "fma"}))
    assert flags.arch == "skylake-avx512" and "avx512f" in flags.features
    assert "which this machine lacks: the library will not load here" in flags.notes[0]


def test_a_compiler_without_openmp_builds_single_threaded_kernels_and_says_so(tmp_path):
    flags = cpu_flags.choose("portable", cxx=_compiler_without(tmp_path, "-fopenmp"))
    assert not flags.openmp and "-fopenmp" not in flags.compile and "-fopenmp" not in flags.link
    assert "-fopenmp-simd" in flags.compile  # the vectorisation pragmas still count
    assert "one thread" in flags.notes[-1]


def test_host_flags_keeps_what_every_cpu_has(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx fma\n")
    assert _cpu_isa.host_flags(str(info), "x86_64") == {"fpu", "avx", "fma"}
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")  # Arm's key
    assert _cpu_isa.host_flags(str(info), "aarch64") == {"fp", "asimd", "sve"}
    # An x86 process emulated on an Arm kernel reads Arm's flags: nothing to check, not a refusal.
    assert _cpu_isa.host_flags(str(info), "x86_64") is None
    info.write_text("processor\t: 0\nflags\t\t:\n")  # an empty list says nothing either
    assert _cpu_isa.host_flags(str(info), "x86_64") is None
    assert _cpu_isa.host_flags(str(info), "riscv64") is None
    assert _cpu_isa.host_flags(str(tmp_path / "absent"), "x86_64") is None


def test_missing_names_what_the_cpu_lacks_and_nothing_when_the_cpu_is_unknown():
    assert _cpu_isa.missing(["avx2", "avx512f", "fma"], frozenset({"avx2", "fma"})) == ["avx512f"]
    assert _cpu_isa.missing(["avx512f"], None) == []
    assert _cpu_isa.features_of_macros(["__AVX2__", "__FMA__", "__x86_64__", "__AVX512VNNI__"]) == \
        ["avx2", "avx512_vnni", "fma"]
