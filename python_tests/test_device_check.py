"""bench/device_check.sh, the GPU check, run here with a stub interpreter that answers every call
(a GPU present, a current build, each step passing): which steps run, in which order, and how the
deadline is shared. A lent GPU has minutes; a broken script would waste them."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_STEPS = ["cuda_tests", "memcheck", "racecheck", "gpu_reference", "gpu_ops", "gpu_ops_mma_v2", "gpu_ops_row_v2"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _check(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]], list[str]]:
    """Runs the check with the stub; returns the run, the summary's (step, result) rows and the
    stub's calls (one line each)."""
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    # every call succeeds at once; a test or benchmark run takes STUB_SLEEP seconds; with STUB_STALE
    # the build-is-current check (a script on stdin: "-") says no, so the build step runs
    stub.write_text('#!/bin/bash\necho "$*" >> "%s"\n'
                    'case "$*" in *pytest*|*bench_e2e.py*) sleep "${STUB_SLEEP:-0}";;\n'
                    '  -) [ -n "${STUB_STALE:-}" ] && exit 1;; esac\nexit 0\n' % calls)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text('#!/bin/bash\nshift 4\nexec "$@"\n')  # --tool X --error-exitcode N, then the command
    for f in (stub, sanitizer):
        f.chmod(0o755)
    out = tmp_path / "out"
    run = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh"), str(out)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHON": str(stub), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                              "COMET_COMMIT": "abc1234", **env})
    rows = []
    if (out / "summary.md").exists():
        for line in (out / "summary.md").read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("step", "---"):
                rows.append((cells[0], cells[1]))
    return run, rows, calls.read_text().splitlines() if calls.exists() else []


def test_the_whole_check_runs_every_step_sanitizers_before_benchmarks(tmp_path):
    run, rows, calls = _check(tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert rows == [("build", "kept (current)")] + [(s, "ok") for s in OP_STEPS] + [("e2e", "ok")]
    assert any("bench_e2e.py" in c and "--lengths 1048576" in c for c in calls)


@pytest.mark.parametrize("mode", ["0", "only"])
def test_the_check_in_two_parts(tmp_path, mode):
    run, rows, calls = _check(tmp_path, COMET_E2E=mode)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    steps = [s for s, _ in rows]
    if mode == "0":
        assert steps == ["build"] + OP_STEPS and not any("bench_e2e.py" in c for c in calls)
    else:
        assert steps == ["build", "e2e"] and not any("-m pytest" in c for c in calls)


@pytest.mark.slow
def test_the_end_to_end_keeps_its_share_however_long_the_op_part(tmp_path):
    """Steps of 4 s in a 110 s check with 60 s kept for the end to end (and the 40 s reserve for the
    tables): the op part has 10 s, too little for any step, so all are skipped, and the end to end
    still runs."""
    run, rows, _ = _check(tmp_path, COMET_CHECK_SECONDS="110", COMET_E2E_SECONDS="60", STUB_SLEEP="4")
    assert run.returncode == 1  # skipped steps fail the check
    assert rows == ([("build", "kept (current)")] + [(s, "**skipped: out of time**") for s in OP_STEPS]
                    + [("e2e", "ok")]), rows
    (tmp_path / "without_share").mkdir()
    run, rows, _ = _check(tmp_path / "without_share", COMET_CHECK_SECONDS="70", COMET_E2E_SECONDS="0",
                          STUB_SLEEP="4")
    assert ("cuda_tests", "ok") in rows  # without the share the op part takes the time
    (tmp_path / "build").mkdir()  # a build to make is not held to the op part's time
    run, rows, calls = _check(tmp_path / "build", COMET_CHECK_SECONDS="110", COMET_E2E_SECONDS="60", STUB_STALE="1")
    assert rows[0] == ("build", "ok") and rows[-1] == ("e2e", "ok"), rows
    assert any("setup.py build_ext --inplace" in c for c in calls)


@pytest.mark.parametrize("env, message", [({"COMET_E2E": "yes"}, "COMET_E2E must be 0, 1 or only, got 'yes'"),
                                          ({"COMET_CHECK_SECONDS": "8m"}, "must be whole seconds, got '8m'")])
def test_bad_settings_are_refused_by_name(tmp_path, env, message):
    run, rows, calls = _check(tmp_path, **env)
    assert run.returncode == 1 and message in run.stderr and not rows
